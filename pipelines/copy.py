"""`dist-cache copy`: pull a (shared) store to another location, optionally keeping some layers, making it compact
(int8 with channel and token scales, PCA codes: pipelines/compact.py), dropping the dense frames or storing them as
JPEG, or packing several videos into each shard.

The destination is an ordinary store written through StoreWriter with the source's schema, layers, dtype and
frames changed, so resuming is the writer's: a rerun copies only videos without a record, and a destination
made with other options is refused by the compat check before anything is written.

A packed copy (`videos_per_shard` P > 1) holds P videos per shard and one record per group of P, so a store
of V videos is about 3V/P objects instead of 3V (Kinetics-400: ~720k). It is written a group at a time, once
every video of the group is done or failed in the source, and is read-only: nothing else writes into it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from dist_cache.backbone_config import resolve_layers
from dist_cache.errors import UserError
from pipelines.compact import (
    dry_run,
    encoding_section,
    format_dry_run,
    same_encoding,
    source_fit,
    stored_codes,
    with_encoding,
)
from storage import FORMAT_VERSION, FeatureStore, SampleStatus, StoreSchema, StoreWriter, frames_codec
from storage.frames_codec import StoredJpegs
from storage.records import VideoRecord, group_members
from storage.schema import format_value
from storage.writer import GroupVideo

FRAMES_CHOICES = ("keep", "drop")


@dataclass
class CopySummary:
    copied: int
    skipped: int
    failed: int
    pending_in_source: int
    complete: bool
    held_back: int = 0  # done in the source, but their packed group waits for a video still pending there


def source_layers(spec: str | None, source: StoreSchema) -> list[int]:
    """copy's `--layers`: all, last:N or a comma list, over the layers the source holds."""
    return resolve_layers(spec, source.layers, f"the source store's layers {format_value(list(source.layers))}")


def target_frames(source: StoreSchema, frames: str, frames_format: str | None, quality: int | None
                  ) -> dict[str, Any] | None:
    """The destination's `dense_frames`: the source's, dropped, or re-stored as JPEG (`--frames-format`,
    `--jpeg-quality`; a JPEG source keeps its quality unless told otherwise). JPEG frames are never written back
    as raw: decoding them does not give back the frames the features were computed from."""
    if frames_format is not None and frames_format not in frames_codec.FORMATS:
        raise UserError(f"--frames-format {frames_format}: use {' or '.join(frames_codec.FORMATS)}")
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"--jpeg-quality {quality}: must be 1..100")
    if frames == "drop" or source.dense_frames is None:
        if frames_format is not None or quality is not None:
            why = "the dense frames dropped" if frames == "drop" else "a source store that holds no dense frames"
            raise UserError(f"--frames-format/--jpeg-quality with {why}: there are no frames to store")
        return None
    have, have_quality = source.frames_format  # type: ignore[misc]
    wanted = frames_format or have
    if wanted == frames_codec.RAW:
        if have == frames_codec.JPEG:
            raise UserError(f"the source's dense frames are JPEG (quality {have_quality}): decoding them does not give "
                            "back the raw frames; re-extract with --dense-frames for raw ones, or keep them as JPEG")
        if quality is not None:
            raise UserError(f"--jpeg-quality {quality} applies to JPEG frames: add --frames-format jpeg")
        return frames_codec.section(source.dense_gamma)  # type: ignore[arg-type]
    quality = quality if quality is not None else have_quality
    # JPEG frames of another quality are decoded and encoded again: the section keeps each earlier quality, which
    # verify's bound replays.
    before = frames_codec.encodings(source.dense_frames)
    return frames_codec.section(source.dense_gamma, frames_codec.JPEG, quality,  # type: ignore[arg-type]
                                before[:-1] if quality == have_quality else before)


def target_schema(source: FeatureStore, layers: list[int], dtype: str | None, frames: str = "keep",
                  frames_format: str | None = None, jpeg_quality: int | None = None,
                  encoding: dict | None = None) -> StoreSchema:
    """The source's schema with the kept layers, dtype, frames and encoding (None: a plain store), in the current
    format (copy upgrades format 1)."""
    plain = dataclasses.replace(source.schema, format_version=FORMAT_VERSION, legacy=None, encoding=None,
                                layers=tuple(layers), dtype=dtype or source.schema.dtype, videos_sha256=None,
                                dense_frames=target_frames(source.schema, frames, frames_format, jpeg_quality))
    return with_encoding(plain, encoding)


def target_encoding(source: FeatureStore, dtype: str | None, pca: int | float | None,
                    pca_sample: int | None) -> tuple[str, dict | None]:
    """The copy's dtype and encoding request. Without --pca and --dtype the source's format is kept (a compact
    source's codes copied as stored, a format-2 int8 source's per-token absmax); otherwise the flags decide, a
    compact target fitted on a sample of the source."""
    src = source.schema
    if pca is None and dtype is None:
        return src.dtype, None if src.encoding is None else {**src.encoding, "fit": None}
    dtype = dtype or src.dtype
    return dtype, encoding_section(pca, dtype, pca_sample, int(src.sampling["seed"]))


class SourceArrays:
    """A source video's arrays in the destination's terms (kept layers, every view stacked): what the writer asks
    for (storage.writer.GroupSource), one array of one video at a time."""

    def __init__(self, source: FeatureStore, layers: list[int], dtype: str,
                 frames_format: tuple[str, int | None] | None = None, keep_codes: bool = False) -> None:
        self.store, self.layers, self.K = source, layers, source.schema.views_per_video
        # fp16 to fp16 is copied as stored; anything quantised goes through float32, so an int8 source is
        # dequantised once, without fp16 rounding, before any requantising. A compact source copied with its own
        # encoding gives its codes as stored (keep_codes).
        plain_fp16 = dtype == source.schema.dtype == "fp16" and source.schema.encoding is None
        self.dtype = np.float16 if plain_fp16 else np.float32
        self.keep_codes = keep_codes
        # JPEG frames of the destination's quality are copied as stored: decoding and encoding again would lose
        # a little more each time.
        self.jpeg_as_stored = frames_format is not None and frames_format[0] == frames_codec.JPEG \
            and source.schema.frames_format == frames_format

    def _samples(self, v: int) -> range:
        return range(v * self.K, (v + 1) * self.K)

    def features(self, v: int) -> Any:
        if self.keep_codes:
            return stored_codes(self.store, v, self.layers)
        return np.stack([self.store.features(i, self.layers, dtype=self.dtype) for i in self._samples(v)])

    def clip_embeds(self, v: int) -> np.ndarray:
        return np.stack([self.store.clip_embeddings(i) for i in self._samples(v)])

    def frames(self, v: int) -> np.ndarray | StoredJpegs:
        if self.jpeg_as_stored:
            quality = self.store.schema.frames_format[1]  # type: ignore[index]
            return StoredJpegs(quality, [self.store.frame_payloads(i) for i in self._samples(v)])  # type: ignore[arg-type]
        return np.stack([self.store.frames(i) for i in self._samples(v)])


def _as_group_video(record: VideoRecord) -> GroupVideo:
    if record.status == SampleStatus.FAILED:
        return GroupVideo(record.facts, error=record.error or "failed in the source store")
    return GroupVideo(record.facts, [view.plan() for view in record.views], [view.label for view in record.views])


def copy_store(src: str, dst: str, *, layers: str | None = None, dtype: str | None = None, frames: str = "keep",
               frames_format: str | None = None, jpeg_quality: int | None = None,
               videos_per_shard: int = 1, pca: int | float | None = None, pca_sample: int | None = None,
               src_options: dict[str, Any] | None = None, dst_options: dict[str, Any] | None = None,
               progress: bool = True) -> CopySummary:
    """Copy store `src` to `dst` (paths or URLs); a rerun resumes. See the module's docstring."""
    from tqdm import tqdm

    if frames not in FRAMES_CHOICES:
        raise UserError(f"--frames {frames!r}: use keep or drop")
    if videos_per_shard < 1:
        raise UserError(f"--videos-per-shard {videos_per_shard}: must be at least 1")
    source = FeatureStore.open(src, storage_options=src_options)
    kept = source_layers(layers, source.schema)
    dtype, section = target_encoding(source, dtype, pca, pca_sample)
    schema = target_schema(source, kept, dtype, frames, frames_format, jpeg_quality, section)
    writer = StoreWriter.open(dst, schema, source.videos, source.labels.tolist(), source.text_features,
                              storage_options=dst_options, videos_per_shard=videos_per_shard,
                              fit=None if section is None else source_fit(source, kept, section))
    arrays = SourceArrays(source, kept, schema.dtype, schema.frames_format,
                          keep_codes=same_encoding(source, section))
    todo = writer.pending()
    counts = {"copied": 0, "failed": 0, "pending": 0, "held_back": 0}
    with tqdm(total=len(todo), desc=f"copy -> {dst}", unit="video", disable=not progress, dynamic_ncols=True) as bar:
        if videos_per_shard == 1:
            for v in todo:
                _copy_video(writer, source, arrays, v, schema.dense_gamma is not None, counts)
                bar.update(1)
        else:
            for g in sorted({v // videos_per_shard for v in todo}):
                members = group_members(g, videos_per_shard, schema.num_videos)
                _copy_group(writer, source, arrays, g, members, counts)
                bar.update(len(members))
    summary = writer.finalize()
    return CopySummary(copied=counts["copied"], skipped=source.schema.num_videos - len(todo), failed=counts["failed"],
                       pending_in_source=counts["pending"], complete=bool(summary["complete"]),
                       held_back=counts["held_back"])


def copy_dry_run(src: str, *, layers: str | None = None, dtype: str | None = None, frames: str = "keep",
                 frames_format: str | None = None, jpeg_quality: int | None = None,
                 pca: int | float | None = None, pca_sample: int | None = None,
                 src_options: dict[str, Any] | None = None) -> str:
    """`copy SRC --dry-run`: what the copy would weigh (JPEG frames measured on a sample of the source) and, for a
    compact target, the fit's error on held-out videos of the source, fitted on a sample of it; nothing is
    written."""
    source = FeatureStore.open(src, storage_options=src_options)
    kept = source_layers(layers, source.schema)
    dtype, section = target_encoding(source, dtype, pca, pca_sample)
    schema = target_schema(source, kept, dtype, frames, frames_format, jpeg_quality, encoding=section)
    return format_dry_run(dry_run(source, schema, kept, section))


def _copy_video(writer: StoreWriter, source: FeatureStore, arrays: SourceArrays, v: int, frames: bool,
                counts: dict[str, int]) -> None:
    record = source.record(v)
    if record is None:
        counts["pending"] += 1  # not extracted yet in the source: a later copy picks it up
    elif record.status == SampleStatus.FAILED:
        counts["failed"] += writer.write_failure(v, record.error or "failed in the source store", record.facts)
    else:
        writer.write_video(v, record.facts, [view.plan() for view in record.views], arrays.features(v),
                           arrays.clip_embeds(v), frames=arrays.frames(v) if frames else None,
                           labels=[view.label for view in record.views])
        counts["copied"] += 1


def _copy_group(writer: StoreWriter, source: FeatureStore, arrays: SourceArrays, g: int, members: range,
                counts: dict[str, int]) -> None:
    recs = [source.record(v) for v in members]
    waiting = sum(r is None for r in recs)
    if waiting:  # the group's shards are written once, whole: wait for its last videos
        counts["pending"] += waiting
        counts["held_back"] += len(recs) - waiting
        return
    writer.write_group(g, [_as_group_video(r) for r in recs if r is not None], arrays)
    counts["failed"] += sum(r.status == SampleStatus.FAILED for r in recs if r is not None)
    counts["copied"] += sum(r.status == SampleStatus.DONE for r in recs if r is not None)
