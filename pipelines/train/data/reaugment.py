"""Re-augmented training input (`train --online --reaugment`): a fresh view of every video in every epoch.

A cache replays the K views drawn at extraction; the reference draws new ones every epoch. This source draws them
as extraction drew its views (`dist_cache.sampling.plan_views` with the store's recorded train sampling: TSN
offsets, random resized crop with the recorded scale and ratio ranges, flip-p, grayscale-p), but seeded by
(training seed, epoch, video), so a run is reproducible and a resumed epoch draws the views it drew before. The
view is decoded with the decoder the store records and rendered exactly as extraction renders
(`dense_frames.decode_view`); the online CLIP sees every gamma-th of its dense frames. A flipped view of
a class in the store's flip-label map is labelled with its partner, as extraction labels its views.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from dist_cache.errors import UserError
from dist_cache.manifests import flip_partners
from dist_cache.sampling import RECORDED_KEYS
from pipelines.train.data.loader import DecodedFrames
from storage import FeatureStore


def check_reaugmentable(store: FeatureStore, flag: str) -> None:
    """Re-drawing views needs the train sampling the store recorded: a test-split store has none, and a store
    written by other tools may not record it."""
    sampling = store.schema.sampling
    if sampling.get("policy") == "uniform-clips":
        raise UserError(f"{flag} {store.url} is a test-split store (fixed clips, centre crops): --reaugment re-draws "
                        "train views; pass a store extracted with --split train")
    missing = [key for key in RECORDED_KEYS if key not in sampling]
    if missing:
        raise UserError(f"{flag} {store.url} does not record its sampling's {missing[0]}, which --reaugment draws "
                        "views with: re-extract it with dist-cache extract --split train")


class ReaugmentedFrames(DecodedFrames):
    """Sample (v, k)'s frames in epoch e: a view of video v planned afresh with rng(seed, e, v), whatever k."""

    def __init__(self, store: FeatureStore, video_root: str | Path, gamma: int, *, seed: int,
                 workers: int | Literal["auto"] = "auto", timeout: float = 120.0, decoder: str | None = None):
        check_reaugmentable(store, "--cache")  # before the decode pool starts its processes
        super().__init__(store, video_root, gamma, workers=workers, timeout=timeout, decoder=decoder)
        # One view of each video per epoch, drawn with the training seed.
        self.sampling = dataclasses.replace(store.schema.view_sampling(), views=1, seed=seed)
        pairs = store.schema.sampling.get("flip_label_map") or []
        self.partners = flip_partners(pairs, store.schema.class_names)

    def view(self, sample: dict, epoch: int) -> tuple[dict, int | None]:
        v = int(sample["video_index"])
        (plan,) = self.sampling.plan(int(sample["num_frames"]), int(sample["width"]), int(sample["height"]), v, epoch)
        label = int(self.store.labels[v])
        return plan.to_dict(), self.partners.get(label, label) if plan.flip else label
