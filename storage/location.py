"""Where a store lives, behind one small byte-level interface (local directory, fsspec URL, zarr Store).

zarr does the metadata and table I/O through its own stores (LocalStore, FsspecStore). Everything zarr
has no API for goes through a `Location`, so the writer and reader never branch on the scheme: shards
written from a sequence of buffers, ranged reads into caller buffers, atomic small JSON records, an
atomic create-if-absent, one listing of the records folder, and removing `*.partial` files a killed
writer left behind.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.abc.store import Store

# zarr's own default (10 concurrent requests per operation) is tuned for neither a local disk nor S3.
# An explicit ZARR_ASYNC__CONCURRENCY in the environment wins (zarr reads it at import).
DEFAULT_ASYNC_CONCURRENCY = 16

PARTIAL_SUFFIX = ".partial"
# The only temp files a writer removes are named as dist-cache's writes (storage/local.py) and zarr's LocalStore
# (zarr >= 3.1.3) name them: `<name>.<uuid4 hex>.partial`, every store's since format 2. A user's `data.tar.partial`
# never matches, so it is never taken for a writer's orphan.
_TEMP_NAME = re.compile(r".*\.[0-9a-f]{12}4[0-9a-f]{3}[89ab][0-9a-f]{15}" + re.escape(PARTIAL_SUFFIX))


def temp_name(name: str) -> str:
    """A new temp file name for `name`, in the writer's own pattern."""
    return f"{name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"


def is_temp_name(name: str) -> bool:
    """Whether a file name is one a dist-cache (or zarr LocalStore) write gives its temp file."""
    return _TEMP_NAME.fullmatch(name) is not None


def is_stale(age_s: float, older_than_s: float) -> bool:
    """Whether a temp file of this age (now minus its mtime) was left by a killed write. A live write's file is
    seconds old; one dated more than `older_than_s` in the future (a clock set wrong, a copy that kept a future
    mtime) would otherwise never age, so it counts as stale too. Clock skew between the machines of a shared file
    system is seconds, far below the threshold (600 s by default)."""
    return age_s >= older_than_s or age_s < -older_than_s


def configure_zarr() -> None:
    """Apply dist-cache's zarr settings once per process, unless the user set them in the environment."""
    if "ZARR_ASYNC__CONCURRENCY" not in os.environ:
        zarr.config.set({"async.concurrency": DEFAULT_ASYNC_CONCURRENCY})


def is_local(url: str | os.PathLike) -> bool:
    """A plain path or a file:// URL is local; anything else with a scheme goes through fsspec."""
    text = os.fspath(url)
    return "://" not in text or text.startswith("file://")


@dataclass(frozen=True)
class StoreUsage:
    """What a store occupies where it lives: every object (file) under its root, and their bytes."""

    objects: int
    bytes: int


class Location:
    """Byte-level access to one store root."""

    url: str

    def zarr_store(self, read_only: bool) -> Store:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        raise NotImplementedError

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        return {key: self.read(key) for key in keys}

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        """Bytes [start, stop) (fewer at the end of the object), or None if it does not exist."""
        data = self.read(key)
        return None if data is None else data[start:stop]

    def read_suffix(self, key: str, nbytes: int) -> bytes | None:
        """The last `nbytes` bytes (all of a shorter object), or None if it does not exist."""
        data = self.read(key)
        return None if data is None else data[-nbytes:]

    def read_into(self, key: str, offset: int, buffers: list[Any]) -> int | None:
        """Fill `buffers` (writable 1-D uint8 arrays) from consecutive bytes starting at `offset`, in one
        request. Returns the bytes filled (fewer at the end of the object), or None if it does not exist."""
        total = sum(len(b) for b in buffers)
        data = self.read_range(key, offset, offset + total)
        if data is None:
            return None
        view, done = memoryview(data), 0
        for buf in buffers:
            n = max(0, min(len(buf), len(data) - done))
            buf[:n] = view[done:done + n]
            done += n
        return len(data)

    def write_atomic(self, key: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a prefix of it."""
        raise NotImplementedError

    def write_parts(self, key: str, parts: Iterable[Any]) -> int:
        """Atomically write the concatenation of `parts` (buffers, produced lazily); returns its size.
        If iterating `parts` raises, nothing is left at `key` and the error propagates."""
        data = b"".join(parts)  # parts are bytes-like (uint8 arrays, bytes): one copy, for one PUT
        self.write_atomic(key, data)
        return len(data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Write `data` at `key` only if nothing is there, atomically; False if something was."""
        raise NotImplementedError

    def list_names(self, prefix: str) -> list[str]:
        """Names directly under `prefix` (no path), [] if the folder does not exist."""
        raise NotImplementedError

    def exists(self) -> bool:
        """Whether anything is at the root (a store, or something else in the way)."""
        raise NotImplementedError

    def prepare_for_writing(self) -> None:
        """Check the root can be written, creating its folder if needed; UserError if not."""
        raise NotImplementedError

    def remove_partials(self, older_than_s: float) -> None:
        """Delete temp files of interrupted atomic writes (`is_temp_name`, `is_stale`)."""

    def usage(self) -> StoreUsage | None:
        """Objects and bytes under the root, from a listing; None where nothing can be listed (HTTP)."""
        return None
