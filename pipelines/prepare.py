"""Turning one video into CLIP-ready pixels: probe, plan its views, decode, render.

This runs in decode worker processes (see `dist_cache.video.DecodePool`), so a decoder that hangs on
a corrupt file can be killed without taking the extractor with it, and decoding overlaps the forward
pass. Everything here is a plain function of its arguments, so the result never depends on which
worker ran it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from dist_cache.sampling import ViewPlan, plan_views
from dist_cache.transforms import render_frames
from dist_cache.video import VideoFacts, probe_video, read_frames


@dataclass(frozen=True)
class RenderSpec:
    """What a worker needs to render a video's views exactly as the store records them."""

    frames: int
    views: int
    split: str
    seed: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    grayscale_p: float


@dataclass
class PreparedVideo:
    video_index: int
    facts: VideoFacts
    file_facts: dict  # size_bytes, and sha256 when asked: lets verify spot a moved or replaced file
    plans: list[ViewPlan]
    images: np.ndarray  # (K*T, 3, S, S) float32, views in order, frames in order


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_facts(path: str, with_hash: bool) -> dict:
    facts: dict = {"size_bytes": os.path.getsize(path)}
    if with_hash:
        facts["sha256"] = file_sha256(path)
    return facts


def prepare_video(path: str, video_index: int, spec: RenderSpec, hash_video: bool = False) -> PreparedVideo:
    facts = probe_video(path)
    plans = plan_views(
        facts.num_frames,
        facts.width,
        facts.height,
        frames=spec.frames,
        views=spec.views,
        split=spec.split,
        seed=spec.seed,
        video_index=video_index,
        scale=spec.scale,
        ratio=spec.ratio,
        flip_p=spec.flip_p,
        grayscale_p=spec.grayscale_p,
    )
    # Decode the union of every view's frames once; views of one video often share frames.
    wanted = sorted({i for plan in plans for i in plan.sparse_indices})
    decoded = read_frames(path, wanted)
    position = {frame: row for row, frame in enumerate(wanted)}
    rendered = [
        render_frames(decoded[[position[i] for i in plan.sparse_indices]], plan, spec.image_size, spec.mean, spec.std)
        for plan in plans
    ]
    images = np.concatenate([r.numpy() for r in rendered])
    return PreparedVideo(video_index, facts, file_facts(path, hash_video), plans, images)
