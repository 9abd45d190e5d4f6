"""Decoding videos with decord, and a killable process pool to do it in.

decord can hang in native code on corrupt files while holding the GIL (dmlc/decord #373), so a
thread cannot time it out: `DecodePool` runs decode jobs in worker processes and kills a worker
that overruns its deadline. Every failure of one video is a `DecodeError`, which the extractor
records for that video before moving on.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import multiprocessing
import multiprocessing.connection
import os
import re
import threading
import time
import traceback
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator

import decord
import numpy as np

from dist_cache.errors import first_line

# Recorded in every store: frame counts and pixels drift between decoders and FFmpeg builds.
DECODER = {"name": "decord", "version": decord.__version__}


class DecodeError(RuntimeError):
    """One video cannot be decoded; a one-line message that starts with its path."""


@dataclass
class VideoFacts:
    num_frames: int
    fps: float
    width: int
    height: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VideoFacts:
        return cls(int(d["num_frames"]), float(d["fps"]), int(d["width"]), int(d["height"]))


def _reason(exc: Exception) -> str:
    """The useful part of a decord error: its first line, without the native timestamp and source location."""
    return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", first_line(exc, limit=1000))


def _open(path: str | os.PathLike) -> decord.VideoReader:
    if not os.path.isfile(path):
        raise DecodeError(f"{path}: file not found")
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError (a bare Exception) for every failure
        raise DecodeError(f"{path}: cannot open as a video ({_reason(exc)})") from exc


def _decode_one(path: str | os.PathLike, index: int) -> np.ndarray:
    """Frame `index` from a fresh reader (a failed seek can leave decord's reader unusable)."""
    vr = _open(path)
    try:
        return vr.get_batch([index]).asnumpy()[0]
    except Exception as exc:
        raise DecodeError(f"{path}: frame {index} of {len(vr)} does not decode ({_reason(exc)})") from exc


def _decodes(path: str | os.PathLike, index: int) -> bool:
    try:
        _decode_one(path, index)
        return True
    except DecodeError:
        return False


def probe_video(path: str | os.PathLike) -> VideoFacts:
    """Frame count, fps and size, where the count is the frames that really decode.

    A truncated file can over-report its frames (its index is written first); then the last decodable
    frame is found by bisection, so the video stays usable up to where it was cut.
    """
    vr = _open(path)
    n, fps = len(vr), float(vr.get_avg_fps())
    if n == 0:
        raise DecodeError(f"{path}: no video frames")
    try:
        frame = _decode_one(path, n - 1)
    except DecodeError:
        frame = _decode_one(path, 0)  # when even the first frame fails, its reason is the error
        good, bad = 0, n - 1  # invariant: frame `good` decodes, frame `bad` does not
        while bad - good > 1:
            mid = (good + bad) // 2
            good, bad = (mid, bad) if _decodes(path, mid) else (good, mid)
        n = good + 1
    return VideoFacts(num_frames=n, fps=fps, height=int(frame.shape[0]), width=int(frame.shape[1]))


def read_frames(path: str | os.PathLike, indices: Iterable[int]) -> np.ndarray:
    """uint8 frames (n, H, W, 3) in the order of `indices` (repeats allowed).

    Indices are clamped to the container's frame count; plan them from `probe_video`'s count, which excludes
    frames lost to truncation, since asking for those raises DecodeError.
    """
    vr = _open(path)
    n = len(vr)
    if n == 0:
        raise DecodeError(f"{path}: no video frames")
    wanted = np.clip(np.asarray(list(indices), dtype=np.int64), 0, n - 1)
    # Decode each distinct frame once, in file order (seeks only go forward), then gather.
    unique, inverse = np.unique(wanted, return_inverse=True)
    try:
        batch = vr.get_batch(unique.tolist()).asnumpy()
    except Exception as exc:
        raise DecodeError(f"{path}: decoding {len(unique)} frames failed ({_reason(exc)})") from exc
    return batch[inverse.reshape(-1)]


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the `__cause__` of the re-raised exception."""

    def __str__(self) -> str:
        return str(self.args[0])


def _worker_main(conn: multiprocessing.connection.Connection, preload: tuple[str, ...]) -> None:
    for module in preload:
        importlib.import_module(module)
    while True:
        job = conn.recv()
        if job is None:
            return
        fn, args = job
        try:
            reply = ("ok", fn(*args))
        except Exception as exc:
            reply = ("err", exc, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # the result or the exception does not pickle: send what it said instead
            conn.send(("err", RuntimeError(f"{fn.__name__} result could not be sent back"), traceback.format_exc()))


def _describe(fn: Callable, args: tuple) -> str:
    """`/x/a.mp4: probe_video` for a decode job (path first, like every DecodeError), else `sleep(60)`."""
    name = getattr(fn, "__name__", "job")
    if args and isinstance(args[0], (str, os.PathLike)):
        return f"{args[0]}: {name}"
    return f"{name}({args[0]!r})" if args else name


class _Worker:
    def __init__(self, ctx: multiprocessing.context.BaseContext, preload: tuple[str, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, preload), daemon=True)
        self.process.start()
        child.close()  # so that a dead worker reads as EOF here
        self.job: tuple[concurrent.futures.Future, Callable, tuple] | None = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class DecodePool:
    """Worker processes that run picklable jobs (`probe_video`, `read_frames`, or a module-level function that
    calls them) with a per-job timeout.

    A job that overruns `timeout` seconds, or whose worker dies, fails with `DecodeError`; the worker is killed
    and replaced, so the pool keeps working. Any number of jobs may be submitted; `workers` of them run at once.
    """

    def __init__(self, workers: int = 2, timeout: float = 60.0, context: str = "spawn", preload: tuple[str, ...] = ()):
        """`preload`: modules each worker imports as it starts, so that a pool created early has paid for
        its imports (seconds, for torch) by the time the first job arrives."""
        if workers < 1 or timeout <= 0:
            raise ValueError("DecodePool needs workers >= 1 and timeout > 0")
        self.timeout = timeout
        # spawn, not fork: the parent may hold CUDA contexts or zarr's asyncio threads, which fork breaks.
        self._ctx = multiprocessing.get_context(context)
        self._preload = tuple(preload)
        self._workers = [_Worker(self._ctx, self._preload) for _ in range(workers)]
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._closed = False
        self._kill = False
        self._thread = threading.Thread(target=self._run, name="DecodePool", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Queue `fn(*args)`; the future's `.result()` returns its value or raises its exception."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("DecodePool is closed")
            self._queue.append((future, fn, args))
        self._wake_w.send(None)
        return future

    def map_unordered(
        self, fn: Callable, arg_tuples: Iterable[tuple], in_flight: int | None = None
    ) -> Iterator[tuple[int, concurrent.futures.Future]]:
        """Run `fn(*args)` for each tuple, keeping `in_flight` jobs queued or running (default 2 per worker) so
        decoding stays ahead of the consumer; yield `(position, done future)` in completion order."""
        limit = in_flight or 2 * len(self._workers)
        pending: dict[concurrent.futures.Future, int] = {}
        for i, args in enumerate(arg_tuples):
            while len(pending) >= limit:
                yield from self._take_done(pending)
            pending[self.submit(fn, *args)] = i
        while pending:
            yield from self._take_done(pending)

    @staticmethod
    def _take_done(pending: dict) -> Iterator[tuple[int, concurrent.futures.Future]]:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
            yield pending.pop(future), future

    def close(self, kill: bool = False) -> None:
        """Stop the workers; jobs not yet finished are cancelled. `kill` skips letting idle workers exit on
        their own (they may still be importing their preloads): for giving up on the pool after an error."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._kill = kill
        self._wake_w.send(None)
        self._thread.join()

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The dispatcher thread owns the workers: it hands out queued jobs, collects replies and enforces deadlines.
    def _run(self) -> None:
        while True:
            with self._lock:
                closed = self._closed
                if not closed:
                    self._dispatch()
            if closed:
                self._shutdown()
                return
            busy = [w for w in self._workers if w.job is not None]
            wait_s = max(0.0, min((w.deadline for w in busy), default=time.monotonic() + 3600) - time.monotonic())
            ready = multiprocessing.connection.wait([self._wake_r] + [w.conn for w in busy], timeout=wait_s)
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv()
            for w in busy:
                if w.conn in ready:
                    self._collect(w)
                elif time.monotonic() >= w.deadline:
                    self._replace(w, DecodeError(f"{_describe(*w.job[1:])} timed out after {self.timeout:g}s; worker killed"))

    def _dispatch(self) -> None:
        """Give queued jobs to idle workers (called with the lock held)."""
        for w in self._workers:
            while w.job is None and self._queue:
                future, fn, args = self._queue.popleft()
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    w.conn.send((fn, args))
                except Exception as exc:  # the function or its arguments do not pickle
                    future.set_exception(exc)
                    continue
                w.job = (future, fn, args)
                w.deadline = time.monotonic() + self.timeout

    def _collect(self, w: _Worker) -> None:
        future = w.job[0]
        try:
            reply = w.conn.recv()
        except (EOFError, OSError):
            w.process.join(timeout=1)
            code = w.process.exitcode
            self._replace(w, DecodeError(f"{_describe(*w.job[1:])} crashed its worker (exit code {code})"))
            return
        w.job = None
        if reply[0] == "ok":
            future.set_result(reply[1])
        else:
            exc = reply[1]
            exc.__cause__ = _RemoteTraceback(reply[2])
            future.set_exception(exc)

    def _replace(self, w: _Worker, error: DecodeError) -> None:
        w.kill()
        future = w.job[0]
        self._workers[self._workers.index(w)] = _Worker(self._ctx, self._preload)
        future.set_exception(error)

    def _shutdown(self) -> None:
        for w in self._workers:
            if w.job is not None:
                w.job[0].set_exception(RuntimeError("DecodePool closed before the job finished"))
                w.kill()
            elif self._kill:
                w.kill()
            else:
                w.conn.send(None)
                w.process.join(timeout=5)
                w.kill()  # a no-op for a worker that has exited
        while self._queue:
            self._queue.popleft()[0].cancel()
