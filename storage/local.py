"""A store in a local directory: temp-file-and-rename writes that overlap checksumming with the disk,
and ranged reads straight into the caller's buffers (os.preadv: no intermediate copy)."""

from __future__ import annotations

import concurrent.futures
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.store import Store
from zarr.storage import LocalStore

from dist_cache.errors import UserError
from storage.location import Location, StoreUsage, is_stale, is_temp_name, temp_name

# Parts are gathered into writes of at least this many bytes: large enough that a syscall's cost is
# noise, small enough that producing the next batch (checks, checksums) overlaps the write of this one.
WRITE_BATCH_BYTES = 1 << 20
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

T = TypeVar("T")

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads that run the pwritev calls (they release the GIL), shared by every writer of the process."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="store-io")
        return _pool


def _forget_pool() -> None:
    global _pool
    _pool = None  # a forked child has no threads: it makes its own pool


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _vectored(call: Any, fd: int, buffers: list[Any], offset: int) -> int:
    """Repeat os.preadv or os.pwritev from `offset` until every buffer is done or a call moves nothing (the end
    of the file); returns the bytes moved. One call may move fewer: at the end of a file, near a size limit."""
    views = [memoryview(b).cast("B") for b in buffers]
    done = 0
    while views:
        n = call(fd, views[:IOV_MAX], offset + done)
        if n == 0:
            break
        done += n
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if n:
            views[0] = views[0][n:]
    return done


def _pwrite_all(fd: int, parts: list[Any], offset: int) -> None:
    if _vectored(os.pwritev, fd, parts, offset) < sum(memoryview(p).nbytes for p in parts):
        raise OSError("pwritev wrote nothing")


def _drain(fd: int, batches: queue.SimpleQueue, stop: threading.Event) -> None:
    """Write queued (parts, offset) batches in order until the None sentinel, or until told to stop."""
    while (item := batches.get()) is not None:
        if not stop.is_set():
            _pwrite_all(fd, *item)


def _write_pipelined(fd: int, parts: Iterable[Any]) -> int:
    """Write the parts back to back from offset 0. This thread produces them (checks, checksums) and queues
    them in batches; one I/O thread writes the queue in order, so the file sees one sequential writer, as with
    a plain write, and producing overlaps writing on separate cores. Neither side waits on the other per
    batch (a cross-core wake-up costs a few hundred microseconds on a VM); parts are views of the caller's
    arrays, so the queue costs no memory."""
    batches: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    writer = _io_pool().submit(_drain, fd, batches, stop)
    batch: list[Any] = []
    batch_bytes = offset = 0
    try:
        for part in parts:
            batch.append(part)
            batch_bytes += memoryview(part).nbytes
            if batch_bytes >= WRITE_BATCH_BYTES or len(batch) >= IOV_MAX:
                batches.put((batch, offset))
                offset, batch, batch_bytes = offset + batch_bytes, [], 0
                if writer.done():
                    break  # the writer failed (disk full...): its error is raised below
        batches.put((batch, offset))
        offset += batch_bytes
    except BaseException:
        stop.set()  # producing failed (e.g. a NaN): drop what is queued, the caller removes the file
        raise
    finally:
        batches.put(None)
        # Never leave a write running on a descriptor the caller is about to close.
        concurrent.futures.wait([writer])
    writer.result()
    return offset


class LocalLocation(Location):
    def __init__(self, url: str | os.PathLike) -> None:
        text = os.fspath(url)
        self.url = text
        self.root = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()

    def zarr_store(self, read_only: bool) -> Store:
        # LocalStore writes every key as `<key>.<uuid>.partial` then renames it (zarr >= 3.1.3), so a
        # metadata or table file on disk is always whole, even after kill -9; shards are written below
        # with the same temp naming, so one sweep removes both kinds of orphan.
        return LocalStore(self.root, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        # Threads overlap the per-file open/read latency, which dominates on network file systems.
        if len(keys) < 64:
            return {key: self.read(key) for key in keys}
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return dict(zip(keys, pool.map(self.read, keys)))

    def _with_file(self, key: str, use: Callable[[int], T]) -> T | None:
        """use(fd) on the object's file, opened for reading and closed after; None where there is no such file."""
        try:
            fd = os.open(self.root / key, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        try:
            return use(fd)
        finally:
            os.close(fd)

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        return self._with_file(key, lambda fd: os.pread(fd, max(0, stop - start), start))

    def read_suffix(self, key: str, nbytes: int) -> bytes | None:
        def suffix(fd: int) -> bytes:
            size = os.fstat(fd).st_size
            return os.pread(fd, min(nbytes, size), max(0, size - nbytes))

        return self._with_file(key, suffix)

    def read_into(self, key: str, offset: int, buffers: list[Any]) -> int | None:
        # Short: a truncated object.
        return self._with_file(key, lambda fd: _vectored(os.preadv, fd, buffers, offset))

    def _temp_path(self, key: str) -> Path:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.with_name(temp_name(path.name))

    def write_atomic(self, key: str, data: bytes) -> None:
        self.write_parts(key, [data])

    def write_parts(self, key: str, parts: Iterable[Any]) -> int:
        tmp = self._temp_path(key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            try:
                size = _write_pipelined(fd, parts)
            finally:
                os.close(fd)
            os.replace(tmp, self.root / key)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # Written whole under a temp name, then hard-linked to its name: link fails if the name exists,
        # so of several concurrent creators exactly one wins, and nobody ever sees a partial file.
        tmp = self._temp_path(key)
        try:
            tmp.write_bytes(data)
            os.link(tmp, self.root / key)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def list_names(self, prefix: str) -> list[str]:
        try:
            with os.scandir(self.root / prefix) as entries:
                return [entry.name for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def exists(self) -> bool:
        return self.root.exists()

    def prepare_for_writing(self) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"cannot write store {self.url}: it exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        # A real write, not os.access: root ignores permission bits, read-only mounts do not.
        probe = self.root / temp_name(".write-probe")
        probe.write_bytes(b"")
        probe.unlink()

    def usage(self) -> StoreUsage:
        objects = size = 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                try:
                    size += (Path(dirpath) / name).stat().st_size
                    objects += 1
                except FileNotFoundError:
                    pass  # removed meanwhile (a writer's temp file)
        return StoreUsage(objects, size)

    def remove_partials(self, older_than_s: float) -> None:
        # Only old ones: a concurrent writer's in-flight temp file is young, and deleting it would
        # make that writer's rename fail. Only the writers' own names: never a user's `*.partial`.
        now = time.time()
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not is_temp_name(name):
                    continue
                path = Path(dirpath) / name
                try:
                    if is_stale(now - path.stat().st_mtime, older_than_s):
                        path.unlink()
                except FileNotFoundError:
                    pass  # renamed or removed by its writer meanwhile
