"""Real servers on loopback for the remote-store tests: HTTP servers that honour Range (optionally failing
on purpose: 503s, dropped connections, a server that goes away), python's stock http.server that ignores
Range, moto's S3 server, and a proxy in front of it that fails writes on purpose. Each serves from a daemon
thread."""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class Faults:
    """What a server does to its GETs (the S3 proxy: to its PUTs), counted from 1: `fail` (503), `drop` (close
    without a word), `stop` (close, then shut the server down, so later connections are refused) or `freeze` (the
    server's process stops, SIGSTOP: connections are still accepted by the kernel, never answered; a server started
    by `serve_in_process` only) for requests in `at`."""

    action: str
    at: range
    count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> str | None:
        with self.lock:
            self.count += 1
            return self.action if self.count in self.at else None


class RangeHandler(QuietHandler):
    """SimpleHTTPRequestHandler plus single byte ranges (`a-b`, `a-`, `-n`), answered with 206."""

    requests: list[tuple[str, str | None]] = []  # (path, Range header), per server class
    faults: Faults | None = None
    require: ClassVar[dict[str, str]] = {}  # headers every request must carry (else 401), per server class

    def do_GET(self) -> None:
        action = self.faults.next() if self.faults else None
        if any(self.headers.get(name) != value for name, value in self.require.items()):
            self.send_error(401, "Unauthorized")
        elif action == "fail":
            self.send_error(503, "Service Unavailable")
        elif action in ("drop", "stop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            if action == "stop":
                threading.Thread(target=_stop, args=(self.server,), daemon=True).start()
        elif action == "freeze":  # the whole server process stops (SIGSTOP), its sockets open: only in a subprocess
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            super().do_GET()

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


class _Server(ThreadingHTTPServer):
    allow_reuse_address = True  # a test may serve again on the port of a server it stopped
    daemon_threads = True


def _stop(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def serve(directory: str | os.PathLike, ranges: bool = True, faults: Faults | None = None,
          port: int = 0, require: dict[str, str] | None = None) -> Iterator[tuple[str, list]]:
    """Serve `directory` on 127.0.0.1 (`port` 0: any free one), answering 401 to requests without the
    `require`d headers; yields (base URL, list of (path, Range) requests seen)."""
    handler = (type("Handler", (RangeHandler,), {"requests": [], "faults": faults, "require": require or {}})
               if ranges else QuietHandler)
    server = _Server(("127.0.0.1", port), functools.partial(handler, directory=os.fspath(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", getattr(handler, "requests", [])
    finally:
        _stop(server)  # at once if a "stop" fault did already


@contextlib.contextmanager
def moto_s3() -> Iterator[dict]:
    """moto's S3 server on loopback, with a fresh bucket: yields {"endpoint", "bucket", "options"}, the options
    being s3fs's (credentials and the endpoint passed explicitly, no environment)."""
    import uuid

    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached per options, endpoints change per test
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint}}
    # moto keeps its buckets per process, not per server: each use gets its own.
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket, "options": options}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


class _FaultyProxy(QuietHandler):
    """Forwards every request to `upstream` (moto's S3) with http.client, except the PUTs its faults hit."""

    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    upstream: ClassVar[str] = ""
    faults: ClassVar[Faults]
    requests: ClassVar[list[tuple[str, str]]]  # (method, path), per proxy

    def _forward(self) -> None:
        self.requests.append((self.command, self.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = self.faults.next() if self.command == "PUT" else None
        if action == "fail":
            # S3's own shape of a 503 (an error document), after the body was read, as a real server answers.
            error = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>ServiceUnavailable</Code>"
                     b"<Message>Service is unable to handle request.</Message></Error>")
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(error)))
            self.end_headers()
            self.wfile.write(error)
            return
        if action in ("drop", "stop"):
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            if action == "stop":
                threading.Thread(target=_stop, args=(self.server,), daemon=True).start()
            return
        upstream = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
            upstream.request(self.command, self.path, body=body, headers=headers)
            answer = upstream.getresponse()
            data = answer.read()
        finally:
            upstream.close()
        self.send_response(answer.status, answer.reason)
        # The body is relayed whole, so its length is known; a HEAD's Content-Length is the object's, kept as is.
        dropped = {"connection", "keep-alive", "transfer-encoding"}
        if self.command != "HEAD":
            dropped.add("content-length")
        for name, value in answer.getheaders():
            if name.lower() not in dropped:
                self.send_header(name, value)
        if self.command != "HEAD":
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward


@contextlib.contextmanager
def faulty_s3_proxy(endpoint: str, faults: Faults) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A proxy on loopback in front of the S3 server at `endpoint` whose PUTs fail as `faults` says (change its
    `at` to arm or disarm it); yields (the proxy's endpoint URL, the list of (method, path) requests seen)."""
    handler = type("Proxy", (_FaultyProxy,), {"upstream": endpoint.removeprefix("http://"), "faults": faults,
                                              "requests": []})
    server = _Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        _stop(server)


@contextlib.contextmanager
def serve_in_process(directory: str | os.PathLike, *, freeze_after: int | None = None,
                     stock: bool = False) -> Iterator[tuple[str, subprocess.Popen]]:
    """Serve `directory` from a child process on 127.0.0.1: python's own `python -m http.server` (`stock`: no Range
    support), or this module's Range-capable server, which freezes (SIGSTOP) at GET number `freeze_after` + 1.
    Yields (base URL, the process); the process is killed on exit, frozen or not."""
    if stock:
        with socket.socket() as probe:  # a free port for http.server, which does not report the one it took
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory",
                   os.fspath(directory)]
    else:
        command = [sys.executable, __file__, os.fspath(directory), str(freeze_after or 0)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if stock:
            base = f"http://127.0.0.1:{port}"
            for _ in range(200):
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                threading.Event().wait(0.05)
        else:
            base = proc.stdout.readline().strip()
        yield base, proc
    finally:
        proc.kill()  # SIGKILL ends a stopped process too
        proc.wait()


def _main() -> None:
    """`python tests/servers.py DIR FREEZE_AFTER`: serve DIR with Range support, print the base URL, freeze at GET
    FREEZE_AFTER + 1 (0: never)."""
    directory, freeze_after = sys.argv[1], int(sys.argv[2])
    faults = Faults("freeze", range(freeze_after + 1, 10**9)) if freeze_after else None
    with serve(directory, faults=faults) as (base, _):
        print(base, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    _main()
