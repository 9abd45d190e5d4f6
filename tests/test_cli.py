"""The console entry point as a user meets it: every mistake is one line on stderr and exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def dist_cache(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, says",
    [
        (["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr", "--frames", "0"], "--frames"),
        (["extract", "--manifest", "m.csv", "--video-root", ".", "--out", "o.zarr", "--scale", "0.5"], "--scale"),
        (["train", "--cache", "c.zarr", "--video-root", ".", "--out", "run", "--gamma", "3"], "--gamma"),
        (["extract", "--no-such-flag"], "--no-such-flag"),
        (["no-such-command"], "no-such-command"),
        (["info", "/nonexistent/store.zarr"], "no dist-cache store"),
    ],
)
def test_mistakes_are_one_line_and_exit_2(args, says):
    result = dist_cache(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_help_and_version_exit_0():
    assert dist_cache("--help").returncode == 0 and "extract" in dist_cache("--help").stdout
    version = dist_cache("--version")
    assert version.returncode == 0 and "version" in version.stdout
