"""Data-parallel processes: which rank this process is, reductions across ranks, and starting N ranks here.

Nothing here knows about training. A rank is any process started with the launcher's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT): torchrun's (`torchrun --nproc_per_node N --no-python dist-cache train ...`)
or ours (`launch`, behind `dist-cache train --nproc N`). Without that environment a process is rank 0 of 1.

Ranks started here die with their launcher: each asks the kernel for SIGKILL when its parent dies (Linux
PR_SET_PDEATHSIG), and elsewhere a thread watches the parent's pid. A kill -9 of the launcher therefore never
leaves ranks training as orphans that keep writing into the run directory. A stop signal (SIGTERM, SIGUSR1) to the
launcher is passed on to its ranks, which stop together (preemption.py), and the launcher waits for them.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_cache.errors import UserError
from pipelines.train.preemption import Preempted, handled

# Rank 0 validates alone between epochs while the others wait in their next collective, so the collective
# timeout must outlast a validation pass (NCCL's default is 10 minutes).
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)
# Set by `launch` in its ranks: the pid of the launcher, which they die with.
LAUNCHER_ENV = "DIST_CACHE_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 alone writes the run directory and reports."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process is one rank of several (started by torchrun or by `launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's place in the launcher's process group (rank 0 of 1 without a launcher)."""
    if not launched():
        yield Ranks(0, 1, device)
        return
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's agent is the parent: die with it, as with ours
        die_with_parent(os.getppid())
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None, timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Ranks(rank, world, device)
    finally:
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """The element-wise sum over ranks of a small tensor (a collective when world > 1: every rank calls it)."""
    if ranks.world > 1:
        dist.all_reduce(values)
    return values


def all_gather_objects(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value` (picklable, small), in rank order; a collective when world > 1."""
    if ranks.world == 1:
        return [value]
    gathered: list[Any] = [None] * ranks.world
    dist.all_gather_object(gathered, value)
    return gathered


def quiet_unless_main() -> None:
    """Ranks other than 0 print nothing on stdout (rank 0 reports); errors still reach stderr."""
    if int(os.environ.get("RANK", "0")):
        sys.stdout = open(os.devnull, "w")


def die_with_parent(parent: int) -> None:
    """Be killed when process `parent` (this one's parent) dies, however it dies."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl here: the thread below watches instead
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent:  # it died before the request took effect
                    os._exit(1)
                return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, fn: Callable[[Any], Any], arg: Any, world: int, port: int, launcher: int, results) -> None:
    die_with_parent(launcher)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **{LAUNCHER_ENV: str(launcher)})
    try:
        result = fn(arg)
    except UserError as err:
        # The parent sees a rank's exception as a traceback; the message goes to it first, to be reported as
        # the one line it is. Raising still fails the rank, so the parent stops the others.
        results.put(("error", str(err)))
        raise
    except Preempted as stopped:  # every rank stopped after the same step: no failure, the parent says so
        if rank == 0:
            results.put(("preempted", str(stopped)))
        return
    if rank == 0:
        results.put(("result", result))


def launch(fn: Callable[[Any], Any], arg: Any, nproc: int) -> Any:
    """Run `fn(arg)` in `nproc` ranks on this machine (`fn` module-level, `arg` picklable); rank 0's result.

    A UserError in any rank is raised here as that one line, and the ranks' `Preempted` as theirs; a stop signal
    to this process is passed on to the ranks. The ranks are spawned, not forked: zarr's asyncio threads and CUDA
    do not survive fork."""
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc: already running under a launcher (torchrun); drop --nproc")
    results = mp.get_context("spawn").SimpleQueue()
    started: list[mp.ProcessContext] = []
    received: list[int] = []

    def send(signum: int) -> None:
        for process in started[0].processes if started else ():
            if process.is_alive():
                os.kill(process.pid, signum)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        send(signum)

    try:
        with handled(forward):
            started.append(mp.start_processes(_rank_main, args=(fn, arg, nproc, _free_port(), os.getpid(), results),
                                              nprocs=nproc, start_method="spawn", join=False))
            for signum in list(received):  # arrived while the ranks were being started
                send(signum)
            while not started[0].join():
                pass
    except mp.ProcessRaisedException:
        while not results.empty():
            kind, value = results.get()
            if kind == "error":
                raise UserError(value) from None
        raise
    except mp.ProcessExitedException as died:
        if died.signal_name not in {signal.Signals(s).name for s in received}:
            raise
        # A forwarded stop signal reached a rank outside its training loop (still importing, or finishing), where
        # it keeps the default action: the rank died of it, as one process would, and nothing is left to stop
        # after a step. The launcher exits as a process killed by it does (128 + the signal), with one line instead
        # of a traceback; not 75, which promises a last.pt to resume from.
        print(f"stopped by {died.signal_name} while the ranks were starting or finishing, outside a step: rerun "
              "the same command (with --resume if the run directory holds last.pt)", file=sys.stderr, flush=True)
        sys.exit(128 + signal.Signals[died.signal_name])
    kind, result = results.get()
    if kind == "preempted":
        raise Preempted(result)
    return result
