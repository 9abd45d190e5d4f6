"""The HTTP(S) side of remote stores: a retrying fsspec filesystem with one deadline per read, which reads whole
objects from servers without Range support. Stores served over HTTP are read-only; storage/remote.py's location
holds one of these filesystems.

zarr reads a shard's index with a suffix Range request and each inner chunk with a byte Range request; the reader
reads a sample's layers with one Range request. A server that ignores Range (python's `http.server`, the most common
way to share a folder) answers 200 with the whole object; fsspec would pass that body on as if it were the range.
Here a 200 to a ranged GET is taken for what it is: the range is cut from the whole body, the body is kept (whole
objects up to WHOLE_OBJECT_CACHE_MB per process, least recently used first out) so the next read of the same shard
costs nothing, and one warning per server says what a Range-capable server would save.

Networks and servers fail for a moment (a restart, a dropped connection, a proxy's 502): a GET is retried after each
of RETRY_DELAYS_S, within one deadline (DEADLINE_S, the `retry_deadline_s` storage option) that bounds the whole
read, connect and read waits included: a frozen server (SIGSTOP, a dead NAT) that accepts connections and never
answers stops the read after the deadline, with one line naming the URL and the fix, never a traceback from aiohttp.
Sessions are closed at exit, including those of the asynchronous instances zarr uses (fsspec closes only its
synchronous instances' sessions).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from fsspec.implementations.http import HTTPFileSystem

from dist_cache.errors import UserError, first_line

HTTP_SCHEMES = ("http://", "https://")

# Waits before each retry of a failed GET (seconds; 15.5 s in all), enough to ride out a server restart.
RETRY_DELAYS_S: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
# Statuses that say "try again" rather than "no": timeouts, rate limits, server and gateway errors.
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The most one read may take, its tries, their connect and read waits and the waits between them together
# (seconds): the retries' 15.5 s plus time for the tries. Each try's connect and read timeouts are what is left
# of it (never more than TIMEOUT's), so a server that accepts a connection and then says nothing, which would
# otherwise hold each try for a minute, ends the read at the deadline. A transfer that keeps receiving bytes is
# not cut: the read timeout is the longest silence. Set per store with the `retry_deadline_s` storage option.
DEADLINE_S = 20.0
DEADLINE_OPTION = "retry_deadline_s"
TIMEOUT = {"sock_connect": 20.0, "sock_read": 60.0}
# Whole objects kept per process from servers that ignore Range (MB), the `whole_object_cache_mb` storage option:
# a sample's read then costs its shard's download once, not once per read (index, then layers). An object larger
# than this is streamed instead, keeping only the bytes asked for (each read downloads up to its end).
WHOLE_OBJECT_CACHE_MB = 512
CACHE_OPTION = "whole_object_cache_mb"

log = logging.getLogger(__name__)


def is_http(url: str) -> bool:
    return url.lower().startswith(HTTP_SCHEMES)


def read_only_error(url: str) -> UserError:
    return UserError(f"cannot write store {url}: HTTP stores are read-only (write to a path or s3://)")


class _Transient(Exception):
    """One GET failed in a way that may pass (the reason is the message)."""


class _WholeObjects:
    """Bodies of whole objects from servers that ignore Range, least recently used first out, within a byte budget;
    shared by the process's filesystems (ours and zarr's run on different event loops: a thread lock)."""

    def __init__(self) -> None:
        self.bodies: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()
        self.warned: set[str] = set()  # servers already warned about

    def get(self, url: str) -> bytes | None:
        with self.lock:
            body = self.bodies.get(url)
            if body is not None:
                self.bodies.move_to_end(url)
            return body

    def put(self, url: str, body: bytes, budget: int) -> None:
        with self.lock:
            if url in self.bodies or len(body) > budget:
                return
            self.bodies[url] = body
            self.nbytes += len(body)
            while self.nbytes > budget:
                self.nbytes -= len(self.bodies.popitem(last=False)[1])

    def first_warning(self, server: str) -> bool:
        with self.lock:
            new = server not in self.warned
            self.warned.add(server)
            return new


WHOLE_OBJECTS = _WholeObjects()


def _span(start: int | None, end: int | None, size: int) -> tuple[int, int]:
    """fsspec's [start, end) of an object of `size` bytes (negative: from the end), clipped to it."""
    first = 0 if start is None else (start if start >= 0 else max(0, size + start))
    last = size if end is None else (end if end >= 0 else size + end)
    return min(first, size), max(min(first, size), min(last, size))


class RangeCheckedHTTPFileSystem(HTTPFileSystem):
    """HTTPFileSystem whose reads are retried on transient failures within one deadline, and whose ranged reads cut
    the range from a full (200) response of a server that ignores Range, rather than returning the whole body."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.deadline_s = float(kwargs.pop(DEADLINE_OPTION, DEADLINE_S))
        self.cache_bytes = int(float(kwargs.pop(CACHE_OPTION, WHOLE_OBJECT_CACHE_MB)) * 1e6)
        if not self.deadline_s > 0 or self.cache_bytes < 0:
            raise UserError(f"--storage-options: {DEADLINE_OPTION} must be > 0 and {CACHE_OPTION} >= 0")
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
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + self.deadline_s
        tries = 0
        for delay in (*RETRY_DELAYS_S, None):
            tries += 1
            try:
                return await self._get(url, start, end, deadline - loop.time(), **kwargs)
            except _Transient as why:
                left = deadline - loop.time()
                if delay is None or left <= delay:
                    limit = f", the {self.deadline_s:g} s limit of one read" if left <= (delay or 0) else ""
                    raise UserError(f"cannot read {url}: {why} ({tries} tr{'y' if tries == 1 else 'ies'} over "
                                    f"{loop.time() - began:.0f} s{limit}); check that the server is up and reachable "
                                    f"from here, then rerun the command") from None
                log.warning("reading %s: %s; retrying in %.1f s", url, why, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _get(self, url: str, start: int | None, end: int | None, left: float, **kwargs: Any) -> bytes:
        """One GET within `left` seconds of silence: the body, FileNotFoundError (404), _Transient, or a one-line
        UserError."""
        kw = {**self.kwargs, **kwargs}
        ranged = not ((start is None and end is None) or start == end)
        if start is not None and start == end:
            return b""
        if ranged and (whole := WHOLE_OBJECTS.get(url)) is not None:
            first, last = _span(start, end, len(whole))
            return whole[first:last]
        if left <= 0:
            raise _Transient("no time left")
        headers = dict(kw.pop("headers", None) or {})
        if ranged:
            headers["Range"] = await self._process_limits(url, start, end)
        timeout = aiohttp.ClientTimeout(connect=left, sock_connect=min(TIMEOUT["sock_connect"], left),
                                        sock_read=min(TIMEOUT["sock_read"], left))
        try:
            session = await self.set_session()
            async with session.get(self.encode_url(url), headers=headers, timeout=timeout, **kw) as r:
                if r.status == 404:
                    raise FileNotFoundError(url)
                if r.status in RETRIED_STATUSES:
                    raise _Transient(f"the server answered HTTP {r.status} {r.reason or ''}".rstrip())
                if r.status >= 400:
                    raise UserError(f"cannot read {url}: the server answered HTTP {r.status} {r.reason or ''}; check "
                                    f"the URL, and pass any credentials it needs with --storage-options "
                                    f"(e.g. '{{\"headers\": {{\"Authorization\": \"...\"}}}}')")
                if ranged and r.status == 200:
                    return await self._cut(url, r, start, end)
                if ranged and r.status != 206:
                    raise UserError(f"{url}: the server answered a Range request with HTTP {r.status} (neither 206 "
                                    f"nor 200); serve the store from another server")
                return await r.read()
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as err:
            raise _Transient(f"{type(err).__name__}: {first_line(err, 120) or 'no answer in time'}") from None

    async def _cut(self, url: str, r: aiohttp.ClientResponse, start: int | None, end: int | None) -> bytes:
        """[start, end) of an object the server sent whole (it ignores Range). Kept whole when it fits the cache,
        else streamed, keeping only the range (and reading no further than its end)."""
        size = r.content_length
        if size is None or size <= self.cache_bytes:
            whole = await r.read()
            first, last = _span(start, end, len(whole))
            self._warn(url, last - first, len(whole))
            WHOLE_OBJECTS.put(url, whole, self.cache_bytes)
            return whole[first:last]
        first, last = _span(start, end, size)
        self._warn(url, last - first, size)
        out, at = bytearray(), 0
        async for block in r.content.iter_chunked(1 << 20):
            out += block[max(0, first - at):max(0, last - at)]
            at += len(block)
            if at >= last:
                break
        return bytes(out)

    def _warn(self, url: str, needed: int, size: int) -> None:
        parts = urlsplit(url)
        server = f"{parts.scheme}://{parts.netloc}"
        if WHOLE_OBJECTS.first_warning(server):
            log.warning("warning: %s ignores HTTP Range requests (as python -m http.server does): reading whole "
                        "objects, each kept in memory once read (up to %d MB per process, storage option %s); a "
                        "Range-capable server (nginx, caddy, S3) would send only the bytes each read needs: this read "
                        "needed %d of the %d bytes of %s", server, self.cache_bytes // 10**6, CACHE_OPTION, needed,
                        size, parts.path.rsplit("/", 1)[-1])
