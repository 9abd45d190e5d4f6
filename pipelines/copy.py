"""`dist-cache copy`: pull a (shared) store to another location, optionally keeping some layers or
quantising to int8.

The destination is an ordinary store written through StoreWriter with the source's schema, layers and
dtype changed, so resuming is the writer's: a rerun copies only videos without a record, and a
destination made with other options is refused by the compat check before anything is written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_cache.errors import UserError
from storage import FORMAT_VERSION, FeatureStore, SampleStatus, StoreSchema, StoreWriter
from storage.schema import format_value


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


def target_schema(source: FeatureStore, layers: list[int], dtype: str | None) -> StoreSchema:
    """The source's schema with the kept layers and dtype, in the current format (copy upgrades format 1)."""
    return dataclasses.replace(source.schema, format_version=FORMAT_VERSION, legacy=None, layers=tuple(layers),
                               dtype=dtype or source.schema.dtype, videos_sha256=None)


def copy_store(src: str, dst: str, *, layers: str | None = None, dtype: str | None = None,
               src_options: dict[str, Any] | None = None, dst_options: dict[str, Any] | None = None,
               progress: bool = True) -> CopySummary:
    from tqdm import tqdm

    source = FeatureStore.open(src, storage_options=src_options)
    kept = parse_layers(layers, list(source.schema.layers))
    writer = StoreWriter.open(dst, target_schema(source, kept, dtype), source.videos, source.labels.tolist(),
                              source.text_features, storage_options=dst_options)
    K = source.schema.views_per_video
    todo = writer.pending()
    copied = failed = pending = 0
    for v in tqdm(todo, desc=f"copy -> {dst}", unit="video", disable=not progress):
        record = source.record(v)
        if record is None:
            pending += 1  # not extracted yet in the source: a later copy picks it up
            continue
        if record.status == SampleStatus.FAILED:
            failed += writer.write_failure(v, record.error or "failed in the source store", record.facts)
            continue
        # float32, so an int8 source is dequantised once, without fp16 rounding, before any requantising.
        features = np.stack([source.features(v * K + k, kept, dtype=np.float32) for k in range(K)])
        clip = np.stack([source.clip_embeddings(v * K + k) for k in range(K)])
        frames = np.stack([source.frames(v * K + k) for k in range(K)]) if source.has_frames else None
        writer.write_video(v, record.facts, [view.plan() for view in record.views], features, clip, frames=frames,
                           labels=[view.label for view in record.views])
        copied += 1
    summary = writer.finalize()
    return CopySummary(copied=copied, skipped=source.schema.num_videos - len(todo), failed=failed,
                       pending_in_source=pending, complete=bool(summary["complete"]))
