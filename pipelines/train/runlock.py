"""One training process per run directory: RUN/train.lock, held for the run's life.

Two `train` processes on one run directory (a `--resume` started beside a run still going, or beside orphaned
ranks) would interleave their writes into metrics.jsonl and overwrite each other's checkpoints. The lock is an
exclusive `flock` on RUN/train.lock: the kernel releases it when its holder dies, kill -9 included, so a stale
lock (its holder gone) is simply taken over, and a live one is never taken. The file holds the holder's pid,
host and start time, for the message that names who holds it. It is never deleted (deleting a lock file
another process is about to lock is a race); on a file system without working flock, two runs are not kept
apart.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from dist_cache.errors import UserError

LOCK_NAME = "train.lock"


class RunLock:
    """The run directory's lock, held from `acquire` until `release` (or this process's death)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise a one-line UserError naming the process that holds it."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # a read-only or foreign run directory (train's preflight checks it first)
            raise UserError(f"run directory {self.path.parent}: cannot open its lock {self.path.name} "
                            f"({err.strerror or err}); train needs a writable run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read_holder(fd))
            os.close(fd)
            raise UserError(f"run directory {self.path.parent} is in use by {holder}; wait for that run to end or "
                            f"stop it (a second train or --resume on it would interleave their writes)") from None
        except BaseException:
            os.close(fd)
            raise
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # being rewritten by its new holder this instant
        return {}
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    return f"pid {holder['pid']} on {holder.get('host', '?')} (started {holder.get('started', '?')})"
