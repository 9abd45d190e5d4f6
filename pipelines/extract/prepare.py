"""Turning one video into CLIP's pixels: probe, plan its views, decode, render (uint8; the device normalises).

This runs in decode worker processes (see `dist_cache.decode_pool.DecodePool`), so a decoder that hangs on
a corrupt file can be killed without taking the extractor with it, and decoding overlaps the forward
pass. Everything here is a plain function of its arguments, so the result never depends on which
worker ran it.

With dense frames (`extract --dense-frames`), each view's gamma*T dense frames are rendered once and CLIP's
input is their every gamma-th frame: `dense_indices(plan, G)[::G]` are the sparse indices and rendering is per
frame, so those bytes are exactly the sparse frames' (docs/DESIGN.md, "transforms.py").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_cache.decoders import VideoFacts, get_decoder
from dist_cache.paths import file_facts
from dist_cache.sampling import Sampling, ViewPlan, dense_indices
from dist_cache.transforms import render_frames
from storage.schema import StoreSchema


@dataclass(frozen=True)
class RenderSpec:
    """What a worker needs to render a video's views exactly as the store records them."""

    sampling: Sampling
    image_size: int
    decoder: str = "decord"  # a `dist_cache.decoders` name: the store records it
    dense_gamma: int | None = None  # G: also render each view's G*T dense frames (the store keeps them)

    @classmethod
    def of_schema(cls, schema: StoreSchema) -> RenderSpec:
        sampling = schema.view_sampling()
        assert sampling is not None, "extraction records its sampling"
        return cls(sampling, schema.image_size, schema.preprocess["decoder"]["name"], schema.dense_gamma)


@dataclass
class PreparedVideo:
    video_index: int
    facts: VideoFacts
    file_facts: dict  # size_bytes, and sha256 when asked: lets verify spot a moved or replaced file
    plans: list[ViewPlan]
    # (K, G*T, R, R, 3) uint8, views in order, frames in order; G = the dense gamma, 1 without dense frames.
    rendered: np.ndarray
    gamma: int = 1
    dense: bool = False  # whether `rendered` holds dense frames to store

    @property
    def images(self) -> np.ndarray:
        """CLIP's input, (K*T, R, R, 3) uint8: every G-th rendered frame of each view (normalise on the device)."""
        sparse = self.rendered[:, :: self.gamma]
        return sparse.reshape(-1, *sparse.shape[2:])

    @property
    def frames(self) -> np.ndarray | None:
        """The dense frames to store, (K, G*T, R, R, 3) uint8, or None when the store keeps none."""
        return self.rendered if self.dense else None


def prepare_video(path: str, video_index: int, spec: RenderSpec, hash_video: bool = False) -> PreparedVideo:
    gamma = spec.dense_gamma or 1

    def plan(facts: VideoFacts) -> list[ViewPlan]:
        return spec.sampling.plan(facts.num_frames, facts.width, facts.height, video_index)

    def wanted(plans: list[ViewPlan], num_frames: int) -> list[np.ndarray]:
        # Per view, the frames to render (dense_indices for G = 1 are the sparse indices).
        return [dense_indices(p, gamma, num_frames) for p in plans]

    def frames_of(facts: VideoFacts) -> list[int]:
        # The union of every view's frames, decoded once: views of one video often share frames.
        return sorted({int(i) for indices in wanted(plan(facts), facts.num_frames) for i in indices})

    facts, decoded = get_decoder(spec.decoder).probe_and_read(path, frames_of)
    plans = plan(facts)
    row = {frame: r for r, frame in enumerate(frames_of(facts))}
    rendered = np.stack([
        render_frames(decoded[[row[int(i)] for i in indices]], p, spec.image_size).numpy()
        for p, indices in zip(plans, wanted(plans, facts.num_frames))
    ])
    return PreparedVideo(video_index, facts, file_facts(path, hash_video), plans, rendered, gamma,
                         dense=spec.dense_gamma is not None)
