"""Checks that a store fits a run before any step is taken, each failing as one actionable line.

A mismatch found here would otherwise surface as a shape error deep inside the model, or worse, as a
run that trains without error on features from another backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_cache.backbone import check_recorded_config
from dist_cache.backbone_config import resolve_layers
from dist_cache.decoders import get_decoder
from dist_cache.errors import UserError
from dist_cache.model import DiSTConfig
from dist_cache.paths import resolve_under
from pipelines.train.data.loader import stored_frames_cover
from pipelines.train.decoder_check import check_decoder
from storage import FeatureStore, SampleStatus, frames_codec
from storage.schema import BACKBONE_COMPAT_KEYS, format_value


def open_store(url: str, flag: str, storage_options: dict | None = None) -> FeatureStore:
    try:
        return FeatureStore.open(url, storage_options or None)
    except UserError as err:
        raise UserError(f"{flag} {url}: {err}") from None


def usable_samples(store: FeatureStore, flag: str) -> tuple[np.ndarray, int]:
    """Indices of the samples with features, and how many failed at extraction (skipped, not an error).

    A store still being extracted is refused: its sample set would change under a running (or resumed) job.
    """
    status = store.status
    counts = store.progress()
    if counts["pending"]:
        raise UserError(
            f"{flag} {store.url}: {counts['pending']} videos are not extracted yet; "
            "finish the extraction (rerun dist-cache extract with the same flags) first"
        )
    return np.flatnonzero(status == SampleStatus.DONE), counts["failed"] * store.schema.views_per_video


def check_frames(store: FeatureStore, usable: np.ndarray, config: DiSTConfig, video_root: str | None, flag: str, *,
                 online: bool, decode: bool = False, decoder: str | None = None) -> tuple[str | None, str | None]:
    """Where this run's dense frames will come from: None (a cached model without the temporal encoder needs
    none), "stored" (the store holds them for the model's gamma), or "decoded" (from `video_root`, with `decoder`
    or else the store's, every video there and of its recorded size; always when `decode`); and, for frames
    decoded with a `decoder` that is not the store's, the line saying what `check_decoder` checked (else None).
    Fails now, as one line, rather than in a reader thread mid-epoch."""
    if not (online or config.switches.temporal):
        return None, None
    stored, gamma = store.dense_gamma, config.switches.gamma
    if stored_frames_cover(store, gamma) and not decode:
        return "stored", None
    if video_root is None:
        if stored is not None:
            raise UserError(f"store {store.url} holds dense frames for gamma {stored}, which covers gamma {stored} "
                            f"and its divisors, not {gamma}; pass --gamma {stored} (or a divisor), or {flag} to decode "
                            "them from the videos")
        raise UserError(f"store {store.url} holds no dense frames: pass {flag} (where its videos are) to decode "
                        "them, or extract the store with --dense-frames")
    recorded = store.schema.preprocess["decoder"]["name"]
    try:
        get_decoder(decoder or recorded)
    except UserError:
        if decoder:
            raise
        raise UserError(f"store {store.url} was extracted with the {recorded} decoder, which cannot be used on this "
                        "machine: pass --decoder pyav to decode its videos with PyAV (checked against the store "
                        "first), or use a store extracted with --dense-frames or --decoder pyav") from None
    check_video_root(store, usable, video_root, flag)
    return "decoded", check_decoder(store, usable, video_root, decoder) if decoder else None


def online_jpeg_warning(store: FeatureStore, online: bool, frames: str | None) -> str | None:
    """The caveat of running CLIP live (--online) on a store's JPEG frames: its input is then lossy, not the exact
    frames the cached features were computed from (None when that is not the case)."""
    found = store.schema.frames_format
    if not online or frames != "stored" or found is None or found[0] != frames_codec.JPEG:
        return None
    return (f"--online runs CLIP on store {store.url}'s JPEG frames (quality {found[1]}), not on the exact frames its "
            "cached features were computed from: an online baseline for it should use a store with raw frames")


def check_video_root(store: FeatureStore, usable: np.ndarray, video_root: str, flag: str) -> None:
    """The dense frames are decoded from the original videos: every video with a usable sample must be there
    (one stat each), with the size the store recorded. The first missing or changed one and the count name what
    is wrong, e.g. a root that holds only part of the dataset. (sha256s, where recorded, are checked as each
    video is first decoded.)"""
    if not len(usable):
        return
    videos = store.videos
    K = store.schema.views_per_video
    wanted = np.unique(np.asarray(usable, dtype=np.int64) // K)
    missing, changed = [], []
    for v in wanted:
        path = resolve_under(video_root, videos[v], f"store {store.url}")
        if not path.is_file():
            missing.append(videos[v])
            continue
        size, recorded = path.stat().st_size, store.sample(int(v) * K)["size_bytes"]
        if recorded is not None and size != recorded:
            changed.append((videos[v], size, recorded))
    if missing:
        raise UserError(
            f"{flag} {video_root} has no {missing[0]} ({len(missing)} of the {len(wanted)} videos of {store.url} "
            "are missing there); pass the directory the store's manifest paths are relative to"
        )
    if changed:
        name, size, recorded = changed[0]
        raise UserError(
            f"{flag} {video_root}: {name} is {size} bytes, but the store recorded {recorded} ({len(changed)} of the "
            f"{len(wanted)} videos differ): these are not the videos {store.url} was extracted from; restore them, "
            "or re-extract the store from these files"
        )


def select_layers(spec: str, store: FeatureStore, online: bool) -> list[int]:
    """`--layers`: all (the store's layers), last:N or a comma list of CLIP block indices.

    Cached training can only integrate layers the store holds; online training computes any layer.
    """
    if spec.strip() == "all":
        return list(store.schema.layers)
    layers = resolve_layers(spec, int(store.schema.backbone["num_layers"]))
    if not online:
        check_layers(store, layers, "--cache")
    return layers


def check_layers(store: FeatureStore, layers: Sequence[int], flag: str) -> None:
    have = list(store.schema.layers)
    missing = [layer for layer in layers if layer not in have]
    if missing:
        raise UserError(
            f"{flag} {store.url} holds layers {format_value(have)}, but the model integrates "
            f"{format_value(list(layers))} (missing {format_value(missing)}); pass --layers within the store's, "
            "or extract a store with those layers"
        )


def check_backbone(store: FeatureStore, recorded: dict[str, Any], flag: str, against: str) -> None:
    """The store's features must come from the same backbone as `recorded`: what a resume of either store would
    compare (model, config, weights, geometry, normalisation, activation: schema.BACKBONE_COMPAT_KEYS), except that
    weights of one sha256 are the same weights whatever their file was called (`pretrained` records a local
    checkpoint's file name: the validation store may have been extracted from a copy of it)."""
    same_weights = recorded.get("weights_sha256") is not None and \
        store.schema.backbone.get("weights_sha256") == recorded.get("weights_sha256")
    for key in BACKBONE_COMPAT_KEYS:
        mine, theirs = store.schema.backbone.get(key), recorded.get(key)
        if key == "pretrained" and same_weights:
            continue
        if mine != theirs:
            raise UserError(
                f"{flag} {store.url} was extracted with backbone {key} {format_value(mine)}, but {against} "
                f"used {format_value(theirs)}; use a store extracted with the same --model and --pretrained"
            )


def check_evaluation_store(store: FeatureStore, flag: str) -> None:
    """Scoring sums each video's views and compares the sum with the video's label. A train-split store's views are
    random crops, and a flipped view of a mirrored class (extract --flip-label-map) carries its partner's label,
    which per-video scoring would count as wrong: evaluation takes test-split stores only."""
    if store.schema.split != "test":
        raise UserError(f"{flag} {store.url} is a {store.schema.split}-split store (augmented views, flipped views of "
                        "mirrored classes relabelled), which cannot be scored per video; evaluate on a store "
                        "extracted with --split test (3 clips x 1 centre crop)")


def check_store_fits(store: FeatureStore, config: DiSTConfig, flag: str, *, online: bool) -> None:
    """Frames and resolution shape the branch's parameters; layers must be readable unless run online, when the
    recorded backbone is rebuilt instead (its config, a stranger's, bounded before anything is built)."""
    if store.schema.num_frames != config.num_frames:
        raise UserError(
            f"{flag} {store.url} has {store.schema.num_frames} frames per view, the model takes {config.num_frames} "
            "(its parameters depend on T); use a store extracted with the same --frames"
        )
    if store.schema.image_size != config.image_size:
        raise UserError(
            f"{flag} {store.url} was rendered at {store.schema.image_size} px, the model takes "
            f"{config.image_size} px; use a store of the same backbone"
        )
    if not online:
        check_layers(store, config.layers, flag)
    else:
        check_recorded_config(store.schema.backbone)


