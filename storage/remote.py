"""Stores behind fsspec URLs (s3://, memory://, http(s)://) or an existing zarr Store, and `open_location`,
which picks the Location for a path or URL."""

from __future__ import annotations

import atexit
import os
import weakref
from typing import Any

from zarr.abc.store import RangeByteRequest, Store, SuffixByteRequest
from zarr.storage import FsspecStore

from storage.http import RangeCheckedHTTPFileSystem, is_http, read_only_error
from storage.local import LocalLocation
from storage.location import Location, StoreUsage, is_local

# Closers of the clients of the asynchronous filesystems zarr reads and writes through. fsspec closes the sessions
# of synchronous instances only, so s3fs's asynchronous ones were left open ("Unclosed client session"). (HTTP's
# are closed by storage/http.py's filesystem itself.)
_CLOSERS: list[weakref.finalize] = []


def _close_client_with(fs: Any) -> None:
    """Close `fs`'s client when `fs` goes, or at exit. The closer holds the instance's attribute dict, not the
    instance: s3fs creates its client there lazily, on zarr's event loop."""
    _CLOSERS.append(weakref.finalize(fs, _close_client, fs.__dict__))


def _close_client(attributes: dict[str, Any]) -> None:
    """Exit s3fs's client context on zarr's event loop, as s3fs does for its own synchronous instances."""
    from zarr.core.sync import sync

    client = attributes.pop("_s3creator", None)
    if client is None:
        return
    try:
        sync(client.__aexit__(None, None, None), timeout=1.0)
    except Exception:  # noqa: BLE001 - a loop or a server already gone leaves nothing to close politely
        pass


@atexit.register
def _close_clients_at_exit() -> None:
    """Registered after zarr's own exit handler (this module imports zarr), so it runs while zarr's loop still
    does; a closer runs once."""
    for closer in _CLOSERS:
        closer()


class FsspecLocation(Location):
    """A store behind an fsspec URL. Over HTTP(S) the filesystem is storage/http.py's range-checked, retrying
    one, and the store is read-only (and cannot be listed, so it must be complete)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        import fsspec

        self.storage_options = dict(storage_options or {})
        self.writable = not is_http(url)
        # A synchronous filesystem for our own requests; zarr gets its own asynchronous one (zarr_store).
        if self.writable:
            self.url = url
            self.fs, path = fsspec.core.url_to_fs(url, **self.storage_options)
            self.path = path.rstrip("/")
        else:
            self.url = self.path = url.rstrip("/")
            self.fs = RangeCheckedHTTPFileSystem(**self.storage_options)

    def zarr_store(self, read_only: bool) -> Store:
        if self.writable:
            store = FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)
            if not any(closer.peek() and closer.peek()[0] is store.fs for closer in _CLOSERS):
                _close_client_with(store.fs)  # fsspec caches instances: the same one may come back
            return store
        if not read_only:
            raise read_only_error(self.url)
        fs = RangeCheckedHTTPFileSystem(asynchronous=True, **self.storage_options)
        return FsspecStore(fs, read_only=True, path=self.url)

    def _full(self, key: str) -> str:
        return f"{self.path}/{key}"

    def _cat(self, key: str, **byte_range: int) -> bytes | None:
        try:
            return self.fs.cat_file(self._full(key), **byte_range)
        except FileNotFoundError:
            return None

    def read(self, key: str) -> bytes | None:
        return self._cat(key)

    def read_range(self, key: str, start: int, stop: int) -> bytes | None:
        return self._cat(key, start=start, end=stop)

    def read_suffix(self, key: str, nbytes: int) -> bytes | None:
        return self._cat(key, start=-nbytes)  # a suffix request ("bytes=-n"): one GET, no HEAD for the size

    def read_many(self, keys: list[str]) -> dict[str, bytes | None]:
        if not keys:
            return {}
        # One batched call: async filesystems (s3fs, http) fetch these concurrently. Errors come back as values:
        # a missing object is None, anything else (a network failure) is raised, never taken for "missing".
        got = self.fs.cat([self._full(k) for k in keys], on_error="return")
        out = {}
        for key in keys:
            value = got[self._full(key)]
            if isinstance(value, BaseException) and not isinstance(value, FileNotFoundError):
                raise value
            out[key] = value if isinstance(value, bytes) else None
        return out

    def _check_writable(self) -> None:
        if not self.writable:
            raise read_only_error(self.url)

    def write_atomic(self, key: str, data: bytes) -> None:
        self._check_writable()
        # An object-store PUT is atomic: the object appears whole or not at all.
        self.fs.pipe_file(self._full(key), data)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        # s3fs sends mode="create" as a conditional PUT (If-None-Match: *), which S3 applies atomically, and
        # raises FileExistsError for its 412; other fsspec filesystems check for the object first, which is
        # not atomic (storage/README.md says what holds there).
        self._check_writable()
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
        self._check_writable()

    def usage(self) -> StoreUsage | None:
        if not self.writable:
            return None  # HTTP has no listing
        found = self.fs.find(self.path, detail=True)
        return StoreUsage(len(found), sum(int(info.get("size") or 0) for info in found.values()))


def open_location(url: str | os.PathLike, storage_options: dict[str, Any] | None = None) -> Location:
    """The Location of a path or URL. `storage_options` are fsspec's, for URLs; a local path needs none, so they
    are not used for one (a run may read a local store and a remote one with the same options)."""
    if is_local(url):
        return LocalLocation(url)
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
