"""Replacing a run's files so that a kill at any moment leaves either the old file or the new one, whole."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from dist_cache.errors import UserError, first_line


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
    nothing but the steps since it."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        why = "disk full"
    elif code == errno.EFBIG:
        why = "file too large (a file-size limit, ulimit -f)"
    elif code == errno.EROFS:
        why = "read-only file system"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied"
    else:
        why = err.strerror or first_line(err)
    return UserError(f"{why} writing {path}: free space (or fix the file system) and rerun with --resume")
