"""benchmarks/decode_pool.py runs as a module and reports its ratio (timings are never asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_decode_pool_benchmark_quick_reports_its_ratio():
    out = subprocess.run([sys.executable, "-m", "benchmarks.decode_pool", "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)  # one JSON object and nothing else on stdout
    assert result["ratio"] > 0 and result["verdict"] in ("met", "missed")
    results = result["results"]
    assert results["pool_clips_per_s"] > 0 and results["bare_clips_per_s"] > 0
    assert result["ratio"] == pytest.approx(results["pool_clips_per_s"] / results["bare_clips_per_s"], rel=0.01)
    assert results["pyav_pool_clips_per_s"] > 0  # the same pool with the PyAV decoder, side by side
    assert results["pyav_over_decord_pool"] == pytest.approx(
        results["pyav_pool_clips_per_s"] / results["pool_clips_per_s"], rel=0.01)
    serial = results["serial_one_thread"]  # CPU seconds too: a shared machine disturbs them far less
    assert serial["probe_and_read_pyav_cpu_s_per_video"] > 0 and serial["probe_and_read_decord_cpu_s_per_video"] > 0
