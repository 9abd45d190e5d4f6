"""Data-parallel training: `torchrun --nproc_per_node N -m pipelines.train_ddp TRAIN-FLAGS` or
`dist-cache train --nproc N ...` (which spawns the N processes itself, on this machine).

Every rank runs `pipelines.train.train`; it joins the process group when the launcher's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) says it is one of several. --batch-size stays the global
batch: each rank takes an equal, disjoint share of it, so N ranks take the same steps, and (gradients being
averaged) reach the same weights, as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_cache.errors import UserError

VALIDATION_TIMEOUT = datetime.timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 alone writes checkpoints, metrics, plots and the progress bar."""
        return self.rank == 0


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's place in the launcher's process group (rank 0 of 1 without a launcher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        yield Ranks(0, 1, device)
        return
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    # Rank 0 validates alone between epochs while the others wait in their next all-reduce, so the
    # collective timeout must outlast a validation pass (NCCL's default is 10 minutes).
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            device_id=device if device.type == "cuda" else None, timeout=VALIDATION_TIMEOUT)
    try:
        yield Ranks(rank, world, device)
    finally:
        dist.destroy_process_group()


def global_means(values: list[torch.Tensor], ranks: Ranks) -> list[float]:
    """The mean over all ranks of each of several per-rank scalars (global-batch losses for the log), with one
    all-reduce and one device sync for all.
    Every rank must call it at the same points (it is a collective when world > 1)."""
    if not values:
        return []
    stacked = torch.stack([v.detach().float().reshape(()) for v in values])
    if ranks.world == 1:
        return stacked.tolist()
    dist.all_reduce(stacked)
    return [v / ranks.world for v in stacked.tolist()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, opts, world: int, port: int, results) -> None:
    from pipelines.train import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        result = train(opts, progress=rank == 0)
    except UserError as err:
        # The parent sees a rank's exception as a traceback; the message goes to it first, to be reported
        # as the one line it is. Raising still fails the rank, so the parent stops the others.
        results.put(("error", str(err)))
        raise
    if rank == 0:
        results.put(("result", result))


def launch(opts, nproc: int):
    """Train with `nproc` processes on this machine; returns rank 0's TrainResult."""
    from pipelines.train import preflight

    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be at least 1")
    if "WORLD_SIZE" in os.environ:
        raise UserError("--nproc: already running under a launcher (torchrun); drop --nproc")
    preflight(opts, nproc)  # a bad flag or store fails here, as one line, before any process starts
    # spawn, not fork: zarr's asyncio threads and CUDA do not survive fork.
    results = mp.get_context("spawn").SimpleQueue()
    try:
        mp.start_processes(_rank_main, args=(opts, nproc, _free_port(), results), nprocs=nproc, start_method="spawn")
    except mp.ProcessRaisedException:
        while not results.empty():
            kind, value = results.get()
            if kind == "error":
                raise UserError(value) from None
        raise
    _, result = results.get()
    return result


def main() -> None:
    """torchrun entry point: the `dist-cache train` flags, run on every rank."""
    import cli

    if int(os.environ.get("RANK", "0")):
        sys.stdout = open(os.devnull, "w")  # rank 0 alone reports; errors still reach stderr
    cli.main(["train", *sys.argv[1:]])


if __name__ == "__main__":
    main()
