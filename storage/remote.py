"""Where a store lives: a local directory or an fsspec URL, behind one small interface.

zarr does the array I/O through its own stores (LocalStore, FsspecStore). The few things zarr has no
API for (atomic small JSON records, one listing of the records folder, removing `*.partial` files a
killed writer left behind) go through a `Location`, so the writer and reader never branch on the scheme.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from dist_cache.errors import UserError

# zarr's own default (10 concurrent requests per operation) is tuned for neither a local disk nor S3.
# One sample is L inner chunks (12 for ViT-B) and a remote GET costs ~50 ms of latency, so 16 lets a
# whole-sample read go out in one wave without swamping a dask worker that runs several threads.
# An explicit ZARR_ASYNC__CONCURRENCY in the environment wins (zarr reads it at import).
DEFAULT_ASYNC_CONCURRENCY = 16

PARTIAL_SUFFIX = ".partial"


def configure_zarr() -> None:
    """Apply dist-cache's zarr settings once per process, unless the user set them in the environment."""
    if "ZARR_ASYNC__CONCURRENCY" not in os.environ:
        zarr.config.set({"async.concurrency": DEFAULT_ASYNC_CONCURRENCY})


def is_local(url: str | os.PathLike) -> bool:
    """A plain path or a file:// URL is local; anything else with a scheme goes through fsspec."""
    text = os.fspath(url)
    return "://" not in text or text.startswith("file://")


def display_name(url: str | os.PathLike) -> str:
    """What messages call the store: the path or URL as the user typed it."""
    return os.fspath(url)


class Location:
    """Byte-level access to one store root: atomic puts, gets, listings, and a zarr store over it."""

    url: str

    def zarr_store(self, read_only: bool) -> Store:
        raise NotImplementedError

    def read(self, key: str) -> bytes | None:
        """The object's bytes, or None if it does not exist."""
        raise NotImplementedError

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        return {key: self.read(key) for key in keys}

    def write_atomic(self, key: str, data: bytes) -> None:
        """Readers see the old object or the whole new one, never a prefix of it."""
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

    def remove_partials(self, older_than_s: float) -> list[str]:
        """Delete temp files of interrupted atomic writes; return their keys."""
        return []


class LocalLocation(Location):
    def __init__(self, url: str | os.PathLike) -> None:
        text = os.fspath(url)
        self.url = text
        self.root = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()

    def zarr_store(self, read_only: bool) -> Store:
        # LocalStore writes every key as `<key>.<uuid>.partial` then renames it (zarr >= 3.1.3), so a
        # shard on disk is always a whole shard, even after kill -9.
        return LocalStore(self.root, read_only=read_only)

    def read(self, key: str) -> bytes | None:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        # Threads overlap the per-file open/read latency, which dominates on network file systems.
        from concurrent.futures import ThreadPoolExecutor

        if len(keys) < 64:
            return {key: self.read(key) for key in keys}
        with ThreadPoolExecutor(16) as pool:
            return dict(zip(keys, pool.map(self.read, keys)))

    def write_atomic(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        # Same temp naming as LocalStore, so one sweep removes both kinds of orphan.
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

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
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            # A real write, not os.access: root ignores permission bits, read-only mounts do not.
            probe = self.root / f".write-probe.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"cannot write store {self.url}: {exc.strerror or exc}") from None

    def remove_partials(self, older_than_s: float) -> list[str]:
        # Only old ones: a concurrent writer's in-flight temp file is young, and deleting it would
        # make that writer's rename fail.
        cutoff = time.time() - older_than_s
        removed = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.endswith(PARTIAL_SUFFIX):
                    continue
                path = Path(dirpath) / name
                try:
                    if path.stat().st_mtime <= cutoff:
                        path.unlink()
                        removed.append(path.relative_to(self.root).as_posix())
                except FileNotFoundError:
                    pass  # renamed or removed by its writer meanwhile
        return sorted(removed)


class FsspecLocation(Location):
    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        import fsspec

        self.url = url
        self.storage_options = dict(storage_options or {})
        # A synchronous filesystem for our own small requests; zarr builds its own async one.
        self.fs, self.path = fsspec.core.url_to_fs(url, **self.storage_options)
        self.path = self.path.rstrip("/")

    def zarr_store(self, read_only: bool) -> Store:
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)

    def _full(self, key: str) -> str:
        return f"{self.path}/{key}"

    def read(self, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(key))
        except FileNotFoundError:
            return None

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        # One batched call: async filesystems (s3fs, http) fetch these concurrently.
        got = self.fs.cat([self._full(k) for k in keys], on_error="return")
        return {k: (v if isinstance(v, bytes) else None) for k, v in zip(keys, (got[self._full(k)] for k in keys))}

    def write_atomic(self, key: str, data: bytes) -> None:
        # An object-store PUT is atomic: the object appears whole or not at all.
        self.fs.pipe_file(self._full(key), data)

    def list_names(self, prefix: str) -> list[str]:
        # Listings must be fresh: other writers keep adding records, and fsspec caches directories.
        self.fs.invalidate_cache(self._full(prefix))
        try:
            entries = self.fs.ls(self._full(prefix), detail=False)
        except FileNotFoundError:
            return []
        return [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]

    def exists(self) -> bool:
        return bool(self.fs.exists(self.path))

    def prepare_for_writing(self) -> None:
        # Object stores have no folders to create, and probing would leave an object behind on
        # stores without delete rights; the first real write reports a permission problem instead.
        return None


def open_location(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Location:
    if is_local(url):
        if storage_options:
            raise ValueError("storage_options apply to fsspec URLs only, not to local paths")
        return LocalLocation(url)
    from storage.http import HTTPLocation, is_http  # imports this module

    if is_http(os.fspath(url)):
        return HTTPLocation(os.fspath(url), storage_options)
    return FsspecLocation(os.fspath(url), storage_options)


class ZarrStoreLocation(Location):
    """Read access through an already-built zarr Store (a wrapper, an ObjectStore...): reader only."""

    def __init__(self, store: Store) -> None:
        from zarr.core.buffer import default_buffer_prototype
        from zarr.core.sync import sync

        self._store, self._sync, self._proto = store, sync, default_buffer_prototype()
        self.url = repr(store)

    def zarr_store(self, read_only: bool) -> Store:
        if not read_only:
            raise ValueError("a zarr Store object can only be opened for reading; pass a path or URL to write")
        return self._store

    def read(self, key: str) -> bytes | None:
        buf = self._sync(self._store.get(key, prototype=self._proto))
        return None if buf is None else buf.to_bytes()

    def list_names(self, prefix: str) -> list[str]:
        async def collect() -> list[str]:
            return [name async for name in self._store.list_dir(prefix)]

        return self._sync(collect())

    def exists(self) -> bool:
        return self.read("zarr.json") is not None
