"""Real HTTP servers on loopback for the remote-store tests: one that honours Range, one (python's
stock http.server) that ignores it. Each serves a directory from a daemon thread."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class RangeHandler(QuietHandler):
    """SimpleHTTPRequestHandler plus single byte ranges (`a-b`, `a-`, `-n`), answered with 206."""

    requests: list[tuple[str, str | None]] = []  # (path, Range header), per server class

    def send_head(self):  # type: ignore[no-untyped-def]
        self.requests.append((self.path, self.headers.get("Range")))
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", ""))
        path = self.translate_path(self.path)
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first, last = match.groups()
        start, end = (size - int(last), size - 1) if not first else (int(first), int(last) if last else size - 1)
        start, end = max(start, 0), min(end, size - 1)
        if start > end:
            self.send_error(416)
            return None
        f = open(path, "rb")
        f.seek(start)
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        return _Limited(f, end - start + 1)


class _Limited:
    """The file from its current position, `left` bytes long (copyfile reads until EOF)."""

    def __init__(self, f, left: int) -> None:  # type: ignore[no-untyped-def]
        self.f, self.left = f, left

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


@contextlib.contextmanager
def serve(directory: str | os.PathLike, ranges: bool = True) -> Iterator[tuple[str, list]]:
    """Serve `directory` on 127.0.0.1; yields (base URL, list of (path, Range) requests seen)."""
    handler = type("Handler", (RangeHandler,), {"requests": []}) if ranges else QuietHandler
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=os.fspath(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", getattr(handler, "requests", [])
    finally:
        server.shutdown()
        server.server_close()
