"""benchmarks/gpu_extract.py (the one-shot GPU script's extraction step) runs on the CPU with --quick and the tiny
CLIP, and reports each bound and the ratio it computed from them (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_extract_quick_reports_its_bounds_and_ratio(motion_dataset, tiny_checkpoint, tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_extract", "--videos", str(motion_dataset / "videos"),
                           "--manifest", str(motion_dataset / "train.csv"), "--checkpoint", str(tiny_checkpoint),
                           "--model", "dist-tiny", "--device", "cpu", "--out", str(report),
                           "--store", str(tmp_path / "s.zarr"),
                           "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert json.loads(done.stdout) == result
    steps = result["results"]
    assert not [name for name, step in steps.items() if "error" in step], steps
    assert steps["extract"]["returncode"] == 0 and steps["extract"]["videos"] == 8
    assert steps["extract"]["first_video_s"] > 0 and steps["clip"]["precision"] == "fp32"
    # The decode bound is extraction's own work (16 dense frames rendered per clip, extract's worker count); the
    # bare readers' figure is reported beside it.
    assert steps["decode"]["render"] == {"frames_per_clip": 16, "image_size": steps["clip"]["shapes"]["image_size"],
                                         "views": 1}
    assert steps["decode"]["clips"] == steps["decode_bare"]["clips"] == 8 and result["decode_bare_clips_per_s"] > 0
    bounds = result["bounds_clips_per_s"]
    assert bounds["decode"] == steps["decode"]["clips_per_s"]
    assert bounds["write"] == pytest.approx(steps["write"]["MBps"] / result["parameters"]["MB_per_clip"], rel=0.01)
    assert result["ratio"] == pytest.approx(result["extract_clips_per_s"] / min(bounds.values()), rel=0.01)
    assert steps["extract"]["stored_MB_per_clip"] == pytest.approx(result["parameters"]["MB_per_clip"], rel=0.05)
    from storage import FeatureStore

    store = FeatureStore.open(tmp_path / "s.zarr")  # kept for the training benchmark
    assert store.complete and store.has_frames and len(store) == 8
