"""benchmarks/store_write.py runs as a module and reports the writer/plain ratios, with and without the writer's own
finiteness scan (never asserted: timings belong to benchmarks, measured side by side)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_store_write_benchmark_quick_prints_a_ratio(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.store_write", "--quick"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "DIST_BENCH_TMP": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert isinstance(report["ratio"], float) and report["ratio"] > 0
    for regime in ("page_cache_reused", "page_cache_fresh"):
        result = report["results"][regime]
        assert result["writer_MBps"] > 0 and result["writer_finite_checked_MBps"] > 0 and result["ratio"] > 0
    # The headline is the writer as extraction calls it (finiteness checked on the device).
    assert report["ratio"] == report["results"]["page_cache_reused"]["ratio_finite_checked"]
    assert not list(tmp_path.iterdir())  # its scratch store and files are removed
