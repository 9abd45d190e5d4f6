"""Stopping a training run cleanly when its machine is taken away (SLURM, Kubernetes, spot instances).

SIGTERM (Kubernetes and spot reclaims, SLURM at a job's end, `kill`) and SIGUSR1 (what SLURM sends ahead of the end
with `--signal=USR1@90`) ask the run to stop: the step being computed finishes, last.pt is written (atomically,
as every checkpoint is), and the process exits with PREEMPTED_EXIT after one line saying `--resume` continues.
Without this, a SIGTERM lost every step since the last periodic save (`--save-every`, 500 by default).

A handler only sets a flag; the loop asks after every step. Under DDP the signal may reach the ranks at different
steps, or some of them only: the ranks sum their flags after every step, so all of them stop after the same one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# EX_TEMPFAIL (sysexits.h): a temporary failure, the same command (with --resume) is to be tried again.
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """The run stopped on a stop signal, its last.pt written: the one line the CLI prints before PREEMPTED_EXIT."""


def preempted(received: int | None, step: int, total: int, out: str) -> Preempted:
    by = signal.Signals(received).name if received else "a stop signal to another rank"
    return Preempted(f"stopped by {by} after step {step} of {total}; {os.path.join(out, 'last.pt')} holds it: rerun "
                     "the same command with --resume to continue")


@contextlib.contextmanager
def handled(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for STOP_SIGNALS while the block runs, the previous handlers after it. Only the main thread may
    install handlers: elsewhere (a library caller's thread) the signals keep theirs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, before in previous.items():
            signal.signal(s, before)


class StopRequests:
    """Whether a stop signal arrived, as a context manager that listens while a run trains."""

    def __init__(self) -> None:
        self.received: int | None = None  # the first stop signal, until the run stops
        self._listening: contextlib.AbstractContextManager | None = None

    def _handle(self, signum: int, frame: object) -> None:
        self.received = self.received or signum

    def __enter__(self) -> StopRequests:
        self._listening = handled(self._handle)
        self._listening.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._listening.__exit__(*exc)

    def agreed(self, world: int, device: torch.device) -> bool:
        """Whether the run stops after this step: with `world` > 1 ranks a collective (every rank calls it after
        every step, `device` its own), true on every rank when any rank has received a stop signal."""
        if world == 1:
            return self.received is not None
        import torch
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.received is None else 1.0], device=device)  # NCCL reduces on the GPU
        dist.all_reduce(flag)
        return bool(flag.item())


def wait_for_all(world: int, device: torch.device) -> None:
    """With `world` > 1 ranks, return once every rank has called this (a collective, as a barrier on any backend)."""
    if world == 1:
        return
    import torch
    import torch.distributed as dist

    done = torch.zeros(1, device=device)
    dist.all_reduce(done)
    done.item()  # NCCL's all-reduce is asynchronous to the host: wait for it
