"""Replacing a run's files so that a kill at any moment leaves either the old file or the new one, whole."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


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
