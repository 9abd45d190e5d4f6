"""Where train writes: a read-only run directory to resume, a read-only file system for a fresh run. One line and
exit 2 each, before any work, and nothing written or changed.

Root (which CI runs as) ignores permission bits but not a read-only mount, so the read-only places are tmpfs
mounts remounted read-only; where mounting is not allowed (not root), the permission bits do the same job."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FEATURES_ONLY = ["--no-temporal", "--no-integ-to-temp", "--no-temp-to-integ", "--alpha-dim", "32", "--beta-dim", "16",
                 "--pool-blocks", "1", "--batch-size", "4", "--warmup-epochs", "1", "--epochs", "1", "--device", "cpu",
                 "--decode-workers", "0", "--read-threads", "2"]


@pytest.fixture
def read_only(tmp_path) -> Iterator[tuple[Path, Callable[[], None]]]:
    """A directory to fill, and the function that makes it and everything in it read-only."""
    place = tmp_path / "place"
    place.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(place)], capture_output=True)
    if mounted.returncode == 0:
        yield place, lambda: subprocess.run(["mount", "-o", "remount,ro", str(place)], check=True)
        subprocess.run(["umount", "-l", str(place)], check=True)
        return
    assert os.geteuid() != 0, mounted.stderr

    def seal() -> None:
        for path in [place, *place.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)

    yield place, seal
    for path in [place, *place.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


def invoke(*args: object) -> tuple[int, list[str]]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, [line for line in result.output.splitlines() if line.strip()]


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_a_fresh_run_on_a_read_only_file_system_is_one_line(train_store, read_only):
    place, seal = read_only
    seal()
    code, lines = invoke("train", "--cache", train_store, "--out", place / "runs" / "a", *FEATURES_ONLY)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --out {place / 'runs' / 'a'}: cannot create the run in {place} (")
    assert lines[0].endswith("); pass a writable --out")
    assert list(place.iterdir()) == []


def test_resume_in_a_read_only_run_directory_is_one_line(train_store, read_only):
    place, seal = read_only
    run = place / "run"
    code, lines = invoke("train", "--cache", train_store, "--out", run, *FEATURES_ONLY)
    assert code == 0, lines
    before = digest(run)
    seal()
    code, lines = invoke("train", "--cache", train_store, "--out", run, "--resume", *FEATURES_ONLY)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: --out {run}: cannot write the run directory (") and lines[0].endswith(
        "copy the run to a writable directory and resume that (--out COPY --resume)")
    assert digest(run) == before
