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
from storage import FeatureStore, StoreWriter, records
from storage.records import STATUS_CODES
from storage.schema import format_value

# Provenance fields of FeatureStore.sample() that make up a record's facts and view plans. The optional
# facts (the file's identity, which `verify --all-videos` checks) are copied when the source knows them.
FACT_KEYS = ("num_frames", "fps", "width", "height")
OPTIONAL_FACT_KEYS = ("size_bytes", "sha256")
PLAN_KEYS = ("sparse_indices", "window", "crop", "flip", "grayscale")
PENDING, FAILED = STATUS_CODES["pending"], STATUS_CODES[records.FAILED]


@dataclass
class CopySummary:
    copied: int
    skipped: int
    failed: int
    pending_in_source: int
    complete: bool


def parse_layers(text: str | None, available: list[int]) -> list[int]:
    """`--layers` of copy, with dist_cache.backbone.resolve_layers' grammar over the source's layers:
    None/"all" -> all of them, "last:N" (N in 1..len(available)) -> the last N, or a comma list of block
    indices that must all be in the source. Anything else is a one-line UserError naming the flag.

    (resolve_layers itself counts a model's layers, and importing it pulls in torch.)"""
    spec = "all" if text is None else text.strip()
    if spec == "all":
        return list(available)
    where = f"the source store has layers {format_value(list(available))}"
    if spec.startswith("last:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or not 1 <= int(count) <= len(available):
            raise UserError(f"--layers {spec}: N must be 1..{len(available)} ({where})")
        return list(available[len(available) - int(count):])
    try:
        wanted = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--layers {spec!r} is not 'all', 'last:N' or a comma list of block indices") from None
    if not wanted:
        raise UserError(f"--layers {spec!r} is not 'all', 'last:N' or a comma list of block indices")
    missing = [x for x in wanted if x not in available]
    if missing:
        raise UserError(f"--layers {spec}: layers {format_value(missing)} are not in the source store ({where})")
    return wanted


def record_facts(sample: dict[str, Any]) -> dict[str, Any] | None:
    """The facts a source sample carries, all of them (None if the source never decoded the video)."""
    if sample["num_frames"] is None:
        return None
    facts = {k: sample[k] for k in FACT_KEYS}
    facts.update({k: sample[k] for k in OPTIONAL_FACT_KEYS if sample.get(k) is not None})
    return facts


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
        facts = record_facts(samples[0])
        if per_video[v] == FAILED:
            failed += writer.write_failure(v, samples[0]["error"] or "failed in the source store", facts)
            continue
        if per_video[v] == PENDING:
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
