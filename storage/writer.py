"""StoreWriter: create or resume a feature store, write whole videos, finalize.

Safety comes from three rules, not from locks (zarr v3 has none):
  1. each video's data is one shard per array, written whole by one `write_video` call;
  2. the video's record is written after its shards, atomically, and is the only proof of completion;
  3. everything derived (metadata, records, finalize's tables) is a pure function of the inputs, so
     concurrent or repeated writers of the same video, or concurrent finalizers, write identical bytes.
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.errors import ZarrUserWarning

from dist_cache.errors import UserError
from storage import layout, records
from storage.errors import StoreMismatchError
from storage.quantize import quantize_int8
from storage.remote import Location, configure_zarr, open_location
from storage.schema import ATTR_KEY, SchemaFacts, check_compatible, compat_of, format_value, \
    validate_schema, videos_sha256

# A `*.partial` younger than this may belong to a writer that is still running (its rename is
# milliseconds away), so only older ones are treated as left behind by a killed process.
DEFAULT_STALE_PARTIAL_S = 600.0

# Top-level names a dist-cache store may hold; anything else means the location is someone else's.
_OWN_NAMES = {"zarr.json", "features", "feature_scales", "clip_embeddings", "text_embeddings", "videos",
              "samples", "records"}


def read_root_attrs(loc: Location) -> dict[str, Any] | None:
    """Root group attributes read straight from zarr.json (one GET), or None if there is no root node."""
    data = loc.read("zarr.json")
    if data is None:
        return None
    meta = json.loads(data)
    if meta.get("node_type") != "group":
        return {"__not_a_group__": True}
    return meta.get("attributes") or {}


def consolidate(store: zarr.abc.store.Store) -> None:
    # records/ is deliberately not a zarr node (a group would make consolidation open 240k children),
    # so zarr warns that it does not recognise it; consolidated metadata itself is not yet in the v3
    # spec and warns too. Both are expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at records is not recognized", category=ZarrUserWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
        zarr.consolidate_metadata(store, zarr_format=3)


class StoreWriter(SchemaFacts):
    """Writes one store. Cheap to pickle (location + schema) so dask tasks can carry it."""

    def __init__(self, loc: Location, schema: dict[str, Any], stale_partial_s: float) -> None:
        self._loc = loc
        self.schema = schema
        self.stale_partial_s = stale_partial_s
        self.removed_partials: list[str] = []
        self._zstore: zarr.abc.store.Store | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self._checked_complete = False

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str, schema: dict[str, Any], videos: Sequence[str], labels: Sequence[int],
             text_features: np.ndarray, *, class_names: Sequence[str] | None = None,
             storage_options: dict[str, Any] | None = None,
             stale_partial_s: float = DEFAULT_STALE_PARTIAL_S) -> StoreWriter:
        """Create the store at `url`, or reopen it to resume if it was made with the same compat schema,
        videos and labels. A mismatch raises StoreMismatchError and an unwritable location UserError,
        both before anything is written."""
        configure_zarr()
        loc = open_location(url, storage_options)
        schema = dict(schema)
        if class_names is not None:
            if "class_names" in schema and list(schema["class_names"]) != list(class_names):
                raise ValueError("class_names given twice with different values")
            schema["class_names"] = list(class_names)
        schema = validate_schema(schema)
        videos = [str(p) for p in videos]
        labels = [int(x) for x in labels]
        num_classes = len(schema["class_names"])
        if not len(videos) == len(labels) == schema["num_videos"]:
            raise ValueError(f"{len(videos)} videos, {len(labels)} labels, schema num_videos={schema['num_videos']}")
        if labels and not (0 <= min(labels) and max(labels) < num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes})")
        text = np.asarray(text_features, dtype=np.float32)
        if text.shape != (num_classes, schema["backbone"]["embed_dim"]) or not np.isfinite(text).all():
            raise ValueError(f"text_features must be finite, shape ({num_classes}, embed_dim), got {text.shape}")
        schema["compat"] = compat_of(schema)
        schema["videos_sha256"] = videos_sha256(videos, labels)

        attrs = read_root_attrs(loc)
        if attrs is not None and ATTR_KEY in attrs:
            stored = attrs[ATTR_KEY]
            check_compatible(loc.url, stored, schema)
            if stored.get("videos_sha256") != schema["videos_sha256"]:
                raise StoreMismatchError(_video_difference(loc, videos, labels))
            # Keep the first run's informational fields (software versions...) rather than rewriting them.
            writer = cls(loc, stored, stale_partial_s)
        else:
            _check_creatable(loc, attrs)
            writer = cls(loc, schema, stale_partial_s)
            writer._create(videos, labels, text)
        writer.removed_partials = loc.remove_partials(stale_partial_s)
        return writer

    def _create(self, videos: list[str], labels: list[int], text: np.ndarray) -> None:
        """Idempotent: a concurrent creator or a rerun after a crash here writes the same bytes.
        The root attributes go last and mark the store as created."""
        self._loc.prepare_for_writing()
        store = self._store()
        try:
            for spec in layout.data_arrays(self.schema):
                try:
                    arr = layout.create_or_open(store, spec)
                except ValueError:
                    raise StoreMismatchError(
                        f"store {self._loc.url} was partly created with a different layout ({spec.name}): "
                        f"remove it or use another --out") from None
                self._arrays[spec.name] = arr
            if videos:
                self._arrays[layout.VIDEO_PATH][:] = np.array(videos, dtype=str)
                self._arrays[layout.VIDEO_LABEL][:] = np.array(labels, dtype=np.int32)
            self._arrays[layout.TEXT][:] = text
            group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
            group.update_attributes({ATTR_KEY: self.schema, "complete": False, "summary": None})
        except OSError as exc:
            raise UserError(f"cannot write store {self._loc.url}: {exc.strerror or exc}") from None

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"loc": self._loc, "schema": self.schema, "stale_partial_s": self.stale_partial_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["loc"], state["schema"], state["stale_partial_s"])  # type: ignore[misc]

    # ---------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        return self._loc.url

    def _store(self) -> zarr.abc.store.Store:
        if self._zstore is None:
            configure_zarr()
            self._zstore = self._loc.zarr_store(read_only=False)
        return self._zstore

    def _array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = layout.open_array(self._store(), name, mode="r+")
        return self._arrays[name]

    # ---------------------------------------------------------------- records
    def _records(self) -> dict[int, dict[str, Any]]:
        """All records, from one listing plus one read per record (batched for remote stores)."""
        V = self.num_videos
        indices = sorted(v for v in map(layout.record_index, self._loc.list_names(layout.RECORDS))
                         if v is not None and v < V)
        raw = self._loc.read_many([layout.record_key(v) for v in indices])
        return {v: records.decode(raw[layout.record_key(v)], v) for v in indices
                if raw[layout.record_key(v)] is not None}

    def pending(self, retry_failed: bool = False) -> list[int]:
        """Video indices without a record (plus failed ones with retry_failed), ascending."""
        names = self._loc.list_names(layout.RECORDS)
        have = {v for v in map(layout.record_index, names) if v is not None}
        if retry_failed:
            have = {v for v, r in self._records().items() if r["status"] == records.DONE}
        return [v for v in range(self.num_videos) if v not in have]

    def _before_write(self, v: int) -> None:
        if not 0 <= v < self.num_videos:
            raise IndexError(f"video index {v} out of range [0, {self.num_videos})")
        if self._checked_complete:
            return
        # Writing into a finalized store (retrying failures) makes its tables and consolidated
        # metadata stale: drop "complete" first so no reader trusts them; finalize() restores it.
        attrs = read_root_attrs(self._loc) or {}
        if attrs.get("complete"):
            group = zarr.open_group(self._store(), mode="r+", zarr_format=3, use_consolidated=False)
            group.update_attributes({"complete": False, "summary": None})
        self._checked_complete = True

    # ---------------------------------------------------------------- writing
    def write_video(self, v: int, facts: Any, plans: Sequence[Any], features: np.ndarray,
                    clip_embeds: np.ndarray) -> int:
        """Write video v's K views (shards first, then the record). Returns the bytes of array data written."""
        s = self.schema
        K, T, E = s["views_per_video"], s["num_frames"], s["backbone"]["embed_dim"]
        want = (K, len(s["layers"]), T, s["tokens"], s["width"])
        if features.shape != want:
            raise ValueError(f"video {v}: features have shape {features.shape}, the store expects {want}")
        if clip_embeds.shape != (K, T, E):
            raise ValueError(f"video {v}: clip_embeds have shape {clip_embeds.shape}, the store expects {(K, T, E)}")
        # Validate the record before touching any shard, so a bad plan cannot leave orphan shards.
        record = records.done_record(v, facts, list(plans), K, T, nbytes=0)
        self._before_write(v)
        rows = slice(v * K, (v + 1) * K)
        with np.errstate(over="ignore"):
            clip16 = np.asarray(clip_embeds).astype(np.float16)
        if s["dtype"] == "int8":
            if not np.isfinite(features).all():
                raise ValueError(f"video {v}: features contain NaN or inf")
            codes, scales = quantize_int8(features)
            blocks = {layout.FEATURES: codes, layout.SCALES: scales}
        else:
            with np.errstate(over="ignore"):  # overflow is reported just below, as a ValueError
                feats16 = np.asarray(features).astype(np.float16, copy=False)
            # Overflow to inf (|x| > 65504) or NaN from upstream would be stored silently otherwise.
            if not np.isfinite(feats16).all():
                raise ValueError(f"video {v}: features contain NaN or inf in fp16")
            blocks = {layout.FEATURES: feats16}
        if not np.isfinite(clip16).all():
            raise ValueError(f"video {v}: clip_embeds contain NaN or inf in fp16")
        blocks[layout.CLIP] = clip16
        for name, block in blocks.items():
            self._array(name)[rows] = block  # exactly one whole shard (or chunk) per array
        record["bytes"] = sum(int(b.nbytes) for b in blocks.values())
        self._loc.write_atomic(layout.record_key(v), records.encode(record))
        return record["bytes"]

    def write_failure(self, v: int, error: str, facts: Any | None = None) -> bool:
        """Record that video v failed and why. A "done" record is never replaced by a failure (an
        overlapping writer may have succeeded); returns False in that case."""
        record = records.failed_record(v, error, facts)
        self._before_write(v)
        existing = self._loc.read(layout.record_key(v))
        if existing is not None and records.decode(existing, v)["status"] == records.DONE:
            return False
        self._loc.write_atomic(layout.record_key(v), records.encode(record))
        return True

    # ---------------------------------------------------------------- finalize
    def finalize(self) -> dict[str, Any]:
        """Gather records into tables, mark complete and consolidate metadata, if no video is pending.

        Any writer may call it, any number of times; concurrent finalizers write identical bytes.
        Returns the summary: done, failed, pending (videos), bytes, complete."""
        s = self.schema
        recs = self._records()
        summary = records.summarize(recs, self.num_videos)
        if summary["pending"]:
            return {**summary, "complete": False}
        tables = records.gather(recs, self.num_videos, s["views_per_video"], s["num_frames"])
        store = self._store()
        for spec in layout.table_arrays(s):
            arr = layout.create_or_open(store, spec)
            if arr.size:
                arr[...] = tables[spec.name]
        group = zarr.open_group(store, mode="r+", zarr_format=3, use_consolidated=False)
        group.update_attributes({"complete": True, "summary": summary})
        consolidate(store)
        self.removed_partials += self._loc.remove_partials(self.stale_partial_s)
        self._checked_complete = False  # a later write must un-complete again
        return {**summary, "complete": True}


def _check_creatable(loc: Location, attrs: dict[str, Any] | None) -> None:
    """Refuse to create a store on top of something that is not (the start of) a dist-cache store."""
    # None: nothing there yet; {}: the bare root group a crashed creation leaves (zarr writes parent
    # groups before the arrays, and our attributes come last).
    if attrs:
        raise UserError(f"cannot create store {loc.url}: a zarr node that is not a dist-cache store is there; "
                        f"use another --out")
    if loc.exists():
        foreign = sorted(n for n in loc.list_names("") if n not in _OWN_NAMES and not n.endswith(".partial"))
        if foreign:
            raise UserError(f"cannot create store {loc.url}: it is not empty and not a dist-cache store "
                            f"(found {', '.join(foreign[:3])}); use another --out")


def _video_difference(loc: Location, videos: list[str], labels: list[int]) -> str:
    """One line naming the first manifest row where the store and this run disagree."""
    group = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3, use_consolidated=False)
    old_videos = [str(p) for p in group[layout.VIDEO_PATH][:]]
    old_labels = [int(x) for x in group[layout.VIDEO_LABEL][:]]
    where = f"store {loc.url} was extracted from a different manifest"
    for i, (a, b) in enumerate(zip(zip(old_videos, old_labels), zip(videos, labels))):
        if a != b:
            return (f"{where}: row {i} is {format_value(a[0])} (label {a[1]}) there, "
                    f"{format_value(b[0])} (label {b[1]}) here; use another --out or the same manifest")
    return f"{where} ({len(old_videos)} videos there, {len(videos)} here); use another --out or the same manifest"
