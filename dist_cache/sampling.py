"""Which frames, crop, flip and grayscale make up each cached view of a video.

A `ViewPlan` is stored next to its features, so stage two can rebuild the dense frames that belong to
the cached sparse ones: the sparse frames are `dense_indices(plan, gamma, n)[::gamma]`, rendered with
the same crop, flip and grayscale (as in the reference, where CLIP sees every gamma-th dense frame and
sparse slot k covers the dense frames from sparse frame k up to the next one).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

# The dense frames per sparse frame (the paper's gamma) dist-cache takes everywhere: extract --dense-gamma, train
# --gamma, and a store's dense_frames.gamma. Powers of two, so the frames of every smaller gamma are a subset of the
# stored G's (dense_subset); 8 is twice the paper's largest (Tab. 1d).
DENSE_GAMMAS = (1, 2, 4, 8)
# Where the clips of a test split sample their segments (`extract --test-offsets`).
TEST_OFFSETS = ("centred", "reference")


@dataclass(frozen=True)
class ViewPlan:
    sparse_indices: tuple[int, ...]  # T decoded-frame indices, one per segment
    window: float  # frames per segment (num_frames / T); the last slot's dense frames span this many
    crop: tuple[int, int, int, int]  # x, y, w, h in decoded-frame pixels
    flip: bool
    grayscale: bool

    def to_dict(self) -> dict:
        return {
            "sparse_indices": list(self.sparse_indices),
            "window": self.window,
            "crop": list(self.crop),
            "flip": self.flip,
            "grayscale": self.grayscale,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ViewPlan:
        x, y, w, h = (int(v) for v in d["crop"])
        return cls(
            sparse_indices=tuple(int(i) for i in d["sparse_indices"]),
            window=float(d["window"]),
            crop=(x, y, w, h),
            flip=bool(d["flip"]),
            grayscale=bool(d["grayscale"]),
        )


def dense_indices(plan: ViewPlan, gamma: int, num_frames: int) -> np.ndarray:
    """int64 (gamma * T,): slot k's gamma dense frames spread evenly from sparse[k] towards the next sparse frame.

    dense[gamma*k + j] = min(num_frames - 1, sparse[k] + floor(j * gap_k / gamma)), j < gamma, where gap_k is
    sparse[k+1] - sparse[k], and `window` for the last slot. So dense[::gamma] == sparse; the frames stay in
    temporal order (an offset of j * window / gamma would overtake the next sparse frame whenever TSN drew
    one late in its segment and the next early); and, as j / gamma == 2j / (2 gamma) exactly in floating
    point, the frames for gamma are a subset of those for 2 * gamma.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    sparse = np.asarray(plan.sparse_indices, dtype=np.int64)
    gaps = np.append(np.diff(sparse), plan.window).astype(np.float64)
    offsets = np.floor(gaps[:, None] * np.arange(gamma)[None, :] / gamma).astype(np.int64)
    return np.minimum(num_frames - 1, sparse[:, None] + offsets).reshape(-1)


def dense_subset(stored_gamma: int, gamma: int, frames: int) -> np.ndarray:
    """int64 (gamma * T,): positions, in the dense frames stored for `stored_gamma`, of those for `gamma`.

    dense_indices(plan, gamma)[m] == dense_indices(plan, stored_gamma)[dense_subset(stored_gamma, gamma, T)[m]]
    whenever gamma divides stored_gamma (j / gamma == j * r / (r * gamma) exactly in floating point)."""
    if gamma < 1 or stored_gamma % gamma:
        raise ValueError(f"gamma {gamma} does not divide the stored dense gamma {stored_gamma}")
    step = stored_gamma // gamma
    return (np.arange(frames)[:, None] * stored_gamma + np.arange(gamma)[None, :] * step).reshape(-1)


def _segment_frames(num_frames: int, frames: int, offsets: np.ndarray) -> tuple[tuple[int, ...], float]:
    """Frame floor((k + offset_k) * window) in each of `frames` equal segments; a video shorter than
    `frames` repeats frames, since window < 1 then."""
    window = num_frames / frames
    idx = np.floor((np.arange(frames) + offsets) * window).astype(np.int64)
    return tuple(int(i) for i in np.clip(idx, 0, num_frames - 1)), window


def _reference_clip_frames(num_frames: int, frames: int, clip: int, clips: int, gamma: int) -> tuple[int, ...]:
    """CLIP's frames of the reference's test clip `clip` of `clips` (DiST's `_segment_based_sampling`): the video
    split into gamma*T dense segments, each sampled at (clip + 1) / clips of its length (its centre for a single
    clip), rounded half to even, clamped to the last frame; CLIP takes every gamma-th. In T segments that is offset
    (clip + 1) / (clips * gamma): for 3 clips at gamma 2, 1/6, 1/3 and 1/2 of each. Exact rational arithmetic, so
    that halves round as the reference's do."""
    dense = frames * gamma
    i = np.arange(dense, dtype=np.int64)
    # Dense frame i sits at num_frames * num / den.
    num, den = (2 * i + 1, 2 * dense) if clips == 1 else (i * clips + clip + 1, clips * dense)
    q, r = np.divmod(num * num_frames, den)
    q = q + ((2 * r > den) | ((2 * r == den) & (q % 2 == 1)))
    return tuple(int(x) for x in np.clip(q, 0, num_frames - 1)[::gamma])


def _random_resized_crop(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawn from `rng`, as (x, y, w, h)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the whole frame, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def plan_views(
    num_frames: int,
    width: int,
    height: int,
    *,
    frames: int,
    views: int,
    split: str,
    seed: int,
    video_index: int,
    scale: tuple[float, float] = (0.4, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    grayscale_p: float = 0.2,
    epoch: int | None = None,
    test_offsets: str = "centred",
    offsets_gamma: int = 2,
) -> list[ViewPlan]:
    """`views` plans of `frames` sparse frames each.

    train: TSN (a uniform random frame in each of `frames` equal segments of the whole video), a
    RandomResizedCrop box, flip with p=flip_p and grayscale with p=grayscale_p, drawn independently per view.
    test: clip c takes offset (c + 0.5) / views of every segment ("centred"), or the reference's frames for dense
    frames at `offsets_gamma` ("reference", `_reference_clip_frames`), with the centre square crop, no flip, no
    grayscale.
    The generator is seeded by (seed, video_index) only, so plans never depend on processing order or worker,
    and view k is the same whatever the number of views. `epoch` (train only) seeds it by (seed, epoch,
    video_index) instead: the fresh views of re-augmented training, a new draw every epoch, reproducible.
    """
    if num_frames < 1 or width < 1 or height < 1:
        raise ValueError(f"cannot plan views of a video with {num_frames} frames of {width}x{height}")
    if frames < 1 or views < 1:
        raise ValueError(f"frames and views must be >= 1, got frames={frames}, views={views}")
    if split == "test":
        side = min(width, height)
        centre = ((width - side) // 2, (height - side) // 2, side, side)
        plans = []
        if test_offsets not in TEST_OFFSETS:
            raise ValueError(f"test_offsets must be one of {TEST_OFFSETS}, got {test_offsets!r}")
        for c in range(views):
            sparse, window = _segment_frames(num_frames, frames, np.full(frames, (c + 0.5) / views))
            if test_offsets == "reference":
                sparse = _reference_clip_frames(num_frames, frames, c, views, offsets_gamma)
            plans.append(ViewPlan(sparse, window, centre, flip=False, grayscale=False))
        return plans
    if split != "train":
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = np.random.default_rng([seed, video_index] if epoch is None else [seed, epoch, video_index])
    plans = []
    for _ in range(views):
        sparse, window = _segment_frames(num_frames, frames, rng.uniform(0.0, 1.0, size=frames))
        crop = _random_resized_crop(rng, width, height, scale, ratio)
        flip = bool(rng.uniform() < flip_p)
        grayscale = bool(rng.uniform() < grayscale_p)
        plans.append(ViewPlan(sparse, window, crop, flip, grayscale))
    return plans


# The keys of a store's `sampling` record that plan_views needs (a store written through the StoreWriter API may
# leave them out).
RECORDED_KEYS = ("seed", "scale", "ratio", "flip_p", "grayscale_p")


@dataclass(frozen=True)
class Sampling:
    """How a store's views are planned: plan_views' arguments as the store records them (`StoreSchema.view_sampling()`),
    so extraction, verify and re-augmented training draw a video's views from one record."""

    frames: int
    views: int
    split: str
    seed: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    grayscale_p: float
    test_offsets: str = "centred"
    offsets_gamma: int = 2

    @classmethod
    def recorded(cls, record: dict[str, Any], frames: int, views: int, split: str) -> Sampling | None:
        """From a store's `sampling` record and its frames, views and split; None when the record lacks a key."""
        if any(key not in record for key in RECORDED_KEYS):
            return None
        return cls(frames, views, split, int(record["seed"]), tuple(record["scale"]), tuple(record["ratio"]),
                   float(record["flip_p"]), float(record["grayscale_p"]), record.get("test_offsets", "centred"),
                   int(record.get("test_offsets_gamma", 2)))

    def plan(self, num_frames: int, width: int, height: int, video_index: int, epoch: int | None = None
             ) -> list[ViewPlan]:
        fields = dataclasses.asdict(self)
        return plan_views(num_frames, width, height, video_index=video_index, epoch=epoch, **fields)
