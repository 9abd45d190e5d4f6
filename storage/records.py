"""Per-video completion records (records/{v:09d}.json) and their gathering into dense tables.

A record is written after the video's shards, atomically, so "record exists" means "shards are whole".
It is the resume marker, the per-view provenance (frame indices, crop, flip, grayscale) and, for a
failed video, the reason. Records are canonical JSON, so two writers that extract the same video write
identical bytes, and finalize's tables do not depend on who wrote what.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

import numpy as np

from storage.layout import SAMPLE_TABLES, VIDEO_TABLES
from storage.schema import FORMAT_VERSION, canonical_json

DONE, FAILED = "done", "failed"
STATUS_CODES = {"pending": 0, DONE: 1, FAILED: 2}
STATUS_NAMES = {v: k for k, v in STATUS_CODES.items()}
MAX_ERROR_CHARS = 4000  # enough for a traceback's last lines; records stay small


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
        raise ValueError(f"{what} must be an int, got {x!r}")
    return int(x)


def _float(x: Any, what: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number, got {x!r}")
    value = float(x)
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return value


def facts_dict(facts: Any) -> dict[str, Any]:
    """Video facts as plain JSON; extra keys (decoder name, codec...) are kept as provenance."""
    d = _as_dict(facts, "facts")
    out = {k: v for k, v in d.items() if k not in ("num_frames", "fps", "width", "height")}
    out.update(num_frames=_int(d.get("num_frames"), "facts.num_frames"), fps=_float(d.get("fps"), "facts.fps"),
               width=_int(d.get("width"), "facts.width"), height=_int(d.get("height"), "facts.height"))
    try:
        return json.loads(canonical_json(out))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"facts must be plain JSON: {exc}") from None


def plan_dict(plan: Any, num_frames: int, where: str) -> dict[str, Any]:
    d = _as_dict(plan, where)
    idx = [_int(i, f"{where}.sparse_indices") for i in d.get("sparse_indices", ())]
    if len(idx) != num_frames:
        raise ValueError(f"{where}.sparse_indices has {len(idx)} frames, the store has num_frames={num_frames}")
    crop = [_int(c, f"{where}.crop") for c in d.get("crop", ())]
    if len(crop) != 4:
        raise ValueError(f"{where}.crop must be [x, y, w, h]")
    return {"sparse_indices": idx, "window": _float(d.get("window"), f"{where}.window"), "crop": crop,
            "flip": bool(d.get("flip")), "grayscale": bool(d.get("grayscale"))}


def done_record(video_index: int, facts: Any, plans: list[Any], views: int, num_frames: int,
                nbytes: int) -> dict[str, Any]:
    if len(plans) != views:
        raise ValueError(f"video {video_index}: {len(plans)} view plans, the store has views_per_video={views}")
    return {"format_version": FORMAT_VERSION, "video_index": video_index, "status": DONE, "error": None,
            "facts": facts_dict(facts), "bytes": int(nbytes),
            "views": [plan_dict(p, num_frames, f"plans[{k}]") for k, p in enumerate(plans)]}


def failed_record(video_index: int, error: str, facts: Any | None) -> dict[str, Any]:
    if not isinstance(error, str):
        raise TypeError(f"error must be a str (the reason), got {type(error).__name__}")
    text = error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."
    return {"format_version": FORMAT_VERSION, "video_index": video_index, "status": FAILED, "error": text,
            "facts": None if facts is None else facts_dict(facts), "bytes": 0, "views": []}


def encode(record: dict[str, Any]) -> bytes:
    return (canonical_json(record) + "\n").encode()


def decode(data: bytes, video_index: int) -> dict[str, Any]:
    record = json.loads(data)
    if record.get("video_index") != video_index or record.get("status") not in (DONE, FAILED):
        raise ValueError(f"record of video {video_index} is malformed")
    return record


def gather(records: Mapping[int, dict[str, Any]], num_videos: int, views: int, num_frames: int
           ) -> dict[str, np.ndarray]:
    """Dense per-sample and per-video tables (fills for pending/failed), deterministic in the records."""
    S = num_videos * views
    tables: dict[str, np.ndarray] = {}
    for name, (dtype, row_shape, fill) in SAMPLE_TABLES.items():
        shape = (S, *(num_frames if d == "T" else d for d in row_shape))
        tables[name] = np.full(shape, fill, dtype=dtype)
    for name, (dtype, _row, fill) in VIDEO_TABLES.items():
        tables[name] = np.full((num_videos,), fill, dtype=object if dtype is str else dtype)
    for v, rec in records.items():
        code = STATUS_CODES[rec["status"]]
        tables["videos/status"][v] = code
        tables["videos/error"][v] = rec["error"] or ""
        facts = rec.get("facts")
        if facts:
            for key in ("num_frames", "fps", "width", "height"):
                tables[f"videos/{key}"][v] = facts[key]
            tables["videos/size_bytes"][v] = facts.get("size_bytes", -1)
            tables["videos/sha256"][v] = facts.get("sha256", "")
        rows = slice(v * views, (v + 1) * views)
        tables["samples/status"][rows] = code
        for k, view in enumerate(rec["views"]):
            i = v * views + k
            tables["samples/sparse_indices"][i] = view["sparse_indices"]
            tables["samples/window"][i] = view["window"]
            tables["samples/crop"][i] = view["crop"]
            tables["samples/flip"][i] = view["flip"]
            tables["samples/grayscale"][i] = view["grayscale"]
    return tables


def summarize(records: Mapping[int, dict[str, Any]], num_videos: int) -> dict[str, int]:
    done = sum(1 for r in records.values() if r["status"] == DONE)
    failed = len(records) - done
    return {"done": done, "failed": failed, "pending": num_videos - len(records),
            "bytes": sum(int(r.get("bytes", 0)) for r in records.values())}


def sample_fields(record: dict[str, Any] | None, view: int) -> dict[str, Any]:
    """The per-sample part of FeatureStore.sample() from one record (None: pending)."""
    status = record["status"] if record else "pending"
    facts = (record or {}).get("facts") or {}
    plan = record["views"][view] if record and status == DONE else None
    return {
        "status": status, "error": (record or {}).get("error"),
        "sparse_indices": np.asarray(plan["sparse_indices"], dtype=np.int64) if plan else None,
        "window": plan["window"] if plan else None,
        "crop": tuple(plan["crop"]) if plan else None,
        "flip": plan["flip"] if plan else None,
        "grayscale": plan["grayscale"] if plan else None,
        "num_frames": facts.get("num_frames"), "fps": facts.get("fps"),
        "width": facts.get("width"), "height": facts.get("height"),
        "size_bytes": facts.get("size_bytes"), "sha256": facts.get("sha256"),
    }
