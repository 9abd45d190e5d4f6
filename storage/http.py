"""The HTTP(S) side of remote stores: a range-checked, retrying fsspec filesystem. Stores served over HTTP
are read-only; storage/remote.py's location holds one of these filesystems.

zarr reads a shard's index with a suffix Range request and each inner chunk with a byte Range request.
A server that ignores Range (python's http.server) answers 200 with the whole shard; fsspec passes that
body on unchecked and zarr then fails on a checksum, or worse decodes wrong bytes. So every ranged GET
here must come back as 206 Partial Content, or the read stops with a one-line UserError. (Slicing the
whole body locally would be correct but would download a whole video's shard per chunk, silently.)

Networks and servers fail for a moment (a restart, a dropped connection, a proxy's 502): every GET is
retried after each of RETRY_DELAYS_S, then stops with one line naming the URL and the fix, never a
traceback from aiohttp. Sessions are closed at exit, including those of the asynchronous instances zarr
uses (fsspec closes only its synchronous instances' sessions).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

import aiohttp
from fsspec.implementations.http import HTTPFileSystem

from dist_cache.errors import UserError, first_line

HTTP_SCHEMES = ("http://", "https://")

# Waits before each retry of a failed GET (seconds; 15.5 s in all), enough to ride out a server restart.
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
# Statuses that say "try again" rather than "no": timeouts, rate limits, server and gateway errors.
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# A server that accepts a connection and then says nothing would otherwise hold a read for aiohttp's
# default 5 minutes; a timeout is retried like any other transient failure.
TIMEOUT = {"sock_connect": 20.0, "sock_read": 60.0}

log = logging.getLogger(__name__)


def is_http(url: str) -> bool:
    return url.lower().startswith(HTTP_SCHEMES)


def read_only_error(url: str) -> UserError:
    return UserError(f"cannot write store {url}: HTTP stores are read-only (write to a path or s3://)")


class _Transient(Exception):
    """One GET failed in a way that may pass (the reason is the message)."""


class RangeCheckedHTTPFileSystem(HTTPFileSystem):
    """HTTPFileSystem whose reads are retried on transient failures and whose ranged reads refuse a full (200)
    response instead of returning it as the range."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        client_kwargs = dict(kwargs.pop("client_kwargs", None) or {})
        client_kwargs.setdefault("timeout", aiohttp.ClientTimeout(**TIMEOUT))
        super().__init__(*args, client_kwargs=client_kwargs, **kwargs)

    async def set_session(self) -> aiohttp.ClientSession:
        new = self._session is None
        session = await super().set_session()
        if new and self.asynchronous:
            # The synchronous instances' sessions are closed by fsspec; do the same for the asynchronous ones
            # (zarr's), on the loop they were made in, when the instance goes or at exit.
            weakref.finalize(self, self.close_session, asyncio.get_running_loop(), session)
        return session

    async def _cat_file(self, url: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        waited = 0.0
        for delay in (*RETRY_DELAYS_S, None):
            try:
                return await self._get(url, start, end, **kwargs)
            except _Transient as why:
                if delay is None:
                    tries = len(RETRY_DELAYS_S) + 1
                    raise UserError(f"cannot read {url}: {why} ({tries} tries over {waited:.0f} s); check that the "
                                    f"server is up and reachable from here, then rerun the command") from None
                log.warning("reading %s: %s; retrying in %.1f s", url, why, delay)
                await asyncio.sleep(delay)
                waited += delay
        raise AssertionError("unreachable")

    async def _get(self, url: str, start: int | None, end: int | None, **kwargs: Any) -> bytes:
        """One GET: the body, FileNotFoundError (404), _Transient, or a one-line UserError."""
        kw = {**self.kwargs, **kwargs}
        ranged = not ((start is None and end is None) or start == end)
        if start is not None and start == end:
            return b""
        headers = dict(kw.pop("headers", None) or {})
        if ranged:
            headers["Range"] = await self._process_limits(url, start, end)
        try:
            session = await self.set_session()
            async with session.get(self.encode_url(url), headers=headers, **kw) as r:
                if r.status == 404:
                    raise FileNotFoundError(url)
                if r.status in RETRIED_STATUSES:
                    raise _Transient(f"the server answered HTTP {r.status} {r.reason or ''}".rstrip())
                if r.status >= 400:
                    raise UserError(f"cannot read {url}: the server answered HTTP {r.status} {r.reason or ''}; check "
                                    f"the URL, and pass any credentials it needs with --storage-options "
                                    f"(e.g. '{{\"headers\": {{\"Authorization\": \"...\"}}}}')")
                if ranged and r.status != 206:
                    raise UserError(f"{url}: the server ignored an HTTP Range request (status {r.status}, not 206); "
                                    f"serve the store from a server that supports HTTP Range requests")
                return await r.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as err:
            raise _Transient(f"{type(err).__name__}: {first_line(err, 120)}") from None
