"""Per-video completion records (records/{v:09d}.json), their gathering into tables, and back.

A record is written after the video's shards, atomically, so "record exists" means "shards are whole".
It is the resume marker, the per-view provenance (frame indices, crop, flip, grayscale, label) and, for
a failed video, the reason. Records are canonical JSON, so two writers that extract the same video write
identical bytes, and finalize's tables do not depend on who wrote what. A record that does not decode
(bad JSON, another video's record, impossible values) counts as absent: the video is pending and a
rerun of extract redoes it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from storage.layout import table_arrays
from storage.schema import FORMAT_VERSION, SampleStatus, StoreSchema, canonical_json, status_counts

MAX_ERROR_CHARS = 4000  # enough for a traceback's last lines; records stay small
FACT_KEYS = ("num_frames", "fps", "width", "height")


class RecordError(ValueError):
    """A record that is not a valid record of the video it is filed under."""


def _as_dict(obj: Any, what: str) -> dict[str, Any]:
    """Accept the dataclasses of dist_cache (ViewPlan, VideoFacts), anything with to_dict(), or a dict."""
    if isinstance(obj, Mapping):
        return dict(obj)
    if hasattr(obj, "to_dict"):
        return dict(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{what} must be a dict or a dataclass, got {type(obj).__name__}")


def _int(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise RecordError(f"{what} must be an int, got {x!r}")
    return int(x)


def _float(x: Any, what: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise RecordError(f"{what} must be a number, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise RecordError(f"{what} must be finite, got {x!r}")
    return value


def _bool(x: Any, what: str) -> bool:
    if not isinstance(x, (bool, np.bool_)):
        raise RecordError(f"{what} must be true or false, got {x!r}")
    return bool(x)


def facts_dict(facts: Any) -> dict[str, Any]:
    """Video facts as plain JSON; extra keys (size_bytes, sha256, decoder...) are kept as provenance."""
    d = _as_dict(facts, "facts")
    out = {k: v for k, v in d.items() if k not in FACT_KEYS}
    out.update(num_frames=_int(d.get("num_frames"), "facts.num_frames"), fps=_float(d.get("fps"), "facts.fps"),
               width=_int(d.get("width"), "facts.width"), height=_int(d.get("height"), "facts.height"))
    # Optional (absent: the decoder did not tell): the display transform applied ("" none) and variable frame rate.
    if "transform" in out and not isinstance(out["transform"], str):
        raise RecordError(f"facts.transform must be a string, got {out['transform']!r}")
    if "vfr" in out:
        out["vfr"] = _bool(out["vfr"], "facts.vfr")
    try:
        return json.loads(canonical_json(out))
    except (TypeError, ValueError) as exc:
        raise RecordError(f"facts must be plain JSON: {exc}") from None


@dataclasses.dataclass(frozen=True)
class ViewRecord:
    """One stored view: its frames, crop, flip, grayscale, and its label (None only in format 1)."""

    sparse_indices: tuple[int, ...]
    window: float
    crop: tuple[int, int, int, int]
    flip: bool
    grayscale: bool
    label: int | None

    @classmethod
    def parse(cls, plan: Any, label: int | None, schema: StoreSchema, where: str) -> ViewRecord:
        d = _as_dict(plan, where)
        idx = tuple(_int(i, f"{where}.sparse_indices") for i in d.get("sparse_indices", ()))
        if len(idx) != schema.num_frames:
            raise RecordError(f"{where}.sparse_indices has {len(idx)} frames, the store has "
                              f"num_frames={schema.num_frames}")
        crop = tuple(_int(c, f"{where}.crop") for c in d.get("crop", ()))
        if len(crop) != 4:
            raise RecordError(f"{where}.crop must be [x, y, w, h]")
        if label is not None and not 0 <= _int(label, f"{where}.label") < schema.num_classes:
            raise RecordError(f"{where}.label {label} is not a class index in [0, {schema.num_classes})")
        return cls(idx, _float(d.get("window"), f"{where}.window"), crop,  # type: ignore[arg-type]
                   _bool(d.get("flip", False), f"{where}.flip"), _bool(d.get("grayscale", False), f"{where}.grayscale"),
                   None if label is None else int(label))

    def plan(self) -> dict[str, Any]:
        """The view plan as dist_cache.sampling.ViewPlan.from_dict takes it."""
        return {"sparse_indices": list(self.sparse_indices), "window": self.window, "crop": list(self.crop),
                "flip": self.flip, "grayscale": self.grayscale}

    def to_json(self) -> dict[str, Any]:
        return {**self.plan(), "label": self.label}


@dataclasses.dataclass(frozen=True)
class VideoRecord:
    video_index: int
    status: SampleStatus
    error: str | None
    facts: dict[str, Any] | None
    views: tuple[ViewRecord, ...]
    nbytes: int = 0  # bytes of the video's shards as written

    @classmethod
    def done(cls, schema: StoreSchema, video_index: int, facts: Any, plans: Sequence[Any],
             labels: Sequence[int]) -> VideoRecord:
        K = schema.views_per_video
        if len(plans) != K or len(labels) != K:
            raise RecordError(f"video {video_index}: {len(plans)} view plans and {len(labels)} labels, the store "
                              f"has views_per_video={K}")
        views = tuple(ViewRecord.parse(p, label, schema, f"plans[{k}]") for k, (p,
                                                                                label) in enumerate(zip(plans, labels)))
        return cls(video_index, SampleStatus.DONE, None, facts_dict(facts), views)

    @classmethod
    def failed(cls, video_index: int, error: str, facts: Any | None) -> VideoRecord:
        if not isinstance(error, str):
            raise TypeError(f"error must be a str (the reason), got {type(error).__name__}")
        text = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."
        return cls(video_index, SampleStatus.FAILED, text, None if facts is None else facts_dict(facts), ())

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "video_index": self.video_index, "status": self.status.label,
                "error": self.error, "facts": self.facts, "bytes": self.nbytes,
                "views": [v.to_json() for v in self.views]}

    def encode(self) -> bytes:
        return (canonical_json(self.to_json()) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, video_index: int, schema: StoreSchema) -> VideoRecord:
        """Parse and check a stored record of `video_index`; RecordError names what is wrong."""
        return cls.from_json(_parse(data), video_index, schema)

    @classmethod
    def from_json(cls, raw: Any, video_index: int, schema: StoreSchema) -> VideoRecord:
        """Check a parsed record of `video_index` (a stranger's JSON); RecordError names what is wrong."""
        if not isinstance(raw, dict):
            raise RecordError("not a JSON object")
        if raw.get("video_index") != video_index:
            raise RecordError(f"it is the record of video {raw.get('video_index')!r}")
        status = raw.get("status")
        if status not in ("done", "failed"):
            raise RecordError(f"status {status!r} is neither done nor failed")
        facts, views = raw.get("facts"), raw.get("views")
        if not isinstance(views, list) or not (facts is None or isinstance(facts, dict)):
            raise RecordError("views must be a list and facts an object")
        if status == "failed":
            error = raw.get("error")
            return cls(video_index, SampleStatus.FAILED, error if isinstance(error, str) else "failed",
                       None if facts is None else facts_dict(facts), ())
        if facts is None:
            raise RecordError("a done record without facts")
        if len(views) != schema.views_per_video or not all(isinstance(v, dict) for v in views):
            raise RecordError(f"{len(views)} views, the store has views_per_video={schema.views_per_video}")
        # Format-1 records carry no per-view label: the reader fills in the video's.
        parsed = tuple(ViewRecord.parse(v, v.get("label"), schema, f"views[{k}]") for k, v in enumerate(views))
        nbytes = raw.get("bytes", 0)
        return cls(video_index, SampleStatus.DONE, None, facts_dict(facts), parsed,
                   nbytes if isinstance(nbytes, int) and nbytes >= 0 else 0)


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"not valid JSON ({type(exc).__name__})") from None


def group_members(group: int, videos_per_shard: int, num_videos: int) -> range:
    """The video indices of a packed store's group (the last one may be short)."""
    first = group * videos_per_shard
    return range(first, min(first + videos_per_shard, num_videos))


def encode_group(group: int, videos_per_shard: int, recs: Sequence[VideoRecord]) -> bytes:
    """A packed store's group record: the records of the group's videos, in order, after its shards."""
    raw = {"format_version": FORMAT_VERSION, "group": group, "videos_per_shard": videos_per_shard,
           "records": [r.to_json() for r in recs]}
    return (canonical_json(raw) + "\n").encode()


def decode_group(data: bytes, group: int, videos_per_shard: int, schema: StoreSchema) -> list[VideoRecord]:
    """The records in a group record of `group`, each checked like a video's; RecordError if any is wrong."""
    raw = _parse(data)
    if not isinstance(raw, dict) or raw.get("group") != group or raw.get("videos_per_shard") != videos_per_shard:
        raise RecordError(f"it is not the record of group {group} of {videos_per_shard} videos")
    members = group_members(group, videos_per_shard, schema.num_videos)
    recs = raw.get("records")
    if not isinstance(recs, list) or len(recs) != len(members):
        raise RecordError(f"it holds {len(recs) if isinstance(recs, list) else 'no'} records, the group has "
                          f"{len(members)} videos")
    return [VideoRecord.from_json(r, v, schema) for v, r in zip(members, recs)]


# ---------------------------------------------------------------- tables
def gather(records: Mapping[int, VideoRecord], schema: StoreSchema) -> dict[str, np.ndarray]:
    """Dense per-sample and per-video tables (fills for pending/failed), deterministic in the records."""
    K = schema.views_per_video
    tables = {spec.name: np.full(spec.shape, spec.fill_value, dtype=object if spec.dtype is str else spec.dtype)
              for spec in table_arrays(schema)}
    for v, rec in records.items():
        tables["videos/status"][v] = rec.status
        tables["videos/error"][v] = rec.error or ""
        if rec.facts:
            for key in FACT_KEYS:
                tables[f"videos/{key}"][v] = rec.facts[key]
            tables["videos/size_bytes"][v] = rec.facts.get("size_bytes", -1)
            tables["videos/sha256"][v] = rec.facts.get("sha256", "")
            transform = rec.facts.get("transform")
            tables["videos/transform"][v] = "" if transform is None else (transform or "none")
            tables["videos/vfr"][v] = -1 if rec.facts.get("vfr") is None else int(bool(rec.facts["vfr"]))
        tables["samples/status"][v * K:(v + 1) * K] = rec.status
        for k, view in enumerate(rec.views):
            i = v * K + k
            tables["samples/label"][i] = -1 if view.label is None else view.label
            tables["samples/sparse_indices"][i] = view.sparse_indices
            tables["samples/window"][i] = view.window
            tables["samples/crop"][i] = view.crop
            tables["samples/flip"][i] = view.flip
            tables["samples/grayscale"][i] = view.grayscale
    return tables


def from_tables(table: Any, v: int, K: int) -> VideoRecord | None:
    """The record a finalized store's tables hold for video v (None: pending). `table(name)` reads a table."""
    status = SampleStatus(int(table("videos/status")[v]))
    if status == SampleStatus.PENDING:
        return None
    facts = None
    if int(table("videos/num_frames")[v]) >= 0:
        facts = {"num_frames": int(table("videos/num_frames")[v]), "fps": float(table("videos/fps")[v]),
                 "width": int(table("videos/width")[v]), "height": int(table("videos/height")[v])}
        if (size := int(table("videos/size_bytes")[v])) >= 0:
            facts["size_bytes"] = size
        if sha := str(table("videos/sha256")[v]):
            facts["sha256"] = sha
        if transform := str(table("videos/transform")[v]):  # "" unknown, "none" none
            facts["transform"] = "" if transform == "none" else transform
        if (vfr := int(table("videos/vfr")[v])) >= 0:
            facts["vfr"] = bool(vfr)
    if status == SampleStatus.FAILED:
        return VideoRecord(v, status, str(table("videos/error")[v]) or "failed", facts, ())
    views = []
    for i in range(v * K, (v + 1) * K):
        label = int(table("samples/label")[i])
        views.append(ViewRecord(tuple(int(x) for x in table("samples/sparse_indices")[i]),
                                float(table("samples/window")[i]),
                                tuple(int(x) for x in table("samples/crop")[i]),  # type: ignore[arg-type]
                                bool(table("samples/flip")[i]), bool(table("samples/grayscale")[i]),
                                None if label < 0 else label))
    return VideoRecord(v, status, None, facts, tuple(views))


def summarize(records: Mapping[int, VideoRecord], num_videos: int) -> dict[str, int]:
    """Videos done / failed / pending, and the bytes of their shards."""
    codes = np.full(num_videos, SampleStatus.PENDING, np.uint8)
    for v, rec in records.items():
        codes[v] = rec.status
    return {**status_counts(codes), "bytes": sum(r.nbytes for r in records.values())}


def sample_dict(record: VideoRecord | None, view: int, video_label: int) -> dict[str, Any]:
    """The provenance part of FeatureStore.sample() for one view (record None: pending)."""
    status = record.status if record else SampleStatus.PENDING
    facts = (record.facts if record else None) or {}
    plan = record.views[view] if record and status == SampleStatus.DONE else None
    label = video_label if plan is None or plan.label is None else plan.label
    return {
        "label": label, "status": status.label, "error": record.error if record else None,
        "sparse_indices": np.asarray(plan.sparse_indices, dtype=np.int64) if plan else None,
        "window": plan.window if plan else None,
        "crop": plan.crop if plan else None,
        "flip": plan.flip if plan else None,
        "grayscale": plan.grayscale if plan else None,
        **{k: facts.get(k) for k in (*FACT_KEYS, "size_bytes", "sha256", "transform", "vfr")},
    }
