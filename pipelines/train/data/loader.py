"""Stage-two input: cached features and the dense frames that belong to them, batched by a resumable sampler.

A sample (video v, view k, index v*K + k) is the stored features of the layers the model integrates and the
gamma*T dense frames of the same view, as uint8. The frames come from a `FrameSource`: the store's own dense
frames (`StoredFrames`, extract --dense-frames), or the video decoded at the view's recorded plan
(`DecodedFrames`, in a killable process pool). Either way dense[::gamma] are, byte for byte, the frames whose
CLIP features are cached. A source is asked for a sample's frames with the epoch, so a source that draws a fresh
plan every epoch (re-augmentation) fits the same slot.

`BatchLoader` is built for the GPU's pace (docs/DESIGN.md, "The stage-two loader"): reader threads in this
process (file reads, checksums and decoding release the GIL) fill a ring of host slabs, pinned when the
device is a GPU, straight from the store's one-read-per-sample path: features in their stored dtype (int8
codes and scales for int8 stores, a compact store's PCA codes), frames as uint8 (JPEG frames decoded by the reader
threads; on a GPU their compressed bytes are decoded there instead, one nvjpeg call per batch). A bounded number of
batches is in flight, so memory does not grow with the store. Each batch goes to the device with non-blocking copies
on a side stream; int8 features are dequantised and frames normalised there (`pipelines.train.branch.embed`), never on
the host, and PCA codes stay codes: the model folds the projection into its first linear maps.

The sampler owns all randomness of the data order: epoch e's order is a permutation seeded by (seed, e),
one cached view per video seeded by (seed, e, v). Given (epoch, batches already consumed), it yields the
exact remainder, which is what makes `--resume` land on the same weights as an uninterrupted run.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from dist_cache.decode_pool import DecodePool
from dist_cache.errors import DecodeError, UserError
from dist_cache.model.compact import TokenBatch
from dist_cache.model.tokens import TokenLayout, branch_tokens
from dist_cache.paths import resolve_under
from dist_cache.sampling import ViewPlan
from pipelines.compact_device import DeviceEncoding
from pipelines.train.data.dense_frames import VideoChanged, decode_view
from storage import FeatureStore, RawSample, frames_codec
from storage.reader import stored_shapes

# Batches being read while the model computes on the current one: enough to hide a slow read behind a step,
# few enough that host memory stays (PREFETCH + 1) batches whatever the store's size.
PREFETCH = 2
DECODE_PRELOAD = ("pipelines.train.data.dense_frames",)

# Fills `out` (uint8 (gamma*T, R, R, 3)) with one sample's frames; runs in a reader thread. Returns the label of
# the view it rendered when the source drew the view itself (a re-drawn flip may swap it), else None: the store's.
FrameJob = Callable[[np.ndarray], "int | None"]


class FrameSource(Protocol):
    """Where a sample's dense frames come from: gamma*T uint8 frames of the sample's view."""

    gamma: int

    def request(self, index: int, epoch: int) -> FrameJob:
        """Start producing sample `index`'s frames for `epoch` (a decode job starts at once); the returned job,
        run in a reader thread, writes them into its argument."""

    def close(self) -> None:
        """Stop any worker the source runs."""


class StoredFrames:
    """The store's dense frames (a subset of them when gamma < the stored gamma): one checked read each. JPEG frames
    are decoded by the job, in a reader thread (Pillow releases the GIL), only those of the subset; a loader on a
    GPU reads their compressed bytes instead (`payloads`) and decodes the batch there."""

    def __init__(self, store: FeatureStore, gamma: int):
        self.store, self.gamma = store, gamma
        self.jpeg = store.frames_format[0] == frames_codec.JPEG

    def request(self, index: int, epoch: int) -> FrameJob:
        def read(out: np.ndarray) -> None:
            self.store.frames(index, self.gamma, out=out)

        return read

    def payloads(self, index: int) -> list[np.ndarray]:
        """A JPEG store's frames of sample `index` for this gamma, as stored (checksums verified)."""
        return self.store.frame_payloads(index, self.gamma)

    def close(self) -> None:
        pass


class DecodedFrames:
    """The view's dense frames decoded from its video at the recorded plan, with the store's decoder (or `decoder`,
    which `pipelines.train.decoder_check` has vetted).

    `workers` > 0 decode in a `DecodePool` (processes: a decoder that hangs is killed at `timeout` and the run
    stops with one line, instead of stalling); 0 decodes in the reader threads (tiny clips, tests). Each video's
    file is checked against its record the first time this source decodes it.
    """

    def __init__(self, store: FeatureStore, video_root: str | Path, gamma: int, *,
                 workers: int | Literal["auto"] = "auto", timeout: float = 120.0, decoder: str | None = None):
        self.store, self.video_root, self.gamma = store, Path(video_root), gamma
        self.decoder = decoder or store.schema.preprocess["decoder"]["name"]
        self.pool = None if workers == 0 else DecodePool(workers, timeout, preload=DECODE_PRELOAD)
        self.checked: set[int] = set()

    def view(self, sample: dict, epoch: int) -> tuple[dict, int | None]:
        """The plan to decode for `sample` in `epoch`, and its label if it differs from the stored one (None):
        here the view's recorded plan, whatever the epoch."""
        return ViewPlan.from_dict(sample).to_dict(), None

    def request(self, index: int, epoch: int) -> FrameJob:
        sample = self.store.sample(index)
        v = int(sample["video_index"])
        expected = None
        if v not in self.checked:
            self.checked.add(v)
            expected = {key: sample[key] for key in ("size_bytes", "sha256", "width", "height")}
        path = str(resolve_under(self.video_root, sample["video"], f"store {self.store.url}"))
        plan, label = self.view(sample, epoch)
        args = (path, plan, self.gamma, int(sample["num_frames"]), self.store.schema.image_size, self.decoder,
                expected, f"video {v} of {self.store.url}")
        if self.pool is None:
            def decode_here(out: np.ndarray) -> int | None:
                np.copyto(out, decode_view(*args))
                return label

            return decode_here
        future = self.pool.submit(decode_view, *args)

        def job(out: np.ndarray) -> int | None:
            try:
                frames = future.result()
            except DecodeError as err:  # the pool's own: a hang killed at the timeout, a crashed worker
                raise VideoChanged(f"{err}; the video decoded at extraction: check the file, or raise the "
                                   "decode timeout") from None
            np.copyto(out, frames)
            return label

        return job

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


@dataclass
class Batch:
    """A batch on its device. On the CPU its tensors view the loader's buffers: valid until the next batch."""

    index: np.ndarray  # (B,) sample indices
    video_index: np.ndarray  # (B,)
    label: torch.Tensor  # (B,) int64, per-view labels
    # The branch's tokens, a summary token and the patches (`dist_cache.model.tokens.branch_tokens` of the stored
    # prefix tokens and patches): (L', B, T, N+1, C) float16 (format-2 int8 stores: dequantised on the device), or a
    # compact store's CompactTokens (its codes as stored, on the device: dequantised where the model reads each
    # layer, PCA folded)
    features: TokenBatch | None
    frames: torch.Tensor | None  # (B, gamma*T, R, R, 3) uint8 (JPEG decoded on a GPU: a channels-last view)

    def __len__(self) -> int:
        return len(self.index)


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.int8): torch.int8}


class _Slab:
    """Host buffers for one batch: what the reader threads fill, in the stored dtypes (pinned for a GPU)."""

    def __init__(self, store: FeatureStore, batch: int, layers: list[int] | None, frames: tuple[int, ...] | None,
                 pin: bool):
        def buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=pin)

        self.features = self.scales = None
        if layers:  # as stored: fp16 tokens, int8 codes and scales, or a compact store's flat codes
            (shape, dtype), scales = stored_shapes(store.schema, len(layers), store.code_size(layers))
            self.features = buffer((batch, *shape), _TORCH_DTYPES[dtype])
            self.scales = None if scales is None else buffer((batch, *scales[0]), torch.float16)
        self.frames = buffer((batch, *frames), torch.uint8) if frames else None
        self.labels = buffer((batch,), torch.int64)
        # JPEG frames decoded on the device: each row's compressed frames, read by the reader threads.
        self.payloads: list[list[np.ndarray] | None] = [None] * batch
        self.copied: torch.cuda.Event | None = None  # the device copy out of these buffers
        self.decoded: torch.cuda.Event | None = None  # the device decode of `payloads`

    def raw(self, j: int) -> RawSample:
        return RawSample(self.features[j].numpy(), None if self.scales is None else self.scales[j].numpy())

    def wait_copied(self) -> None:
        """Before the buffers are refilled: the device copy that read them must be over."""
        for event in (self.copied, self.decoded):
            if event is not None:
                event.synchronize()
        self.copied = self.decoded = None


class BatchLoader:
    """Batches of `sampler`'s indices, read by `read_threads` threads into a ring of PREFETCH + 1 host slabs.

    `layers`: the stored layers to read (None: no features, online training runs CLIP itself). `frames`: where
    the dense frames come from (None: no frames, a model without the temporal encoder or CLIP). A JPEG store's own
    frames are decoded on a GPU device where torchvision's nvjpeg runs there, else in the reader threads;
    `jpeg_on_device` decides instead (a benchmark comparing the two; on the CPU, torchvision's CPU decoder runs the
    same code path). Batches come out in the sampler's order whatever the threads' timing; the first read that
    fails raises, in this thread, when its batch is reached (a damaged chunk, a changed video), naming the sample.
    """

    def __init__(self, store: FeatureStore, sampler: EpochSampler, *, layers: Sequence[int] | None,
                 frames: FrameSource | None, device: torch.device, read_threads: int = 4, prefetch: int = PREFETCH,
                 jpeg_on_device: bool | None = None):
        if read_threads < 1 or prefetch < 1:
            raise ValueError(f"read_threads and prefetch must be >= 1, got {read_threads}, {prefetch}")
        self.store, self.sampler, self.device = store, sampler, device
        self.layers = None if layers is None else list(layers)
        self.frames = frames
        self.prefetch = prefetch
        s = store.schema
        gamma = getattr(frames, "gamma", None)
        frame_shape = (gamma * s.num_frames, s.image_size, s.image_size, 3) if frames is not None else None
        pin = device.type == "cuda"
        self._jpeg_on_device = _jpeg_on_device(frames, device) if jpeg_on_device is None else jpeg_on_device
        if self._jpeg_on_device and not (isinstance(frames, StoredFrames) and frames.jpeg):
            raise ValueError("jpeg_on_device needs the store's own JPEG frames (StoredFrames of a JPEG store)")
        self._slabs = [_Slab(store, sampler.batch_size, self.layers, None if self._jpeg_on_device else frame_shape,
                             pin) for _ in range(prefetch + 1)]
        self._threads = concurrent.futures.ThreadPoolExecutor(read_threads, thread_name_prefix="store-reader")
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._int8 = s.dtype == "int8"
        encoding = store.encoding if layers is not None else None
        # A compact store's parameters live on the device: its codes are decoded there, batch by batch.
        self._encoding = None if encoding is None else DeviceEncoding(
            encoding, s.layer_positions(self.layers), s.num_frames, s.tokens, device)
        # Which stored token is which: the batch's features are formed into the branch's on the device.
        self._layout = TokenLayout.of_record(s.backbone)

    def __len__(self) -> int:
        return len(self.sampler)

    def close(self) -> None:
        self._threads.shutdown(wait=True, cancel_futures=True)
        if self.frames is not None:
            self.frames.close()

    # ---------------------------------------------------------------- reading
    def _read(self, slab: _Slab, j: int, index: int, frame_job: FrameJob | None) -> None:
        if slab.features is not None:
            self.store.read_sample(index, self.layers, out=slab.raw(j))
        label = None
        if self._jpeg_on_device:
            slab.payloads[j] = self.frames.payloads(index)  # type: ignore[union-attr]
        elif frame_job is not None:
            label = frame_job(slab.frames[j].numpy())
        slab.labels[j] = self.store.label(index) if label is None else label

    def _submit(self, indices: list[int], slab: _Slab, epoch: int) -> list[concurrent.futures.Future]:
        slab.wait_copied()
        # Frame jobs are requested here, in order, so decode jobs reach the pool before the reads queue up.
        jobs = [None if self.frames is None else self.frames.request(i, epoch) for i in indices]
        return [self._threads.submit(self._read, slab, j, i, job) for j, (i, job) in enumerate(zip(indices, jobs))]

    def __iter__(self) -> Iterator[Batch]:
        epoch = self.sampler.epoch
        batches = iter(self.sampler)
        pending: collections.deque = collections.deque()
        turn = 0

        def top_up() -> None:
            nonlocal turn
            while len(pending) < self.prefetch:
                indices = next(batches, None)
                if indices is None:
                    return
                slab = self._slabs[turn % len(self._slabs)]
                turn += 1
                pending.append((indices, slab, self._submit(indices, slab, epoch)))

        futures: list[concurrent.futures.Future] = []
        try:
            top_up()
            while pending:
                indices, slab, futures = pending.popleft()
                for future in futures:
                    future.result()
                batch = self._to_device(indices, slab)
                top_up()  # the next reads overlap this batch's step
                yield batch
        finally:
            # An error or an abandoned iteration: nothing may still write into the slabs once this returns.
            unfinished = [f for _, _, fs in pending for f in fs] + futures
            for future in unfinished:
                future.cancel()
            concurrent.futures.wait(unfinished)

    # ---------------------------------------------------------------- to the device
    def _to_device(self, indices: list[int], slab: _Slab) -> Batch:
        n = len(indices)
        index = np.asarray(indices, dtype=np.int64)
        video_index = index // self.store.schema.views_per_video
        host = [None if t is None else t[:n] for t in (slab.features, slab.scales, slab.frames, slab.labels)]
        if self._copy_stream is None:
            features, scales, frames, labels = host
        else:
            current = torch.cuda.current_stream(self.device)
            # The copy does not wait for the steps queued before it: it overlaps them.
            with torch.cuda.stream(self._copy_stream):
                features, scales, frames, labels = [None if t is None else t.to(self.device, non_blocking=True)
                                                    for t in host]
                slab.copied = torch.cuda.Event()
                slab.copied.record(self._copy_stream)
            current.wait_stream(self._copy_stream)
            for t in (features, scales, frames, labels):
                if t is not None:
                    t.record_stream(current)  # allocated on the copy stream, used on this one
        if self._jpeg_on_device:
            frames = self._decode_frames(slab, n)
        if features is not None and self._encoding is not None:
            features = self._encoding.tokens(features, scales)
        elif features is not None:
            features = (dequantize(features, scales) if self._int8 else features).transpose(0, 1)
        if features is not None:
            features = branch_tokens(features, self._layout)
        return Batch(index, video_index, labels, features, frames)

    def _decode_frames(self, slab: _Slab, n: int) -> torch.Tensor:
        """The batch's JPEG frames decoded on the device in one nvjpeg call, on the current stream's timeline (the
        step that uses them waits for the decode). The slab keeps the compressed bytes until the decode is over."""
        rows = slab.payloads[:n]
        per_sample = len(rows[0])  # type: ignore[arg-type]
        R = self.store.schema.image_size
        frames = frames_codec.decode_on_device([p for row in rows for p in row], self.device,  # type: ignore[union-attr]
                                               (R, R, 3))
        if self.device.type == "cuda":
            slab.decoded = torch.cuda.Event()
            slab.decoded.record(torch.cuda.current_stream(self.device))
        return frames.unflatten(0, (n, per_sample))


def _jpeg_on_device(frames: FrameSource | None, device: torch.device) -> bool:
    """Whether a loader decodes the store's JPEG frames on `device` (a GPU that torchvision's nvjpeg decoder runs
    on) rather than in its reader threads: the compressed bytes, a tenth of the pixels', are what crosses to the
    device. A GPU where it does not run falls back to the reader threads, with a warning saying why."""
    if device.type != "cuda" or not isinstance(frames, StoredFrames) or not frames.jpeg:
        return False
    problem = frames_codec.device_decode_problem(device)
    if problem is not None:
        warnings.warn(f"{problem}: the store's JPEG frames are decoded on the CPU, in the reader threads",
                      stacklevel=3)
    return problem is None


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 codes (B, L, T, N+1, C) x fp16 scales (B, L, T, N+1) -> float16, on their device, exactly as
    `storage.dequantize_int8` (the product in float32, rounded once). Layer by layer: no float32 copy of
    the whole batch."""
    out = torch.empty(codes.shape, dtype=torch.float16, device=codes.device)
    for layer in range(codes.shape[1]):
        out[:, layer] = codes[:, layer].float() * scales[:, layer].float().unsqueeze(-1)
    return out


class EpochSampler:
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


def frame_source(store: FeatureStore, gamma: int, video_root: str | None, *, decode_workers: int | Literal["auto"],
                 decode_timeout: float, decoder: str | None = None) -> FrameSource:
    """The store's dense frames when it holds them for `gamma`, else decoding from `video_root` (which
    `pipelines.train.checks.check_frames` has vetted)."""
    if stored_frames_cover(store, gamma):
        return StoredFrames(store, gamma)
    if video_root is None:
        raise UserError(f"store {store.url} holds no dense frames for gamma {gamma}: pass --video-root")
    return DecodedFrames(store, video_root, gamma, workers=decode_workers, timeout=decode_timeout, decoder=decoder)


def stored_frames_cover(store: FeatureStore, gamma: int) -> bool:
    """Whether the store's dense frames include those for `gamma` (gamma divides the stored gamma)."""
    stored = store.dense_gamma
    return stored is not None and gamma <= stored and stored % gamma == 0
