"""benchmarks/gpu_train.py, the GPU measurement the lead runs, works end to end: here on the CPU with --quick and a
dist-tiny store that holds its dense frames, as a real subprocess, within its time bounds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dense_stores import extract_with_frames

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_train_benchmark_runs_quick_on_a_tiny_store(tmp_path, motion_dataset, tiny_checkpoint):
    store = extract_with_frames(motion_dataset / "train.csv", motion_dataset / "videos", tmp_path / "s.zarr",
                                tiny_checkpoint, views=1, split="train", gamma=2)
    out = tmp_path / "gpu_train.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--store", store, "--out", str(out), "--quick",
                           "--device", "cpu", "--batch", "4", "--read-threads", "2",
                           "--pretrained", str(tiny_checkpoint)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["phases"]) == {"cached_step", "cached_e2e", "online_step", "online_e2e"}
    assert all(p["clips_per_s"] > 0 and p["steps"] >= 1 for p in result["phases"].values())
    assert set(result["ratio"]) == {"cached_e2e_over_step", "online_e2e_over_step", "cached_over_online_e2e",
                                    "cached_over_online_step", "cached_over_online_e2e_over_bound"}
    # what the cache would buy at equal FLOP efficiency (the FLOPs of dist-tiny), and what break_even reads
    bound = result["compute_bound_cached_over_online"]
    assert bound > 1 and result["ratio"]["cached_over_online_e2e_over_bound"] == pytest.approx(
        result["ratio"]["cached_over_online_e2e"] / bound, rel=0.02)
    seconds = result["seconds_per_clip"]
    assert seconds["branch"] == pytest.approx(1 / result["phases"]["cached_step"]["clips_per_s"], rel=0.02)
    assert result["verdict"] in ("met", "missed") and "timed_out" not in result
    assert result["parameters"]["dense_frames_stored"] == 2 and result["parameters"]["online_precision"] == "fp32"


def test_gpu_train_benchmark_measures_a_compact_copy_cached_only(tmp_path, motion_dataset, tiny_checkpoint):
    """What gpu.sh's train_compact step runs: `copy --pca 128 --dtype int8`, then the cached phases on that copy."""
    store = extract_with_frames(motion_dataset / "train.csv", motion_dataset / "videos", tmp_path / "s.zarr",
                                tiny_checkpoint, views=1, split="train", gamma=2)
    compact = str(tmp_path / "pca.zarr")
    copied = subprocess.run([sys.executable, "-m", "cli", "copy", store, compact, "--pca", "128", "--dtype", "int8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert copied.returncode == 0, copied.stderr[-3000:]
    out = tmp_path / "gpu_train.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--store", compact, "--out", str(out),
                           "--quick", "--device", "cpu", "--batch", "4", "--read-threads", "2", "--cached-only"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["phases"]) == {"cached_step", "cached_e2e"} and set(result["ratio"]) == {"cached_e2e_over_step"}
    assert result["parameters"]["store_format"] == {"pca": {"request": 128}, "quantization": "int8-channel-token"}
