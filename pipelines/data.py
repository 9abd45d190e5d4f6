"""Stage-two input: cached features plus the dense frames that belong to them, batched by a resumable sampler.

A sample (video v, view k, index v*K + k) yields the stored features of the layers the model integrates
and the gamma*T dense frames of the same view, decoded at `dense_indices(plan, ...)` and rendered to uint8
by the same `render_frames` call extraction used. So dense[::gamma] are, byte for byte, the frames whose
CLIP features are cached, and online training (CLIP run live on them) sees the same input. Frames are
normalised where batches reach the device (`pipelines.branch.embed`), with this dataset's mean and std.

The sampler owns all randomness of the data order: epoch e's order is a permutation seeded by (seed, e),
one cached view per video seeded by (seed, e, v). Given (epoch, batches already consumed), it yields the
exact remainder, which is what makes `--resume` land on the same weights as an uninterrupted run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_cache.decoders import get_decoder
from dist_cache.errors import DecodeError, UserError
from dist_cache.sampling import ViewPlan, dense_indices
from dist_cache.transforms import render_frames
from storage import FeatureStore


class VideoUnreadable(UserError):
    """A store's video that no longer decodes mid-run (replaced, truncated or gone since extraction)."""

    def __init__(self, message: str):
        # Raised in a DataLoader worker, it is rebuilt in the main process from "Caught VideoUnreadable in
        # DataLoader worker process N.\nOriginal Traceback ...\n<module>.VideoUnreadable: <message>":
        # keep the one-line message, which names the video.
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rstrip().splitlines()[-1].split(marker, 1)[-1]
        super().__init__(message)


class StoreClips(Dataset):
    """Items {index, video_index, label, features (L', T, N+1, C) fp16, frames (gamma*T, R, R, 3) uint8}.

    `layers` (CLIP block indices) selects the stored layers to read; None reads no features (online
    training runs CLIP itself). `frames=False` skips decoding (a model without the temporal encoder).
    `decoder` names the `dist_cache.decoders` backend (the one the store was extracted with).
    `mean` and `std` are the store's, for `normalize_frames` on the device.
    """

    def __init__(
        self,
        store: FeatureStore,
        video_root: str | Path,
        gamma: int,
        layers: Sequence[int] | None,
        frames: bool = True,
        decoder: str = "decord",
    ):
        self.store = store  # pickles as its URL: cheap to send to spawned workers
        self.video_root = Path(video_root)
        self.gamma = gamma
        self.layers = None if layers is None else list(layers)
        self.frames = frames
        self.decoder = decoder
        self.image_size = store.schema.image_size
        self.mean = tuple(store.schema.backbone["mean"])
        self.std = tuple(store.schema.backbone["std"])

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        sample = self.store.sample(index)
        item: dict[str, torch.Tensor | int] = {
            "index": index,
            "video_index": int(sample["video_index"]),
            "label": int(sample["label"]),
        }
        if self.layers is not None:
            item["features"] = torch.as_tensor(np.asarray(self.store.features(index, self.layers)))
        if self.frames:
            item["frames"] = self.render(sample)
        return item

    def render(self, sample: dict) -> torch.Tensor:
        """uint8 (gamma*T, R, R, 3): the view's dense frames, rendered exactly as extraction rendered its sparse ones."""
        plan = ViewPlan.from_dict(sample)
        wanted = dense_indices(plan, self.gamma, int(sample["num_frames"]))
        path = self.video_root / sample["video"]
        try:
            decoded = get_decoder(self.decoder).read(path, wanted.tolist())
        except DecodeError as err:
            reason = str(err).removeprefix(f"{path}: ")
            raise VideoUnreadable(
                f"{path} (video {sample['video_index']} of {self.store.url}): {reason}, but it decoded at "
                "extraction; restore the video the store was extracted from, or re-extract"
            ) from None
        return render_frames(decoded, plan, self.image_size)


class EpochSampler(Sampler[list[int]]):
    """Batches of sample indices, deterministic in (seed, epoch) and resumable mid-epoch.

    train=True: per epoch, one usable view per video (drawn with rng(seed, epoch, v)), in the order of a
    permutation drawn with rng(seed, epoch). train=False: every usable sample, in index order.
    With world_size > 1 the order is padded cyclically to a multiple of world_size (as DistributedSampler
    does) and rank r takes every world_size-th sample, so all ranks run the same number of batches.
    """

    def __init__(
        self,
        usable: np.ndarray,
        views_per_video: int,
        batch_size: int,
        *,
        seed: int = 0,
        train: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size={batch_size} / rank={rank} / world_size={world_size}")
        self.usable = np.sort(np.asarray(usable, dtype=np.int64))
        self.views = views_per_video
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self.rank = rank
        self.world_size = world_size
        # Usable views of each video with at least one, for the per-epoch view draw.
        videos, starts = np.unique(self.usable // views_per_video, return_index=True)
        self._videos = videos
        self._views_of = np.split(self.usable, starts[1:])
        self.epoch = 0
        self.skip = 0

    @property
    def samples_per_epoch(self) -> int:
        return len(self._videos) if self.train else len(self.usable)

    @property
    def batches_per_epoch(self) -> int:
        per_rank = math.ceil(self.samples_per_epoch / self.world_size)
        return math.ceil(per_rank / self.batch_size)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch, and how many of its batches were already consumed (resume)."""
        self.epoch = epoch
        self.skip = skip_batches

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices of the whole epoch, all ranks, in order."""
        if not self.train:
            return self.usable
        chosen = np.array(
            [views[np.random.default_rng([self.seed, epoch, int(v)]).integers(len(views))]
             for v, views in zip(self._videos, self._views_of)],
            dtype=np.int64,
        )
        return chosen[np.random.default_rng([self.seed, epoch]).permutation(len(chosen))]

    def _rank_order(self) -> np.ndarray:
        order = self.epoch_order(self.epoch)
        if self.world_size > 1 and len(order):
            total = math.ceil(len(order) / self.world_size) * self.world_size
            order = np.resize(order, total)  # np.resize repeats cyclically
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.skip)

    def __iter__(self) -> Iterator[list[int]]:
        order = self._rank_order()
        for b in range(self.skip, self.batches_per_epoch):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def _worker_init(_: int) -> None:
    # Each worker decodes and renders one item at a time; one thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)


def make_loader(
    dataset: StoreClips, sampler: EpochSampler, *, workers: int, device: torch.device, prefetch: int = 2
) -> DataLoader:
    """A DataLoader whose memory is bounded by workers * prefetch batches, whatever the store size.

    Workers are spawned, not forked: zarr's asyncio threads (and a CUDA context) do not survive fork.
    """
    extra = {}
    if workers > 0:
        extra = dict(multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=prefetch,
                     worker_init_fn=_worker_init)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda", **extra)
