"""Replacing a run's files so that a kill at any moment leaves either the old file or the new one, whole."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from dist_cache.errors import UserError, first_line

# What an errno met while writing a run's file means, in the words of `write_failure`'s line.
WRITE_FAILURES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk full",
                  errno.EFBIG: "file too large (a file-size limit, ulimit -f)", errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], object], *, fsync: bool = False) -> Path:
    """Write through `write(tmp)` into a temporary sibling of `path`, then rename it over `path`.

    `fsync` also forces the bytes to disk before the rename, for files worth a crash of the machine
    (checkpoints), not just of the process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_failure(path: str | os.PathLike, err: OSError) -> UserError:
    """One line for an OSError while writing a run's file (checkpoint, metrics, plot): what happened and what to
    do. The run's last checkpoint is whole (files are replaced atomically), so a rerun with --resume loses
    nothing but the steps since it; before the run's first last.pt there is nothing to resume, and the rerun is
    the same command without --resume."""
    why = WRITE_FAILURES.get(err.errno) or err.strerror or first_line(err)
    if (Path(path).parent / "last.pt").is_file():
        rerun = "rerun with --resume"
    else:
        rerun = "rerun the same command (without --resume: the run has no last.pt yet)"
    return UserError(f"{why} writing {path}: free space (or fix the file system) and {rerun}")


def unwritable(directory: str | os.PathLike) -> str | None:
    """Why nothing can be created in the existing `directory`, or None if it can. access(2) answers for the mount
    (a read-only file system refuses root too) and for the permission bits (which root bypasses)."""
    if os.access(directory, os.W_OK | os.X_OK):
        return None
    with contextlib.suppress(OSError):
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    return "permission denied"


def check_run_dir(out: str | os.PathLike, resume: bool) -> None:
    """`train --out`: a directory that can be created, or written in (its existing files too, for --resume).
    Checked before the run writes anything (its config.toml, lock, metrics)."""
    out = Path(out)
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"--out {out}: {existing} is a file, not a directory; pass another --out")
    why = unwritable(existing)
    files = [out / name for name in ("last.pt", "metrics.jsonl", "train.lock", "config.toml")]
    if why is None and resume:
        why = next((f"{f.name} is read-only" for f in files if f.exists() and not os.access(f, os.W_OK)), None)
    if why is None:
        return
    if resume:
        raise UserError(f"--out {out}: cannot write the run directory ({why}): --resume writes its lock, metrics and "
                        "checkpoints there; copy the run to a writable directory and resume that (--out COPY "
                        "--resume)")
    raise UserError(f"--out {out}: cannot create the run in {existing} ({why}); pass a writable --out")
