"""Turning one video into CLIP's pixels: probe, plan its views, decode, render (uint8; the device normalises).

This runs in decode worker processes (see `dist_cache.decode_pool.DecodePool`), so a decoder that hangs on
a corrupt file can be killed without taking the extractor with it, and decoding overlaps the forward
pass. Everything here is a plain function of its arguments, so the result never depends on which
worker ran it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np

from dist_cache.decoders import VideoFacts, get_decoder
from dist_cache.sampling import ViewPlan, plan_views
from dist_cache.transforms import render_frames


@dataclass(frozen=True)
class RenderSpec:
    """What a worker needs to render a video's views exactly as the store records them."""

    frames: int
    views: int
    split: str
    seed: int
    image_size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_p: float
    grayscale_p: float
    decoder: str = "decord"  # a `dist_cache.decoders` name: the store records it


@dataclass
class PreparedVideo:
    video_index: int
    facts: VideoFacts
    file_facts: dict  # size_bytes, and sha256 when asked: lets verify spot a moved or replaced file
    plans: list[ViewPlan]
    images: np.ndarray  # (K*T, R, R, 3) uint8, views in order, frames in order: normalise on the device


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
    def plan(facts: VideoFacts) -> list[ViewPlan]:
        return plan_views(
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

    def frames_of(plans: list[ViewPlan]) -> list[int]:
        # The union of every view's frames, decoded once: views of one video often share frames.
        return sorted({i for p in plans for i in p.sparse_indices})

    facts, decoded = get_decoder(spec.decoder).probe_and_read(path, lambda facts: frames_of(plan(facts)))
    plans = plan(facts)
    row = {frame: r for r, frame in enumerate(frames_of(plans))}
    images = np.concatenate(
        [render_frames(decoded[[row[i] for i in p.sparse_indices]], p, spec.image_size).numpy() for p in plans]
    )
    return PreparedVideo(video_index, facts, file_facts(path, hash_video), plans, images)
