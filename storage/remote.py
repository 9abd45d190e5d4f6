"""Stores behind fsspec URLs (s3://, memory://, http(s):// via storage/http.py) or an existing zarr Store,
and `open_location`, which picks the Location for a path or URL."""

from __future__ import annotations

import os
from typing import Any

from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.storage import FsspecStore

from storage.local import LocalLocation
from storage.location import Location, is_local


class FsspecLocation(Location):
    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        import fsspec

        self.url = url
        self.storage_options = dict(storage_options or {})
        # A synchronous filesystem for our own requests; zarr builds its own async one.
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

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(key), start=start, end=stop)
        except FileNotFoundError:
            return None

    def read_suffix(self, key: str, nbytes: int) -> bytes | None:
        # A suffix request ("bytes=-n"): one GET, no HEAD for the size.
        try:
            return self.fs.cat_file(self._full(key), start=-nbytes)
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

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # s3fs sends mode="create" as a conditional PUT (If-None-Match: *), which S3 applies atomically, and
        # raises FileExistsError for its 412; other fsspec filesystems check for the object first, which is
        # not atomic (storage/README.md says what holds there).
        try:
            self.fs.pipe_file(self._full(key), data, mode="create")
        except FileExistsError:
            return False
        return True

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

    def _get(self, key: str, byte_range: Any = None) -> bytes | None:
        buf = self._sync(self._store.get(key, prototype=self._proto, byte_range=byte_range))
        return None if buf is None else buf.to_bytes()

    def read(self, key: str) -> bytes | None:
        return self._get(key)

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        return self._get(key, RangeByteRequest(start, stop))

    def read_suffix(self, key: str, nbytes: int) -> bytes | None:
        return self._get(key, SuffixByteRequest(nbytes))

    def list_names(self, prefix: str) -> list[str]:
        async def collect() -> list[str]:
            return [name async for name in self._store.list_dir(prefix)]

        return self._sync(collect())

    def exists(self) -> bool:
        return self.read("zarr.json") is not None
