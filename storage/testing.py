"""Tiny deterministic stores for tests (this package's and the pipelines'): no video, no model.

Everything is a pure function of (shape, seed, video index), so a test can regenerate what a writer in
another process wrote and compare exactly.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from storage import frames_codec
from storage.encoding import ENCODED_FORMAT_VERSION, request_of
from storage.pca import draw_sample, fit_videos
from storage.schema import StoreSchema
from storage.writer import StoreWriter

TINY = {"layers": [0, 1], "num_frames": 4, "tokens": 17, "width": 64, "embed_dim": 32, "num_layers": 2}


def make_schema(num_videos: int = 6, views: int = 2, *, dtype: str = "fp16", codec: str = "none",
                layers: list[int] | None = None, num_frames: int = 4, seed: int = 0,
                model: str = "dist-tiny", num_classes: int = 3, dense_gamma: int | None = None,
                jpeg_quality: int | None = None, compact: bool = False, pca: int | float | None = None,
                sample_videos: int | None = None) -> StoreSchema:
    """A tiny schema; `dense_gamma` adds dense frames, raw, or JPEG at `jpeg_quality`; `compact` (or a `pca`
    request) makes a compact store's (format 3, fitted when created)."""
    layers = list(TINY["layers"] if layers is None else layers)
    compact = compact or pca is not None
    return StoreSchema.from_json({
        "format_version": ENCODED_FORMAT_VERSION if compact else 2,
        **({"encoding": request_of(pca, dtype, sample_videos, seed)} if compact else {}),
        "backbone": {"model": model, "model_config": {"embed_dim": TINY["embed_dim"]}, "pretrained": "none",
                     "weights_sha256": "0" * 64, "image_size": 64, "patch_size": 16, "width": TINY["width"],
                     "embed_dim": TINY["embed_dim"], "num_layers": max(TINY["num_layers"], max(layers) + 1),
                     "mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "activation": "gelu",
                     "open_clip_version": "test"},
        "preprocess": {"resize": "crop-then-resize", "interpolation": "bilinear",
                       "decoder": {"name": "decord", "version": "test"}},
        "layers": layers, "num_frames": num_frames, "views_per_video": views, "split": "train",
        "dtype": dtype, "codec": codec, "precision": "fp32", "tokens": TINY["tokens"], "width": TINY["width"],
        "sampling": {"seed": seed, "method": "tsn", "flip_label_map": None},
        "dense_frames": None if dense_gamma is None else frames_codec.section(
            dense_gamma, frames_codec.RAW if jpeg_quality is None else frames_codec.JPEG, jpeg_quality),
        "num_videos": num_videos,
        "class_names": [f"class{c}" for c in range(num_classes)],
        "text": {"templates": ["a video of {}."]},
        "software": {"note": "informational, not compat"},
    })


def manifest(schema: StoreSchema) -> tuple[list[str], list[int], np.ndarray]:
    V, nc, E = schema.num_videos, schema.num_classes, schema.embed_dim
    videos = [f"class{v % nc}/video_{v:03d}.mp4" for v in range(V)]
    labels = [v % nc for v in range(V)]
    text = np.random.default_rng(12345).standard_normal((nc, E)).astype(np.float32)
    return videos, labels, text


def video_data(schema: StoreSchema, v: int) -> tuple[dict, list[dict], np.ndarray, np.ndarray]:
    """(facts, plans, features float32 (K,L,T,N+1,C), clip_embeds (K,T,E)) for video v."""
    K, T = schema.views_per_video, schema.num_frames
    L, N1, C, E = len(schema.layers), schema.tokens, schema.width, schema.embed_dim
    rng = np.random.default_rng([schema.sampling["seed"], v])
    facts = {"num_frames": 30 + v, "fps": 25.0, "width": 64 + v, "height": 48}
    plans = [{"sparse_indices": sorted(int(x) for x in rng.integers(0, 30 + v, T)), "window": (30 + v) / T,
              "crop": [int(v), k, 40, 40], "flip": bool(k % 2), "grayscale": bool(v % 3 == 0)} for k in range(K)]
    features = rng.standard_normal((K, L, T, N1, C)).astype(np.float32) * 1.5
    clip = rng.standard_normal((K, T, E)).astype(np.float32)
    return facts, plans, features, clip


def video_frames(schema: StoreSchema, v: int) -> np.ndarray | None:
    """uint8 (K, G*T, R, R, 3) dense frames of video v, or None for a store without frames."""
    if schema.dense_gamma is None:
        return None
    shape = (schema.views_per_video, schema.dense_gamma * schema.num_frames, schema.image_size, schema.image_size, 3)
    return np.random.default_rng([schema.sampling["seed"], v, 1]).integers(0, 256, shape, dtype=np.uint8)


def fit_function(schema: StoreSchema) -> Any:
    """What StoreWriter.open calls to fit a compact test store: storage.pca on the videos' generated features."""
    if schema.encoding is None:
        return None
    section = schema.encoding
    count = section["sample"]["videos"]
    sample = draw_sample(range(schema.num_videos), schema.num_videos if count == "auto" else count,
                         section["sample"]["seed"])
    pca = None if section["pca"] is None else section["pca"]["request"]
    return lambda: fit_videos(lambda v: video_data(schema, v)[2], sample, pca=pca,
                              quantize=section["quantization"] is not None, source="storage.testing")


def open_writer(url: str, schema: StoreSchema, **kwargs: Any) -> StoreWriter:
    videos, labels, text = manifest(schema)
    kwargs.setdefault("fit", fit_function(schema))
    return StoreWriter.open(url, schema, videos, labels, text, **kwargs)


def write_videos(url: str, schema: StoreSchema, indices: list[int], *, fail: set[int] = frozenset(),
                 delay_s: float = 0.0, finalize: bool = False, **kwargs: Any) -> StoreWriter:
    """Write the given videos (failures for those in `fail`), as an extraction worker would."""
    w = open_writer(url, schema, **kwargs)
    todo = set(w.pending())
    for v in indices:
        if v not in todo:
            continue
        if v in fail:
            w.write_failure(v, f"DecodeError: video {v} is truncated")
        else:
            w.write_video(v, *video_data(schema, v), frames=video_frames(schema, v))
        if delay_s:
            time.sleep(delay_s)
    if finalize:
        w.finalize()
    return w

