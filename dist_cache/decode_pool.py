"""A process pool for decode jobs that can kill a job at its deadline, and closes at once.

decord can hang in native code on corrupt files while holding the GIL (dmlc/decord #373), so a thread
cannot time it out: `DecodePool` runs jobs in worker processes and kills a worker that overruns its deadline.
Every worker is single-threaded (torch, OpenMP, BLAS, OpenCV): the pool's parallelism is its processes, and a
library spreading each small job over every core in each of N processes only oversubscribes the machine.

This module imports only the standard library (and the stdlib-only `dist_cache.errors`), so a worker sets
its thread limits before anything it runs (its preloads, its jobs) imports a library that reads them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import importlib
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

from dist_cache.errors import DecodeError

# Read once, when each library loads: the worker sets them first thing.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",  # torch's CPU ops (OpenMP), and OpenMP-built BLAS
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",  # numpy's BLAS
    "VECLIB_MAXIMUM_THREADS": "1",  # macOS Accelerate
    "NUMEXPR_NUM_THREADS": "1",
    "OPENCV_FOR_THREADS_NUM": "1",  # OpenCV's parallel_for, should a job use it
}
# Cores `auto_workers` leaves to the process that consumes the decoded frames: one for its main loop
# (batching, the device copies and kernel launches of extraction) and one for its store writer threads
# (compression, checksums, file writes). The dispatcher thread of the pool itself sleeps in wait().
MAIN_PROCESS_CORES = 2
# How long close() lets idle workers exit on their own before killing them; they need milliseconds.
CLOSE_GRACE_S = 0.5


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU quota
    (a container's --cpus), which os.cpu_count() both ignore."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return cores


def auto_workers() -> int:
    """`--decode-workers auto`: the usable cores less those the main process needs, at least 1."""
    return max(1, usable_cores() - MAIN_PROCESS_CORES)


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the `__cause__` of the re-raised exception."""

    def __str__(self) -> str:
        return str(self.args[0])


def _worker_main(conn: multiprocessing.connection.Connection, preload: tuple[str, ...]) -> None:
    os.environ.update(SINGLE_THREAD_ENV)
    for module in preload:
        importlib.import_module(module)
    if "torch" in sys.modules:  # imported before this ran (by the parent's main module, re-imported by spawn)
        sys.modules["torch"].set_num_threads(1)
    while True:
        job = conn.recv()
        if job is None:
            # Exit without the interpreter's teardown, which takes torch most of a second and has nothing
            # to save here (no files open, results sent).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
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
    """`/x/a.mp4: prepare_video` for a decode job (path first, like every DecodeError), else `sleep(60)`."""
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
    """Worker processes that run picklable jobs (a decoder's methods, or a module-level function that calls
    them) with a per-job timeout.

    A job that overruns `timeout` seconds, or whose worker dies, fails with `DecodeError`; the worker is killed
    and replaced, so the pool keeps working. Any number of jobs may be submitted; `workers` of them run at once.
    """

    def __init__(
        self,
        workers: int | Literal["auto"] = 2,
        timeout: float = 60.0,
        context: str = "spawn",
        preload: tuple[str, ...] = (),
    ):
        """`workers`: a count, or "auto" (`auto_workers()`). `preload`: modules each worker imports as it starts,
        so that a pool created early has paid for its imports (seconds, for torch) by the first job."""
        count = auto_workers() if workers == "auto" else workers
        if not isinstance(count, int) or count < 1 or timeout <= 0:
            raise ValueError(f"DecodePool needs workers >= 1 (or 'auto') and timeout > 0, got {workers!r}, {timeout!r}")
        self.timeout = timeout
        # spawn, not fork: the parent may hold CUDA contexts or zarr's asyncio threads, which fork breaks.
        self._ctx = multiprocessing.get_context(context)
        self._preload = tuple(preload)
        self._workers = [_Worker(self._ctx, self._preload) for _ in range(count)]
        self._queue: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._closed = False
        self._kill = False
        self._thread = threading.Thread(target=self._run, name="DecodePool", daemon=True)
        self._thread.start()

    @property
    def workers(self) -> int:
        return len(self._workers)

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
        """Stop the workers, within about CLOSE_GRACE_S whatever their number; jobs not yet finished are
        cancelled. `kill` skips letting idle workers exit on their own: for giving up on the pool after an error."""
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
                    self._replace(w,
                                  DecodeError(f"{_describe(*w.job[1:])} timed out after "
                                              f"{self.timeout:g}s; worker killed"))

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
        """Tell every worker to stop at once, then wait for them all against one deadline: a worker still
        importing its preloads, or busy with a job being cancelled, is killed rather than waited for."""
        for w in self._workers:
            if w.job is not None:
                w.job[0].set_exception(RuntimeError("DecodePool closed before the job finished"))
                w.process.kill()
            elif self._kill:
                w.process.kill()
            else:
                try:
                    w.conn.send(None)
                except OSError:  # it died already
                    w.process.kill()
        deadline = time.monotonic() + CLOSE_GRACE_S
        for w in self._workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in self._workers:
            w.kill()  # a straggler is killed; for a worker that has exited this only reaps it
        while self._queue:
            self._queue.popleft()[0].cancel()



class InProcessDecoder:
    """`--decode-workers 0`: each job runs in the calling thread when `map_unordered` reaches it, one at a time,
    handed back as `DecodePool` hands back its jobs. No processes to start (seconds each), but no timeout either:
    a decoder that hangs hangs its caller."""

    workers = 0

    def map_unordered(
        self, fn: Callable, arg_tuples: Iterable[tuple], in_flight: int | None = None
    ) -> Iterator[tuple[int, concurrent.futures.Future]]:
        for i, args in enumerate(arg_tuples):
            future: concurrent.futures.Future = concurrent.futures.Future()
            try:
                future.set_result(fn(*args))
            except Exception as exc:  # the job's failure, delivered like a worker's
                future.set_exception(exc)
            yield i, future

    def close(self, kill: bool = False) -> None:
        pass


def open_pool(workers: int | Literal["auto"], timeout: float,
              preload: tuple[str, ...] = ()) -> DecodePool | InProcessDecoder:
    """A `DecodePool` of `workers` processes, or for 0 an `InProcessDecoder`."""
    return InProcessDecoder() if workers == 0 else DecodePool(workers, timeout, preload=preload)
