"""Read-only stores served over HTTP(S).

zarr reads a shard's index with a suffix Range request and each inner chunk with a byte Range request.
A server that ignores Range (python's http.server) answers 200 with the whole shard; fsspec passes that
body on unchecked and zarr then fails on a checksum, or worse decodes wrong bytes. So every ranged GET
here must come back as 206 Partial Content, or the read stops with a one-line UserError. (Slicing the
whole body locally would be correct but would download a whole video's shard per chunk, silently.)
"""

from __future__ import annotations

from typing import Any

from fsspec.implementations.http import HTTPFileSystem
from zarr.abc.store import Store
from zarr.storage import FsspecStore

from dist_cache.errors import UserError
from storage.remote import FsspecLocation

HTTP_SCHEMES = ("http://", "https://")


def is_http(url: str) -> bool:
    return url.lower().startswith(HTTP_SCHEMES)


class RangeCheckedHTTPFileSystem(HTTPFileSystem):
    """HTTPFileSystem whose ranged reads refuse a full (200) response instead of returning it as the range."""

    async def _cat_file(self, url: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        if (start is None and end is None) or start == end:
            return await super()._cat_file(url, start, end, **kwargs)
        kw = {**self.kwargs, **kwargs}
        headers = {**kw.pop("headers", {}), "Range": await self._process_limits(url, start, end)}
        session = await self.set_session()
        async with session.get(self.encode_url(url), headers=headers, **kw) as r:
            self._raise_not_found_for_status(r, url)
            if r.status != 206:
                raise UserError(f"{url}: the server ignored an HTTP Range request (status {r.status}, not 206); "
                                f"serve the store from a server that supports HTTP Range requests")
            return await r.read()


class HTTPLocation(FsspecLocation):
    """An HTTP(S) store: read-only, and not listable, so it must be complete (consolidated)."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None) -> None:
        self.url = url.rstrip("/")
        self.storage_options = dict(storage_options or {})
        self.fs = RangeCheckedHTTPFileSystem(**self.storage_options)
        self.path = self.url

    def zarr_store(self, read_only: bool) -> Store:
        if not read_only:
            raise UserError(f"cannot write store {self.url}: HTTP stores are read-only (write to a path or s3://)")
        fs = RangeCheckedHTTPFileSystem(asynchronous=True, **self.storage_options)
        return FsspecStore(fs, read_only=True, path=self.url)

    def prepare_for_writing(self) -> None:
        raise UserError(f"cannot write store {self.url}: HTTP stores are read-only (write to a path or s3://)")
