"""`dist-cache copy`: pull a (shared) store to another location, optionally keeping some layers or
quantising to int8.

The destination is an ordinary store written through StoreWriter with the source's schema, layers and
dtype changed, so resuming is the writer's: a rerun copies only videos without a record, and a
destination made with other options is refused by the compat check before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_cache.errors import UserError
from storage import FeatureStore, StoreWriter

# Provenance fields of FeatureStore.sample() that make up a record's facts and view plans.
FACT_KEYS = ("num_frames", "fps", "width", "height")
PLAN_KEYS = ("sparse_indices", "window", "crop", "flip", "grayscale")


@dataclass
class CopySummary:
    copied: int
    skipped: int
    failed: int
    pending_in_source: int
    complete: bool


def parse_layers(text: str | None, available: list[int]) -> list[int]:
    """None/"all" -> the source's layers; "last:N" or a comma list of block indices, all in the source."""
    if text is None or text == "all":
        return list(available)
    try:
        wanted = available[-int(text[5:]):] if text.startswith("last:") else [int(x) for x in text.split(",")]
    except ValueError:
        raise UserError(f"--layers {text!r}: expected all, last:N or a comma list of block indices") from None
    missing = [x for x in wanted if x not in available]
    if missing or not wanted:
        raise UserError(f"--layers {text!r}: layers {missing} are not in the source store (it has {available})")
    return sorted(set(wanted))


def target_schema(source: FeatureStore, layers: list[int], dtype: str | None) -> dict[str, Any]:
    schema = {k: v for k, v in source.schema.items() if k not in ("compat", "videos_sha256")}
    schema["layers"] = layers
    schema["dtype"] = dtype or source.dtype
    return schema


def copy_store(src: str, dst: str, *, layers: str | None = None, dtype: str | None = None,
               src_options: dict[str, Any] | None = None, dst_options: dict[str, Any] | None = None,
               progress: bool = True) -> CopySummary:
    from tqdm import tqdm

    source = FeatureStore.open(src, storage_options=src_options)
    kept = parse_layers(layers, source.layers)
    writer = StoreWriter.open(dst, target_schema(source, kept, dtype), source.videos, source.labels.tolist(),
                              source.text_features, storage_options=dst_options)
    K = source.views_per_video
    per_video = source.status[::K]
    todo = writer.pending()
    copied = failed = pending = 0
    for v in tqdm(todo, desc=f"copy -> {dst}", unit="video", disable=not progress):
        samples = [source.sample(v * K + k) for k in range(K)]
        facts = None if samples[0]["num_frames"] is None else {k: samples[0][k] for k in FACT_KEYS}
        if per_video[v] == 2:
            failed += writer.write_failure(v, samples[0]["error"] or "failed in the source store", facts)
            continue
        if per_video[v] == 0:
            pending += 1  # not extracted yet in the source: a later copy picks it up
            continue
        plans = [{k: (np.asarray(s[k]).tolist() if k == "sparse_indices" else s[k]) for k in PLAN_KEYS} for s in samples]
        # float32, so an int8 source is dequantised once, without fp16 rounding, before any requantising.
        features = np.stack([source.features(v * K + k, kept, dtype=np.float32) for k in range(K)])
        clip = np.stack([source.clip_embeddings(v * K + k) for k in range(K)])
        writer.write_video(v, facts, plans, features, clip)
        copied += 1
    summary = writer.finalize()
    return CopySummary(copied=copied, skipped=source.num_videos - len(todo), failed=failed,
                       pending_in_source=pending, complete=bool(summary["complete"]))
