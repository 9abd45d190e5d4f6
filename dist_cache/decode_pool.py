"""A process pool for decode jobs that can kill a job at its deadline, and closes at once.

decord can hang in native code on corrupt files while holding the GIL (dmlc/decord #373), so a thread
cannot time it out: `DecodePool` runs jobs in worker processes and kills a worker that overruns its deadline.
A worker that dies (a decoder's segfault, the OOM killer, a stray `kill -9`) is replaced and its job retried:
a job is blamed only when it kills a second worker, and workers that keep dying are the machine's fault
(`MachineError`), never a video's.
Every worker is single-threaded (torch, OpenMP, BLAS, OpenCV): the pool's parallelism is its processes, and a
library spreading each small job over every core in each of N processes only oversubscribes the machine.

This module imports only the standard library (and the stdlib-only `dist_cache.errors`), so a worker sets
its thread limits before anything it runs (its preloads, its jobs) imports a library that reads them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import importlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, NamedTuple

from dist_cache.errors import DecodeError, MachineError

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
# A job whose worker dies is retried on a fresh worker; one that kills this many workers is the job's fault
# (a video that segfaults its decoder), recorded as its DecodeError. One death alone proves nothing: the OOM
# killer or a stray `kill -9` may have hit a healthy job.
JOB_CRASH_LIMIT = 2
# Set as this process exits, before multiprocessing terminates its daemonic children (the decode workers): a pool
# then starts no replacement for them. A replacement started then is orphaned mid-start, and prints an EOFError
# traceback from spawn_main. A dask worker's pool is never closed (its cached extractor lives as long as the
# worker's process), so at every such exit its dispatcher sees its workers die. An exit finalizer, not atexit:
# multiprocessing children (dask workers) leave through os._exit, which skips atexit but runs these.
_EXITING = threading.Event()
multiprocessing.util.Finalize(None, _EXITING.set, exitpriority=100)


def death_limit(workers: int) -> int:
    """Worker deaths in a row (no job finishing in between) after which the pool blames the machine, not the
    jobs: every worker dying once, then again, plus two. Each bad video costs at most JOB_CRASH_LIMIT deaths,
    so this takes several bad videos in a row with nothing healthy between them, or workers dying at start."""
    return JOB_CRASH_LIMIT * workers + 2


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """SIGINT ignored in this process while the block starts child processes, which inherit that through exec and
    so ignore a terminal's Ctrl-C (sent to the whole process group) from their first instruction: the process
    that started them handles it, and closes them. Only the main thread may change it; elsewhere this does nothing
    (children then ignore SIGINT from when their own code says so). A Ctrl-C during the block is lost."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, cpusets), capped by a cgroup v2 CPU quota
    (a container's --cpus), which os.cpu_count() both ignore."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    return cores


def auto_workers() -> int:
    """`--decode-workers auto`: the usable cores less those the main process needs, at least 1."""
    return max(1, usable_cores() - MAIN_PROCESS_CORES)


class _RemoteTraceback(Exception):
    """Carries a worker's formatted traceback as the `__cause__` of the re-raised exception."""

    def __str__(self) -> str:
        return str(self.args[0])


def _quiet_exit() -> None:
    # Exit without the interpreter's teardown, which takes torch most of a second and has nothing to save here
    # (no files open, results sent).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker_main(conn: multiprocessing.connection.Connection, preload: tuple[str, ...]) -> None:
    # Ctrl-C reaches the whole process group: the parent handles it (it closes the pool); a worker that raised
    # KeyboardInterrupt too would only print a traceback before the parent's one line.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(SINGLE_THREAD_ENV)
    for module in preload:
        importlib.import_module(module)
    if "torch" in sys.modules:  # imported before this ran (by the parent's main module, re-imported by spawn)
        sys.modules["torch"].set_num_threads(1)
    with contextlib.suppress(EOFError, OSError):  # the parent is gone (closed the pool, or died): nothing to report to
        _serve(conn)
    _quiet_exit()


def _serve(conn: multiprocessing.connection.Connection) -> None:
    conn.send("ready")  # jobs go only to started workers: a death before this is never a job's fault
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
        except Exception:  # the result or the exception does not pickle (a lost parent fails the retry too)
            conn.send(("err", RuntimeError(f"{fn.__name__} result could not be sent back"), traceback.format_exc()))


class _Job(NamedTuple):
    future: concurrent.futures.Future
    fn: Callable
    args: tuple
    deaths: list[str]  # how each worker that ran it died

    def describe(self) -> str:
        """`/x/a.mp4: prepare_video` for a decode job (path first, like every DecodeError), else `sleep(60)`."""
        name = getattr(self.fn, "__name__", "job")
        if self.args and isinstance(self.args[0], (str, os.PathLike)):
            return f"{self.args[0]}: {name}"
        return f"{name}({self.args[0]!r})" if self.args else name


class _Worker:
    def __init__(self, ctx: multiprocessing.context.BaseContext, preload: tuple[str, ...]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, preload), daemon=True)
        # A Ctrl-C during the worker's own start-up (spawn re-imports the main module) prints nothing either: SIGINT
        # is ignored from its first instruction (this process ignores it for the milliseconds of the fork).
        with sigint_ignored():
            self.process.start()
        child.close()  # so that a dead worker reads as EOF here
        self.ready = False  # set by its "ready" message, once its preloads are imported
        self.job: _Job | None = None
        self.deadline = 0.0

    def exit_reason(self) -> str:
        self.process.join(timeout=1)
        code = self.process.exitcode
        if code is not None and code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class DecodePool:
    """Worker processes that run picklable jobs (a decoder's methods, or a module-level function that calls
    them) with a per-job timeout.

    A job that overruns `timeout` seconds fails with `DecodeError`; its worker is killed and replaced, so the
    pool keeps working. A worker that dies is replaced and its job retried first; a job that kills
    JOB_CRASH_LIMIT workers fails with `DecodeError`. After `death_limit(workers)` deaths in a row (no job
    finishing between them) the machine is at fault: every job not finished, and every later one, fails with
    `MachineError`, and no more workers are started. Any number of jobs may be submitted; `workers` of them
    run at once.
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
        self._deaths_in_a_row = 0
        self._death_limit = death_limit(count)
        self._broken: MachineError | None = None
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
            if self._broken is not None:
                future.set_exception(self._broken)
                return future
            self._queue.append(_Job(future, fn, args, []))
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

    # The dispatcher thread owns the workers: it hands out queued jobs, collects replies, enforces deadlines and
    # replaces dead workers.
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
            # Every worker's pipe: a reply, a "ready", or the EOF of a worker that died, busy or not.
            ready = multiprocessing.connection.wait([self._wake_r] + [w.conn for w in self._workers], timeout=wait_s)
            if self._wake_r in ready:
                while self._wake_r.poll():
                    self._wake_r.recv()
            for w in list(self._workers):
                if w.conn in ready:
                    self._collect(w)
                elif w.job is not None and time.monotonic() >= w.deadline:
                    job = w.job
                    self._replace(w)
                    job.future.set_exception(DecodeError(f"{job.describe()} timed out after {self.timeout:g}s; "
                                                         "worker killed"))

    def _dispatch(self) -> None:
        """Give queued jobs to idle, started workers (called with the lock held)."""
        for w in list(self._workers):
            while w.ready and w.job is None and self._queue:
                job = self._queue.popleft()
                if not job.future.running() and not job.future.set_running_or_notify_cancel():
                    continue  # cancelled while queued (a job being retried is running already)
                try:
                    w.conn.send((job.fn, job.args))
                except OSError:  # the worker died since it last spoke (BrokenPipeError): no fault of the job's
                    self._queue.appendleft(job)
                    self._died(w, None)
                    break
                except Exception as exc:  # the function or its arguments do not pickle
                    job.future.set_exception(exc)
                    continue
                w.job = job
                w.deadline = time.monotonic() + self.timeout

    def _collect(self, w: _Worker) -> None:
        try:
            reply = w.conn.recv()
        except (EOFError, OSError):
            with self._lock:
                self._died(w, w.job)
            return
        if reply == "ready":
            w.ready = True
            return
        job, w.job = w.job, None
        self._deaths_in_a_row = 0  # a job finished: the machine can run jobs
        if reply[0] == "ok":
            job.future.set_result(reply[1])
        else:
            exc = reply[1]
            exc.__cause__ = _RemoteTraceback(reply[2])
            job.future.set_exception(exc)

    def _died(self, w: _Worker, job: _Job | None) -> None:
        """A worker died (lock held): replace it; retry its job first, unless the job has now killed
        JOB_CRASH_LIMIT workers (its fault) or workers keep dying whatever they run (the machine's)."""
        reason = w.exit_reason()
        self._deaths_in_a_row += 1
        broken = self._deaths_in_a_row >= self._death_limit
        self._replace(w, start=not broken)
        if job is not None:
            job.deaths.append(reason)
            if len(job.deaths) >= JOB_CRASH_LIMIT and not broken:
                job.future.set_exception(DecodeError(
                    f"{job.describe()} crashed its worker {len(job.deaths)} times ({', then '.join(job.deaths)})"))
            else:
                self._queue.appendleft(job)  # still running, as its caller sees it (failed below if broken)
        if broken:
            self._break(MachineError(
                f"decode workers keep dying: {self._deaths_in_a_row} in a row without a video finishing, the last "
                f"{reason}; check the machine's memory (the kernel's OOM killer: dmesg) and rerun the same command "
                "(it resumes; no video was recorded as failed for this)"))

    def _break(self, error: MachineError) -> None:
        """Fail every job not finished with `error` (lock held); later submits fail at once."""
        self._broken = error
        for w in self._workers:
            if w.job is not None:
                w.job.future.set_exception(error)
                w.job = None
                w.process.kill()
        while self._queue:
            job = self._queue.popleft()
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _replace(self, w: _Worker, start: bool = True) -> None:
        """Kill `w` (a hung or dead worker) and put a fresh one in its place; `start=False` once the pool is
        broken, when a fresh worker would only die too, and none as this process exits (`_EXITING`)."""
        w.kill()
        w.job = None
        if start and not _EXITING.is_set():
            self._workers[self._workers.index(w)] = _Worker(self._ctx, self._preload)
        else:
            self._workers.remove(w)

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
        for job in self._queue:
            if job.future.running():  # being retried after its worker died: no cancelling it
                job.future.set_exception(RuntimeError("DecodePool closed before the job finished"))
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
