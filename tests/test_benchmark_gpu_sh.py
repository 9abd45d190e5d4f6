"""benchmarks/gpu.sh spends no device time on a run that cannot work: its preflight names every missing package and
stops the script before any step (a package is hidden by a sitecustomize, as on a lent machine without it), within
its budget a step that cannot fit is skipped, an interrupted run reports through its exit trap; and the wheels it
carries are derived from pyproject.toml. The whole script is smoke-tested by `QUICK=1 bash benchmarks/gpu.sh`
(benchmarks/RESULTS.md), minutes on this CPU: too long for the suite."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from packaging.utils import canonicalize_name

from benchmarks.gpu_summary import STEPS

ROOT = Path(__file__).resolve().parent.parent
BLOCKED = ("aiohttp", "decord")

# Hides BLOCKED from this Python as if they were not installed, and records on exit which heavy modules were
# imported: the preflight must decide before importing torch.
SITECUSTOMIZE = f"""
import atexit, os, sys
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
def _record():
    with open(os.environ["IMPORT_LOG"], "a") as f:
        torch = "imported" if "torch" in sys.modules else "not imported"
        f.write(os.path.basename(sys.argv[0]) + ": torch " + torch + "\\n")
atexit.register(_record)
"""


def _env(tmp_path: Path, hide: bool, **extra: str) -> dict[str, str]:
    env = {**os.environ, "QUICK": "1", "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"),
           "WHEELS": str(tmp_path / "no-wheels"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           **extra}
    if hide:
        (tmp_path / "hide").mkdir()
        (tmp_path / "hide" / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env.update(PYTHONPATH=str(tmp_path / "hide"), IMPORT_LOG=str(tmp_path / "imports.log"))
    return env


def test_the_preflight_names_each_missing_package_before_importing_anything_heavy(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_preflight"], cwd=ROOT, capture_output=True,
                          text=True, env=_env(tmp_path, hide=True), timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["missing: decord (pip: decord)", "missing: aiohttp (pip: aiohttp)"]
    assert "2 package(s) missing" in lines[2] and "benchmarks.gpu_wheels" in lines[2]
    assert (tmp_path / "imports.log").read_text().splitlines() == ["gpu_preflight.py: torch not imported"]
    ok = subprocess.run([sys.executable, "-m", "benchmarks.gpu_preflight"], cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0 and ok.stdout.startswith("preflight: ok"), ok.stdout + ok.stderr


def test_gpu_sh_stops_before_any_step_when_a_package_is_missing(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(tmp_path, hide=True), timeout=300)
    out = tmp_path / "out"
    assert done.returncode == 2, done.stdout + done.stderr
    log = (out / "gpu.log").read_text()
    assert "missing: aiohttp (pip: aiohttp)" in log and "preflight failed: no step was run" in log
    assert not list(out.glob("*.rc")) and not (tmp_path / "work" / "data").exists()
    summary = json.loads((out / "gpu.json").read_text())  # written by the exit trap
    assert summary["preflight"][0] == "missing: decord (pip: decord)"
    assert all(step["exit"] is None for step in summary["steps"].values())


def test_steps_that_do_not_fit_the_budget_are_skipped_and_reported(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=ROOT, capture_output=True, text=True,
                          env=_env(tmp_path, hide=False, BUDGET="1"), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert summary["preflight"][-1].startswith("preflight: ok")
    assert [step["exit"] for step in summary["steps"].values()] == ["skipped"] * len(STEPS)
    assert "data: skipped" in (tmp_path / "out" / "gpu.log").read_text()


def test_an_interrupted_run_stops_its_step_and_still_reports(tmp_path):
    log = tmp_path / "out" / "gpu.log"
    proc = subprocess.Popen(["bash", "benchmarks/gpu.sh"], cwd=ROOT, env=_env(tmp_path, hide=False),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (log.exists() and "data: start" in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text() if log.exists() else ""
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143
    finally:
        leftover = subprocess.run(["pgrep", "-f", str(tmp_path / "work")], capture_output=True, text=True).stdout
        with contextlib.suppress(ProcessLookupError):  # whatever the run left, e.g. a pool's workers, goes now
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "interrupted: stopping the step in progress" in text and "done (exit 143)" in text
    summary = json.loads((tmp_path / "out" / "gpu.json").read_text())
    assert summary["steps"]["data"]["exit"] is None and summary["preflight"][-1].startswith("preflight: ok")
    assert leftover == "", leftover  # the step's process went with it


def test_the_carried_wheels_are_derived_from_pyproject():
    from packaging.requirements import Requirement

    from benchmarks.gpu_preflight import MODULES, PACKAGES
    from benchmarks.gpu_wheels import (
        MACHINE_HAS,
        RUN_SKIPS,
        dependency_tree,
        pip_command,
        project_dependencies,
        wheel_set,
    )

    wheels = wheel_set()
    there = dependency_tree([Requirement(name) for name in MACHINE_HAS])
    assert {"open-clip-torch", "decord", "av", "zarr", "numcodecs", "crc32c", "aiohttp", "ftfy"} <= set(wheels)
    assert not {"torch", "numpy", "timm", "huggingface-hub", "s3fs", "botocore", "dask", "distributed"} & set(wheels)
    # Every dependency of the project is accounted for: carried, on the machine, or never imported by the run.
    for req in project_dependencies():
        name = canonicalize_name(req.name)
        assert name in wheels or name in there or name in {canonicalize_name(n) for n in RUN_SKIPS}, name
    # Every package the run imports is carried or on the machine.
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    for module in PACKAGES:
        assert {canonicalize_name(d) for d in providers[module]} & (set(wheels) | set(there)), module
    # What is skipped is indeed never imported by the run's modules.
    probe = ("import importlib, sys; from benchmarks.gpu_preflight import MODULES\n"
             "[importlib.import_module(m) for m in MODULES]\n"
             "print(sorted(m for m in ('dask', 'distributed', 's3fs', 'requests', 'botocore', 'tomli') "
             "if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
    assert len(MODULES) > 10
    command = pip_command(wheels, Path(".whl"))
    assert command[3:6] == ["download", "--no-deps", "--only-binary=:all:"] and "3.12" in command
    assert all(f"{name}=={version}" in command for name, version in wheels.items())
