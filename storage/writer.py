"""StoreWriter: create or resume a feature store, write whole videos, finalize.

Safety comes from four rules, not from locks (zarr v3 has none):
  1. the root zarr.json, carrying the schema, is published create-if-absent before anything else, so of
     several writers racing to create a store exactly one schema wins and the others compare against it;
  2. each video's data is one shard per array, written whole (temp file + rename) by one `write_video`;
  3. the video's record is written after its shards, atomically, and is the only proof of completion;
  4. everything derived (metadata, shards, records, finalize's tables) is a pure function of the inputs,
     so concurrent or repeated writers of the same video, or concurrent finalizers, write identical bytes.
Any storage failure while writing (an OSError: disk full, a remote's 5xx; a remote's lost or refused connection)
becomes a one-line StoreWriteError, and no video is recorded failed because of it; the store stays resumable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import zarr
from zarr.core.metadata import ArrayV3Metadata
from zarr.errors import ZarrUserWarning

from dist_cache.errors import UserError, first_line
from storage import frames_codec, layout, parameters
from storage.encoding import ENCODED_FORMAT_VERSION, Encoded, Encoding, EncodingError
from storage.errors import MissingChunkError, StoreDamagedError, StoreMismatchError, store_fix, write_error
from storage.frames_codec import StoredJpegs
from storage.location import Location, configure_zarr, is_temp_name
from storage.quantize import GROUPS, quantize_int8
from storage.records import RecordError, VideoRecord, decode_group, encode_group, gather, group_members, summarize
from storage.remote import open_location
from storage.root import ROOT_KEY, group_json, read_attrs, stored_schema
from storage.schema import ATTR_KEY, FORMAT_VERSION, SampleStatus, StoreSchema, format_value
from storage.shards import Encoded as EncodedChunk, ShardFormat
from storage.strict import StrictStore

# A `*.partial` younger than this may belong to a writer that is still running (its rename is
# milliseconds away), so only older ones are treated as left behind by a killed process.
DEFAULT_STALE_PARTIAL_S = 600.0

# Top-level names a dist-cache store may hold; anything else means the location is someone else's.
_OWN_NAMES = {"zarr.json", "features", "feature_scales", "clip_embeddings", "frames", "text_embeddings", "videos",
              "samples", "records", "codes", "encoding"}
# What `StoreWriter.open` calls to fit a compact store's encoding when it has to create the store: the schema's
# `encoding.fit` record and the fitted parameters (storage/pca.py).
FitFunction = Callable[[], tuple[dict[str, Any], Encoding]]

# fp16 bit patterns: exponent all ones is inf or NaN. Checked on the integer bits in cache-sized blocks,
# ~10x faster than np.isfinite, which emulates float16 arithmetic.
_FP16_EXPONENT = np.uint16(0x7C00)
_CHECK_BLOCK = 1 << 17


def _fp16_finite(bits: np.ndarray, scratch: np.ndarray) -> bool:
    """Whether a 1-D uint16 view of fp16 values holds no inf or NaN."""
    for start in range(0, bits.size, _CHECK_BLOCK):
        block = bits[start:start + _CHECK_BLOCK]
        out = scratch[:block.size]
        np.bitwise_and(block, _FP16_EXPONENT, out=out)
        if out.max() == _FP16_EXPONENT:
            return False
    return True


def _checked_fp16(chunks: Iterable[np.ndarray], what: str) -> Iterator[np.ndarray]:
    """Pass fp16 chunks (uint8 views) through, raising ValueError at the first that holds inf or NaN: the
    check of a chunk runs while the previous one is written."""
    scratch = np.empty(_CHECK_BLOCK, np.uint16)
    for chunk in chunks:
        if not _fp16_finite(chunk.view(np.uint16), scratch):
            raise ValueError(f"{what} contain NaN or inf in fp16")
        yield chunk


def _require_finite(values: np.ndarray, what: str) -> None:
    """ValueError if `values` hold inf or NaN: fp16 by its bits, wider floats with np.isfinite (fast for them)."""
    if values.dtype == np.float16:
        bits = np.ascontiguousarray(values).reshape(-1).view(np.uint16)
        finite = _fp16_finite(bits, np.empty(min(_CHECK_BLOCK, bits.size), np.uint16))
    else:
        finite = bool(np.isfinite(values).all())
    if not finite:
        raise ValueError(f"{what} contain NaN or inf in {values.dtype}")


@dataclasses.dataclass(frozen=True)
class GroupVideo:
    """One video of a packed group, as `StoreWriter.write_group` takes it: done (its facts, K view plans and
    optionally K labels; its arrays come from the group's source) or failed (`error`, facts if known)."""

    facts: Any
    plans: Sequence[Any] = ()
    labels: Sequence[int] | None = None
    error: str | None = None


class GroupSource(Protocol):
    """Where `write_group` gets a done video's arrays, one array of one video at a time, in write order."""

    def features(self, v: int) -> np.ndarray: ...  # (K, L, T, N+1, C), any float dtype

    def clip_embeds(self, v: int) -> np.ndarray: ...  # (K, T, E)

    # (K, G*T, R, R, 3) uint8, or a JPEG store's frames as stored; only called for stores with frames
    def frames(self, v: int) -> np.ndarray | StoredJpegs: ...


def consolidate(store: zarr.abc.store.Store) -> None:
    # records/ is deliberately not a zarr node (a group would make consolidation open 240k children),
    # so zarr warns that it does not recognise it; consolidated metadata itself is not yet in the v3
    # spec and warns too. Both are expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at records is not recognized", category=ZarrUserWarning)
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part", category=UserWarning)
        zarr.consolidate_metadata(store, zarr_format=3)


class StoreWriter:
    """Writes one store. Cheap to pickle (location + schema) so dask tasks can carry it."""

    def __init__(self, loc: Location, schema: StoreSchema, stale_partial_s: float, videos_per_shard: int = 1) -> None:
        self._loc = loc
        self.schema = schema
        self.stale_partial_s = stale_partial_s
        self.videos_per_shard = videos_per_shard
        self.repaired: list[str] = []  # what StoreWriter.open(repair=True) rewrote, one line each
        self._zstore: zarr.abc.store.Store | None = None
        self._checked_complete = False
        self._video_labels: np.ndarray | None = None
        self._encoding: Encoding | None = None

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, url: str, schema: StoreSchema | Mapping[str, Any], videos: Sequence[str], labels: Sequence[int],
             text_features: np.ndarray, *, storage_options: dict[str, Any] | None = None,
             stale_partial_s: float = DEFAULT_STALE_PARTIAL_S, videos_per_shard: int = 1,
             repair: bool = False, fit: FitFunction | None = None) -> StoreWriter:
        """Create the store at `url`, or reopen it to resume if it was made with the same compat schema,
        videos and labels. A mismatch raises StoreMismatchError and an unwritable location a UserError,
        both before any data is written.

        A compact store's schema (format 3) says what to fit; `fit()` is called only when the store has to be
        created, and its parameters are written with the store. A reopened store keeps its own fit (a rerun,
        a dask worker), so the same request resumes with the same codes.

        `videos_per_shard` P > 1 makes a packed store (what `copy --videos-per-shard` writes): each shard holds P
        videos and is written by `write_group` with the group's record. A packed store is written only with its
        own P, so nothing else ever writes into it.

        Reopening checks what the store holds beside its videos (each array's own metadata document, and the video
        paths, labels and text embeddings written at creation): damage is a StoreDamagedError naming it, or with
        `repair` is rewritten (the metadata from the schema, the rest from these arguments; `repaired` lists it).
        finalize rewrites the other tables from the records."""
        if isinstance(videos_per_shard, bool) or not isinstance(videos_per_shard, int) or videos_per_shard < 1:
            raise ValueError(f"videos_per_shard must be an int >= 1, got {videos_per_shard!r}")
        configure_zarr()
        loc = open_location(url, storage_options)
        if not isinstance(schema, StoreSchema):
            schema = StoreSchema.from_json(schema)
        if schema.format_version != (FORMAT_VERSION if schema.encoding is None else ENCODED_FORMAT_VERSION):
            raise ValueError(f"this dist-cache writes format_version {FORMAT_VERSION} (plain stores) and "
                             f"{ENCODED_FORMAT_VERSION} (compact stores), not {schema.format_version}")
        videos = [str(p) for p in videos]
        labels = [int(x) for x in labels]
        C = schema.num_classes
        if not len(videos) == len(labels) == schema.num_videos:
            raise ValueError(f"{len(videos)} videos, {len(labels)} labels, schema num_videos={schema.num_videos}")
        if labels and not (0 <= min(labels) and max(labels) < C):
            raise ValueError(f"labels must lie in [0, {C})")
        text = np.asarray(text_features, dtype=np.float32)
        if text.shape != (C, schema.embed_dim) or not np.isfinite(text).all():
            raise ValueError(f"text_features must be finite, shape ({C}, embed_dim), got {text.shape}")
        schema = schema.with_manifest(videos, labels)

        with _writing(loc.url):
            attrs = read_attrs(loc)
            fitted: Encoding | None = None
            if attrs is None:
                _check_creatable(loc)
                loc.prepare_for_writing()
                schema, fitted = _fitted(schema, fit, loc.url)
                initial = {ATTR_KEY: schema.to_json(), "created": False, "complete": False, "summary": None}
                if not loc.create_exclusive(ROOT_KEY, group_json(initial)):
                    attrs = read_attrs(loc)  # another writer published its root first: compare with it
            if attrs is None:
                writer, created = cls(loc, schema, stale_partial_s, videos_per_shard), False
                writer._encoding = fitted
            else:
                if ATTR_KEY not in attrs:
                    raise UserError(f"cannot create store {loc.url}: a zarr group that is not a dist-cache store "
                                    f"is there; use another --out")
                stored = stored_schema(attrs, loc.url)
                stored.check_compatible(schema, loc.url)
                if stored.videos_sha256 != schema.videos_sha256:
                    raise StoreMismatchError(_video_difference(loc, videos, labels))
                # Keep the first run's informational fields (software versions...) rather than rewriting them.
                writer, created = cls(loc, stored, stale_partial_s, videos_per_shard), bool(attrs.get("created"))
                if stored.encoded and not created:
                    writer._encoding = _same_fit(stored, fitted if fitted is not None else _fitted(schema, fit,
                                                                                                  loc.url)[1], loc.url)
            if not created:
                writer._create(videos, labels, text)
            else:
                writer._check_videos_per_shard()
                writer.repaired = writer._check_arrays(videos, labels, text, repair)
            writer._confirm_schema()
            loc.remove_partials(stale_partial_s)
        return writer

    def _create(self, videos: list[str], labels: list[int], text: np.ndarray) -> None:
        """Idempotent: a concurrent creator or a rerun after a crash here writes the same bytes.
        Marks the root "created" last."""
        store = self._store()
        arrays = {}
        for spec in layout.data_arrays(self.schema, self.videos_per_shard):
            try:
                arrays[spec.name] = layout.create_or_open(store, spec)
            except ValueError:
                raise StoreMismatchError(
                    f"store {self._loc.url} was partly created with a different layout ({spec.name}): "
                    f"remove it or use another --out") from None
        if videos:
            arrays[layout.VIDEO_PATH][:] = np.array(videos, dtype=str)
            arrays[layout.VIDEO_LABEL][:] = np.array(labels, dtype=np.int32)
        arrays[layout.TEXT][:] = text
        if self.schema.encoded:
            assert self._encoding is not None
            parameters.write(store, self.schema, self._encoding)
        self._root_group().update_attributes({"created": True})

    def _check_arrays(self, videos: list[str], labels: list[int], text: np.ndarray, repair: bool) -> list[str]:
        """What a reopened store holds beside its videos: every node's own metadata document parses (readers of a
        complete store use the consolidated copy, writers these), and the arrays written at creation read whole
        (every chunk present, its crc32c right) and hold this manifest. Damage raises StoreDamagedError, or with
        `repair` is rewritten: documents from the schema (pure functions of it), the manifest's arrays from these
        arguments (the same manifest: its sha256 matched), the text embeddings from this run's, and a complete
        store's tables by finalize (their damage un-completes the store). Returns what was rewritten, one line
        each."""
        specs = {spec.name: spec for spec in layout.data_arrays(self.schema, self.videos_per_shard)}
        tables = {spec.name: spec for spec in layout.table_arrays(self.schema)}
        groups = sorted({name.rsplit("/", 1)[0] for name in [*specs, *tables] if "/" in name})
        # finalize creates the tables, and a group that holds only tables (samples/)
        later = {*tables, *(g for g in groups if not any(name.startswith(f"{g}/") for name in specs))}
        documents: dict[str, bytes] = {}  # key -> the document to restore
        findings: list[str] = []
        finalized = []  # tables whose documents are there (a store older than a table lacks it)
        for name in [*groups, *specs, *tables]:
            key = f"{name}/{ROOT_KEY}"
            data = self._loc.read(key)
            spec = None if name in groups else {**specs, **tables}[name]
            if data is None and name in later:
                continue
            if name in tables:
                finalized.append(name)
            why = "missing" if data is None else _document_damage(data, spec)
            if why:
                findings.append(f"{key} is {why}")
                documents[key] = group_json({}) if spec is None else layout.metadata_document(spec)
        written = {layout.VIDEO_PATH: np.array(videos, dtype=str), layout.VIDEO_LABEL: np.array(labels, np.int32),
                   layout.TEXT: text}
        rewrite = []
        for name, values in written.items():
            if f"{name}/{ROOT_KEY}" in documents:
                rewrite.append(name)  # its chunks follow its restored document
            elif len(values) and (why := self._unreadable(name, values, compare=name != layout.TEXT)):
                findings.append(why)
                rewrite.append(name)
        if (read_attrs(self._loc) or {}).get("complete"):
            # Readers (repair's own check among them) read a complete store's videos from these tables; finalize
            # rewrites them whole from the records once the store is un-completed, which is all their repair needs.
            for name in finalized:
                if f"{name}/{ROOT_KEY}" not in documents and (why := self._unreadable(name, None, compare=False)):
                    findings.append(why)
        if findings and not repair:
            raise StoreDamagedError(f"store {self._loc.url}: {findings[0]}; "
                                    f"{store_fix(FORMAT_VERSION, self.videos_per_shard)}")
        if findings:
            self._uncomplete()  # no reader may trust the tables and consolidated metadata meanwhile
        for key, document in documents.items():
            self._loc.write_atomic(key, document)
        for name in rewrite:
            if len(written[name]):
                layout.open_array(self._store(), name, mode="r+")[...] = written[name]
        return findings

    def _unreadable(self, name: str, expected: np.ndarray | None, compare: bool) -> str | None:
        """Why array `name` does not read back whole (a chunk missing or failing its crc32c), or does not hold
        `expected` (when `compare`); None if it does."""
        try:
            found = layout.open_array(StrictStore(self._store(), _missing_chunk), name)[...]
        except MissingChunkError as err:
            return f"{err.key}, a chunk of {name}, is missing"
        except ValueError as err:
            return f"array {name} does not decode ({first_line(err)})"
        if compare and not np.array_equal(found, expected):
            return f"array {name} does not hold this manifest's values"
        return None

    def _check_videos_per_shard(self) -> None:
        """A reopened store must have been made with this writer's videos per shard: a packed store is never
        written into with one video per shard, nor the other way round."""
        try:
            meta = layout.open_array(self._store(), layout.feature_array(self.schema)).metadata.to_dict()
        except (ValueError, TypeError, KeyError, FileNotFoundError):
            return  # damaged or missing metadata: _check_arrays names it (and --repair restores it)
        stored = layout.videos_per_shard(meta, self.schema.views_per_video)
        if stored == self.videos_per_shard:
            return
        if stored is not None and stored > 1:
            raise StoreMismatchError(
                f"store {self._loc.url} is a packed copy ({stored} videos per shard), which is read-only: write to "
                f"another --out (a copy resumes only with the same --videos-per-shard {stored})")
        raise StoreMismatchError(f"store {self._loc.url} holds {stored or '?'} video(s) per shard, not "
                                 f"{self.videos_per_shard}: copy to another destination")

    def _confirm_schema(self) -> None:
        """The store's schema is still this writer's: a concurrent creator on a backend without atomic
        create-if-absent may have replaced the root. Called after opening and before finalizing."""
        attrs = read_attrs(self._loc) or {}
        if ATTR_KEY not in attrs:
            raise StoreMismatchError(f"store {self._loc.url} lost its root attributes while being written: "
                                     f"use another --out")
        stored = stored_schema(attrs, self._loc.url)
        if stored.fingerprint != self.schema.fingerprint:
            stored.check_compatible(self.schema, self._loc.url)
            raise StoreMismatchError(f"store {self._loc.url} was made by another run with another manifest: "
                                     f"use another --out or the same flags")

    # ---------------------------------------------------------------- pickling
    def __getstate__(self) -> dict[str, Any]:
        return {"loc": self._loc, "schema": self.schema, "stale_partial_s": self.stale_partial_s,
                "videos_per_shard": self.videos_per_shard}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["loc"], state["schema"], state["stale_partial_s"],  # type: ignore[misc]
                      state["videos_per_shard"])

    # ---------------------------------------------------------------- properties
    @property
    def url(self) -> str:
        return self._loc.url

    @property
    def fingerprint(self) -> str:
        return self.schema.fingerprint

    @property
    def encoding(self) -> Encoding | None:
        """A compact store's fitted parameters (read from the store once, checked against its sha256), else None."""
        if self.schema.encoding is None:
            return None
        if self._encoding is None:
            try:
                self._encoding = parameters.read(lambda name: layout.open_array(self._store(), name), self.schema)
            except EncodingError as err:
                raise StoreMismatchError(f"store {self.url}: {err}; re-create it") from None
        return self._encoding

    def _store(self) -> zarr.abc.store.Store:
        if self._zstore is None:
            configure_zarr()
            self._zstore = self._loc.zarr_store(read_only=False)
        return self._zstore

    def _root_group(self) -> zarr.Group:
        return zarr.open_group(self._store(), mode="r+", zarr_format=3, use_consolidated=False)

    def _labels(self) -> np.ndarray:
        if self._video_labels is None:
            # Strict: a missing chunk is damage, never labels of 0 written into new records.
            strict = StrictStore(self._store(), _missing_chunk)
            self._video_labels = np.asarray(layout.open_array(strict, layout.VIDEO_LABEL)[...])
        return self._video_labels

    # ---------------------------------------------------------------- records
    def _records(self) -> dict[int, VideoRecord]:
        """Every record that decodes, from one listing plus one read per record (batched for remote
        stores). A record that does not decode is left out: its video is pending, and a rerun redoes it."""
        P = self.videos_per_shard
        listed = layout.listed_records(self._loc.list_names(layout.RECORDS), self.schema.num_videos, P)
        raw = self._loc.read_many(list(listed.values()))
        out: dict[int, VideoRecord] = {}
        for i, key in listed.items():  # i: a video, or in a packed store a group (one record per group)
            if raw[key] is None:
                continue
            try:
                if P > 1:
                    out.update((r.video_index, r) for r in decode_group(raw[key], i, P, self.schema))
                else:
                    out[i] = VideoRecord.decode(raw[key], i, self.schema)
            except RecordError:
                pass  # FeatureStore.check_video and `verify` report it; here its videos are simply not done
        return out

    def pending(self, retry_failed: bool = False) -> list[int]:
        """Video indices without a (readable) record, plus failed ones with retry_failed, ascending."""
        keep = (SampleStatus.DONE,) if retry_failed else (SampleStatus.DONE, SampleStatus.FAILED)
        with _writing(self._loc.url):  # a remote gone since `open` stops the run like a failed write
            have = {v for v, r in self._records().items() if r.status in keep}
        return [v for v in range(self.schema.num_videos) if v not in have]

    def _before_write(self, v: int) -> None:
        if not 0 <= v < self.schema.num_videos:
            raise IndexError(f"video index {v} out of range [0, {self.schema.num_videos})")
        if self._checked_complete:
            return
        self._uncomplete()
        self._checked_complete = True

    def _uncomplete(self) -> None:
        """Writing into a finalized store (retrying failures, repairing) makes its tables and consolidated
        metadata stale: drop "complete" first so no reader trusts them; finalize() restores it."""
        attrs = read_attrs(self._loc) or {}
        if attrs.get("complete"):
            self._root_group().update_attributes({"complete": False, "summary": None})

    # ---------------------------------------------------------------- writing
    def write_video(self, v: int, facts: Any, plans: Sequence[Any], features: np.ndarray, clip_embeds: np.ndarray,
                    *, frames: np.ndarray | StoredJpegs | None = None, labels: Sequence[int] | None = None,
                    finite_checked: bool = False) -> int:
        """Write video v's K views: every array's shard, then the record. Returns the shard bytes written.

        features (K, L, T, N+1, C) (fp16 is stored as is; other floats are cast or, for int8 stores,
        quantised; a compact store encodes them with its fitted parameters, or takes them already `Encoded`
        in its own layout and dtypes), clip_embeds (K, T, E), frames (K, G*T, R, R, 3) uint8 exactly when the
        store holds dense frames (a JPEG store encodes them here, in the calling thread; `StoredJpegs` of the
        store's quality are written as they are), labels: K per-view class indices (default: the video's label for
        every view).
        finite_checked: the caller has already checked that features and clip_embeds, in the dtypes given, are
        finite (extraction does on the GPU, before the copy); the writer then skips its own inf/NaN scan, which
        is a third of its CPU time per fp16 video."""
        self._check_unpacked()
        features = self._checked_features(v, features)
        clip16 = self._checked_clip(v, clip_embeds, finite_checked)
        self._check_frames(v, frames)
        # Validate the record before touching any shard, so a bad plan cannot leave orphan shards.
        record = self._done_record(v, facts, plans, labels)

        given = {layout.FEATURES: features, layout.CLIP: clip16, layout.FRAMES: frames}
        scales: dict[int, np.ndarray] = {}
        nbytes = 0
        with _writing(self._loc.url):
            self._before_write(v)
            for spec in layout.sharded_arrays(self.schema):
                fmt = ShardFormat.of(spec)
                chunks = self._video_chunks(fmt, v, given.__getitem__, scales, finite_checked)
                nbytes += self._loc.write_parts(fmt.shard_key(v), fmt.encode(chunks))
            self._loc.write_atomic(layout.record_key(v), dataclasses.replace(record, nbytes=nbytes).encode())
        return nbytes

    def _check_unpacked(self) -> None:
        if self.videos_per_shard != 1:
            raise ValueError(f"store {self.url} holds {self.videos_per_shard} videos per shard: it is written a group "
                             f"at a time (write_group)")

    def _done_record(self, v: int, facts: Any, plans: Sequence[Any], labels: Sequence[int] | None) -> VideoRecord:
        if labels is None:
            labels = [int(self._labels()[v])] * self.schema.views_per_video
        try:
            return VideoRecord.done(self.schema, v, facts, list(plans), list(labels))
        except RecordError as err:
            raise ValueError(f"video {v}: {err}") from None

    def _checked_features(self, v: int, features: Any) -> np.ndarray | Encoded:
        s = self.schema
        if isinstance(features, Encoded):
            return self._checked_encoded(v, features)
        features = np.asarray(features)
        want = (s.views_per_video, len(s.layers), s.num_frames, s.tokens, s.width)
        if features.shape != want:
            raise ValueError(f"video {v}: features have shape {features.shape}, the store expects {want}")
        return features

    def _checked_encoded(self, v: int, encoded: Encoded) -> Encoded:
        """Codes encoded elsewhere must be exactly what this store keeps for a video."""
        s, enc = self.schema, self.encoding
        if enc is None:
            raise ValueError(f"video {v}: encoded features given, but store {self.url} is not a compact store")
        K, L, T, N1 = s.views_per_video, len(s.layers), s.num_frames, s.tokens
        shape = (K, enc.code_size(range(L), T, N1)) if enc.projected else (K, L, T, N1, s.width)
        dtype = np.int8 if enc.quantized else np.float16
        ok = encoded.codes.shape == shape and encoded.codes.dtype == dtype
        if enc.quantized:
            ok = ok and encoded.scales is not None and encoded.scales.shape == (K, L, T, N1, GROUPS) \
                and encoded.scales.dtype == np.float16
        elif encoded.scales is not None:
            ok = False
        if not ok:
            raise ValueError(f"video {v}: encoded codes {encoded.codes.shape} {encoded.codes.dtype} (scales "
                             f"{None if encoded.scales is None else encoded.scales.shape}) are not this store's "
                             f"{shape} {np.dtype(dtype)}")
        return encoded

    def _encoded(self, v: int, features: np.ndarray | Encoded, finite_checked: bool) -> Encoded:
        """A compact store's codes for video v, checked finite (unless the caller checked them)."""
        if not isinstance(features, Encoded):
            if not finite_checked:
                _require_finite(features, f"video {v}: features")
            assert self.encoding is not None
            features = Encoded(*self.encoding.encode(features))
            finite_checked = False  # fp16 codes may overflow; scales too
        if not finite_checked:
            if features.codes.dtype == np.float16:
                _require_finite(features.codes, f"video {v}: feature codes")
            if features.scales is not None:
                _require_finite(features.scales, f"video {v}: feature scales")
        return features

    def _checked_clip(self, v: int, clip_embeds: Any, finite_checked: bool = False) -> np.ndarray:
        """clip_embeds (K, T, E) as fp16, checked finite (unless the caller checked them, in fp16)."""
        clip_embeds = np.asarray(clip_embeds)
        want = (self.schema.views_per_video, self.schema.num_frames, self.schema.embed_dim)
        if clip_embeds.shape != want:
            raise ValueError(f"video {v}: clip_embeds have shape {clip_embeds.shape}, the store expects {want}")
        with np.errstate(over="ignore"):  # overflow shows up as inf, reported just below
            clip16 = clip_embeds.astype(np.float16, copy=False)
        if not (finite_checked and clip_embeds.dtype == np.float16):
            _require_finite(clip16, f"video {v}: clip_embeds")
        return clip16

    def _check_frames(self, v: int, frames: np.ndarray | StoredJpegs | None) -> None:
        s = self.schema
        if s.dense_gamma is None:
            if frames is not None:
                raise ValueError(f"video {v}: frames given, but the store holds no dense frames (dense_frames null)")
            return
        want = (s.views_per_video, s.dense_gamma * s.num_frames, s.image_size, s.image_size, 3)
        if isinstance(frames, StoredJpegs):
            if s.frames_format != (frames_codec.JPEG, frames.quality) \
                    or [len(view) for view in frames.views] != [want[1]] * want[0]:
                raise ValueError(f"video {v}: stored JPEG frames of quality {frames.quality} (views of "
                                 f"{[len(view) for view in frames.views]} frames) do not fit a store of "
                                 f"{s.frames_format} frames, {want[0]} views of {want[1]}")
            return
        if frames is None or frames.shape != want or frames.dtype != np.uint8:
            got = None if frames is None else (frames.shape, str(frames.dtype))
            raise ValueError(f"video {v}: the store holds dense frames: frames must be uint8 {want}, got {got}")

    def _fp16_chunks(self, fmt: ShardFormat, v: int, features: np.ndarray, finite_checked: bool
                     ) -> Iterable[np.ndarray]:
        """fp16 features' chunks, each checked for inf/NaN while the previous one streams to disk (a bad one
        aborts the shard's write), unless the caller checked them in fp16."""
        with np.errstate(over="ignore"):
            feats16 = features.astype(np.float16, copy=False)
        if finite_checked and features.dtype == np.float16:
            return fmt.raw_chunks(feats16)
        return _checked_fp16(fmt.raw_chunks(feats16), f"video {v}: features")

    # ---------------------------------------------------------------- packed stores
    def write_group(self, g: int, videos: Sequence[GroupVideo], source: GroupSource) -> int:
        """Write group g of a packed store (videos g*P .. g*P+P-1): each array's shard holding the group's videos
        (a failed video's chunks, and the rows past the last video, are listed as missing), then the group's
        record. A done video's arrays are asked from `source` while its shard streams out, so memory holds one
        video's array, not P (on an object store, one shard: it is one PUT). Returns the shard bytes written."""
        s, P, K = self.schema, self.videos_per_shard, self.schema.views_per_video
        if P == 1:
            raise ValueError("write_group writes packed stores (videos_per_shard > 1); use write_video")
        members = group_members(g, P, s.num_videos)
        if g < 0 or not len(members):
            raise IndexError(f"group {g} out of range [0, {-(-s.num_videos // P)})")
        if len(videos) != len(members):
            raise ValueError(f"group {g} holds {len(members)} videos, {len(videos)} given")
        records = {}
        for v, video in zip(members, videos):
            records[v] = (VideoRecord.failed(v, video.error, video.facts) if video.error is not None
                          else self._done_record(v, video.facts, video.plans, video.labels))
        done = [v for v in members if records[v].status == SampleStatus.DONE]

        per_video = dict.fromkeys(members, 0)
        with _writing(self._loc.url):
            self._before_write(members[0])
            if done:  # a group with no done video has no shards, like a failed video's
                scales: dict[int, np.ndarray] = {}
                for spec in layout.sharded_arrays(s, P):
                    fmt = ShardFormat.of(spec)
                    sizes: list[int] = []
                    chunks = self._group_chunks(fmt, members, set(done), source, scales)
                    self._loc.write_parts(fmt.shard_key(g), fmt.encode(chunks, sizes))
                    per_sample = K * fmt.chunks_per_sample
                    for slot, v in enumerate(members):
                        per_video[v] += sum(sizes[slot * per_sample:(slot + 1) * per_sample])
            recs = [dataclasses.replace(records[v], nbytes=per_video[v]) for v in members]
            self._loc.write_atomic(layout.group_record_key(g), encode_group(g, P, recs))
        return sum(per_video.values())

    def _group_chunks(self, fmt: ShardFormat, members: range, done: set[int], source: GroupSource,
                      scales: dict[int, np.ndarray]) -> Iterator[np.ndarray | EncodedChunk | None]:
        """Every inner chunk of one array's shard of a group, None where the shard holds none."""
        per_video = self.schema.views_per_video * fmt.chunks_per_sample
        for slot in range(self.videos_per_shard):
            v = members.start + slot
            if v in done:
                yield from self._video_chunks(fmt, v, functools.partial(self._from_source, source, v), scales)
            else:
                yield from itertools.repeat(None, per_video)

    def _from_source(self, source: GroupSource, v: int, name: str) -> Any:
        """Video v's features, clip embeddings (as fp16) or frames from a group's source, checked."""
        if name == layout.FEATURES:
            return self._checked_features(v, source.features(v))
        if name == layout.CLIP:
            return self._checked_clip(v, source.clip_embeds(v))
        frames = source.frames(v)
        self._check_frames(v, frames)
        return frames

    def _video_chunks(self, fmt: ShardFormat, v: int, array: Callable[[str], Any], scales: dict[int, np.ndarray],
                      finite_checked: bool = False) -> Iterable[np.ndarray | EncodedChunk]:
        """One done video's chunks of array `fmt.name` (write_video's, or one video's of a group's shard), from
        `array(FEATURES, CLIP or FRAMES)`: the checked values. An int8 store's scales are kept from its features'
        quantisation (they are small) for the scales shard, written next."""
        if fmt.name == layout.feature_array(self.schema):
            features = array(layout.FEATURES)
            if self.schema.encoded:
                encoded = self._encoded(v, features, finite_checked)
                if encoded.scales is not None:
                    scales[v] = encoded.scales
                return fmt.raw_chunks(encoded.codes)
            if self.schema.dtype == "int8":
                if not finite_checked:
                    _require_finite(features, f"video {v}: features")
                codes, scales[v] = quantize_int8(features)
                return fmt.raw_chunks(codes)
            return self._fp16_chunks(fmt, v, features, finite_checked)
        if fmt.name == layout.SCALES:
            return fmt.raw_chunks(scales.pop(v))
        if fmt.name == layout.CLIP:
            return fmt.raw_chunks(array(layout.CLIP))
        return _frame_chunks(fmt, array(layout.FRAMES))

    def write_failure(self, v: int, error: str, facts: Any | None = None) -> bool:
        """Record that video v failed and why. A "done" record is never replaced by a failure (an
        overlapping writer may have succeeded); returns False in that case."""
        self._check_unpacked()
        record = VideoRecord.failed(v, error, facts)
        with _writing(self._loc.url):
            self._before_write(v)
            existing = self._loc.read(layout.record_key(v))
            if existing is not None:
                try:
                    if VideoRecord.decode(existing, v, self.schema).status == SampleStatus.DONE:
                        return False
                except RecordError:
                    pass  # unreadable: replaced by this one
            self._loc.write_atomic(layout.record_key(v), record.encode())
        return True

    # ---------------------------------------------------------------- finalize
    def finalize(self) -> dict[str, Any]:
        """Gather records into tables, mark complete and consolidate metadata, if no video is pending.

        Any writer may call it, any number of times; concurrent finalizers write identical bytes.
        Returns the summary: done, failed, pending (videos), bytes, complete."""
        with _writing(self._loc.url):
            self._confirm_schema()
            recs = self._records()
            summary = summarize(recs, self.schema.num_videos)
            if summary["pending"]:
                return {**summary, "complete": False}
            tables = gather(recs, self.schema)
            store = self._store()
            for spec in layout.table_arrays(self.schema):
                arr = layout.create_or_open(store, spec)
                if arr.size:
                    arr[...] = tables[spec.name]
            self._root_group().update_attributes({"complete": True, "summary": summary})
            consolidate(store)
            self._loc.remove_partials(self.stale_partial_s)
        self._checked_complete = False  # a later write must un-complete again
        return {**summary, "complete": True}


def _frame_chunks(fmt: ShardFormat, frames: np.ndarray | StoredJpegs) -> Iterable[np.ndarray | EncodedChunk]:
    """A video's frames shard's chunks: raw frames (encoded by the shard format if the store keeps JPEG, lazily, so
    in the calling writer thread while the previous chunk is written), or JPEGs of the store's quality as is."""
    if isinstance(frames, StoredJpegs):
        return (EncodedChunk(payload) for view in frames.views for payload in view)
    return fmt.raw_chunks(frames)


def _fitted(schema: StoreSchema, fit: FitFunction | None, url: str) -> tuple[StoreSchema, Encoding | None]:
    """The schema to create a store with, and its encoding's parameters: a compact store is fitted now."""
    if schema.encoding is None:
        return schema, None
    if fit is None:
        raise ValueError(f"store {url} must be created, and a compact store's encoding must be fitted for that: "
                         f"pass fit")
    record, encoding = fit()
    if record.get("sha256") != encoding.digest():
        raise ValueError("the fit record's sha256 is not its parameters'")
    return schema.with_fit(record), encoding


def _same_fit(stored: StoreSchema, encoding: Encoding | None, url: str) -> Encoding:
    """A store whose creation another run began: its encoding arrays may not be written yet, and this run may only
    write them if its own fit is the very same (a deterministic refit of the same sample)."""
    assert stored.encoding is not None and stored.encoding.get("fit")
    if encoding is None or encoding.digest() != stored.encoding["fit"]["sha256"]:
        raise StoreMismatchError(
            f"store {url} is being created by another run with another fit of its encoding, or that run was "
            f"interrupted: rerun once it has finished, or remove {url} (no video is in it yet) and rerun")
    return encoding


@contextlib.contextmanager
def _writing(url: str) -> Iterator[None]:
    """Any failure of the storage (disk full, read-only, I/O error, a remote's 5xx, lost or refused connection) as
    one line; anything else (a bug, a bad argument) as it is."""
    try:
        yield
    except Exception as err:
        failure = write_error(url, err)
        if failure is None:
            raise
        raise failure from None


def _document_damage(data: bytes, spec: layout.ArraySpec | None) -> str | None:
    """Why a node's zarr.json is not what the schema gives (`spec`: an array's; None: a group), or None."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return "not valid JSON"
    if not isinstance(meta, dict) or meta.get("node_type") != ("group" if spec is None else "array"):
        return "not the metadata of a zarr " + ("group" if spec is None else "array")
    if spec is None:
        return None
    try:
        parsed = ArrayV3Metadata.from_dict(meta).to_dict()
    except (ValueError, TypeError, KeyError):
        return "not the metadata of a zarr array"
    return None if layout.matches(parsed, spec) else "not the metadata the store's schema gives"


def _missing_chunk(key: str) -> MissingChunkError:
    return MissingChunkError(f"{key} is missing", key)


def _check_creatable(loc: Location) -> None:
    """Refuse to create a store in a place that holds anything but a killed creator's temp files: with no root
    zarr.json it is not a store (the root is the first thing a writer publishes), so whatever is there, a
    `data.tar.partial` or a `videos/` folder included, is someone else's, and a store written among it would mix
    with it (and a later sweep of temp files could take theirs)."""
    if not loc.exists():
        return
    foreign = sorted(n for n in loc.list_names("") if not is_temp_name(n))
    if foreign:
        own = [n for n in foreign if n in _OWN_NAMES]
        hint = f", which a store would write into ({', '.join(own[:3])})" if own else ""
        raise UserError(f"cannot create store {loc.url}: it is not empty and not a dist-cache store (found "
                        f"{len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'}: {', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}{hint}); "
                        f"use a new or empty --out")


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
