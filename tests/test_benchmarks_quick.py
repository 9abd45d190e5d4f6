"""Every module of benchmarks/ runs as `python -m benchmarks.NAME --quick`: a smoke run of seconds on this CPU that
proves the script still works against the code it measures. The modules are discovered, so a new benchmark is run
here too, and fails until it has a --quick mode. Timings are never asserted: benchmarks report ratios, not tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"

# Benchmarks whose --quick run needs inputs that another test builds (a store, videos, a checkpoint), or that have
# a test checking their report in detail: that test runs them with --quick, and they are not run twice.
QUICK_ELSEWHERE = {
    "augmentation_cost": "test_benchmark_augmentation_cost.py",
    "compact": "test_benchmark_compact.py",
    "decode_pool": "test_benchmark_decode_pool.py",
    "gpu_extract": "test_benchmark_gpu_extract.py",
    "gpu_train": "test_benchmark_gpu_train.py",
    "store_write": "test_store_benchmark.py",
}
# gpu.sh's tools, which measure nothing (no --quick, no report): their test runs them as gpu.sh does.
TOOLS = {"gpu_preflight": "test_benchmark_gpu_sh.py", "gpu_wheels": "test_benchmark_gpu_sh.py"}


def benchmark_modules() -> list[str]:
    """Every runnable module of benchmarks/ (the _-prefixed ones are helpers)."""
    return sorted(path.stem for path in BENCHMARKS.glob("*.py") if not path.stem.startswith("_"))


def quick_argv(name: str, tmp_path: Path) -> list[str]:
    """The command-line arguments of a module's smoke run: --quick, and the inputs or outputs it needs."""
    if name == "gpu_summary":  # measures nothing (it gathers gpu.sh's step outputs): an empty output folder
        return [str(tmp_path)]
    if name == "gpu_data":
        return ["--quick", "--out", str(tmp_path / "data")]
    if name == "data_loader":  # its default workdir keeps the store between runs; the test's is its own
        return ["--quick", "--workdir", str(tmp_path / "loader")]
    return ["--quick"]


@pytest.mark.parametrize("name", [name for name in benchmark_modules() if name not in {**QUICK_ELSEWHERE, **TOOLS}])
def test_benchmark_runs_quick_and_reports_json(name, tmp_path):
    done = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *quick_argv(name, tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "DIST_BENCH_TMP": str(tmp_path)})
    if "unrecognized arguments: --quick" in done.stderr:
        pytest.fail(f"benchmarks/{name}.py needs a --quick mode: a smoke run of seconds on a CPU, which this test runs")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON object on stdout, nothing else
    assert isinstance(report, dict) and report


@pytest.mark.parametrize("name", sorted(QUICK_ELSEWHERE))
def test_the_other_quick_runs_are_in_the_suite(name):
    assert name in benchmark_modules(), f"benchmarks/{name}.py is gone: drop it from QUICK_ELSEWHERE"
    source = (ROOT / "tests" / QUICK_ELSEWHERE[name]).read_text()
    assert f'"benchmarks.{name}"' in source and '"--quick"' in source


@pytest.mark.parametrize("name", sorted(TOOLS))
def test_the_tools_are_tested(name):
    assert name in benchmark_modules(), f"benchmarks/{name}.py is gone: drop it from TOOLS"
    assert f"benchmarks.{name}" in (ROOT / "tests" / TOOLS[name]).read_text()


def test_benchmarks_import_the_package_not_a_path():
    """`python -m benchmarks.NAME` finds the project from the repository root: no script edits sys.path."""
    edits = [path.name for path in BENCHMARKS.glob("*.py") if "sys.path" in path.read_text()]
    assert edits == []
