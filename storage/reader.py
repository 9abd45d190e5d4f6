"""FeatureStore: read-only access to a feature store, complete or still being extracted.

A complete store is read from its finalized tables and consolidated metadata (a handful of requests to
open remotely). An incomplete one is read from the per-video records, so `info` can show progress and
nothing is ever returned for a sample whose record is not "done": zarr returns zeros for shards that
were never written, so the record, not the array, is the truth.

Format 2 data is read here, not through zarr: a sample's requested layers are one contiguous byte range
of its shard (storage/shards.py), fetched in one request after the shard's index (cached), every chunk's
crc32c checked. Anything missing or damaged raises StoreDamagedError; it is never returned as data.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from zarr.abc.store import Store

from dist_cache.errors import first_line
from dist_cache.sampling import dense_subset
from storage import frames_codec, layout, parameters, records, shards
from storage.encoding import Encoding, EncodingError
from storage.errors import REPAIR_HINT, SampleNotDoneError, StoreDamagedError
from storage.integrity import check_store
from storage.location import configure_zarr
from storage.opened import OpenedStore
from storage.quantize import GROUPS, dequantize_int8
from storage.records import RecordError, VideoRecord, decode_group, group_members
from storage.remote import ZarrStoreLocation, open_location
from storage.schema import DTYPES, SampleStatus, StoreSchema, status_counts

# Integrity checks are small reads (whole shards when deep): a few in flight hide a remote store's latency.
CHECK_THREADS = 8


class StoreDamageWarning(UserWarning):
    """Records that do not decode: their videos count as pending until extract redoes them."""


@dataclasses.dataclass
class RawSample:
    """A sample's stored values: fp16 features, or int8 codes plus fp16 per-token scales; in a projected compact
    store, the requested layers' flat PCA codes back to back (fp16, or int8 plus scales)."""

    features: np.ndarray  # (L', T, N+1, C) float16 or int8; projected: (T*(N+1)*sum K_l,) float16 or int8
    scales: np.ndarray | None = None  # (L', T, N+1) float16, int8 stores only; (L', T, N+1, 2) in compact stores

    @classmethod
    def empty(cls, schema: StoreSchema, num_layers: int, code_size: int | None = None) -> RawSample:
        (shape, dtype), scales = stored_shapes(schema, num_layers, code_size)
        return cls(np.empty(shape, dtype), None if scales is None else np.empty(*scales))

    def check(self, schema: StoreSchema, num_layers: int, code_size: int | None = None) -> None:
        """Caller-provided buffers must be exactly what the read fills, C-contiguous (e.g. pinned memory views)."""
        features, scales = stored_shapes(schema, num_layers, code_size)
        wanted = [("features", self.features, *features)]
        if scales is not None:
            wanted.append(("scales", self.scales, *scales))
        for name, arr, shp, dtype in wanted:
            if arr is None or arr.shape != shp or arr.dtype != dtype or not arr.flags.c_contiguous \
                    or not arr.flags.writeable:
                got = None if arr is None else (arr.shape, str(arr.dtype))
                raise ValueError(f"out.{name} must be a writable C-contiguous {dtype} array of shape {shp}, got {got}")

    def dequantized(self, dtype: Any = np.float16) -> np.ndarray:
        """A plain (or format-2 int8) store's tokens; a compact store's are decoded by FeatureStore.features."""
        if self.features.ndim != 4 or (self.scales is not None and self.scales.ndim != 3):
            raise ValueError("these are a compact store's codes: decode them with FeatureStore.features (or "
                             "store.encoding.decode)")
        if self.scales is None:
            return self.features.astype(dtype, copy=False)
        if np.dtype(dtype) == np.float32:
            return self.features.astype(np.float32) * self.scales.astype(np.float32)[..., None]
        return dequantize_int8(self.features, self.scales)


def stored_shapes(schema: StoreSchema, num_layers: int, code_size: int | None = None
                  ) -> tuple[tuple[tuple[int, ...], np.dtype], tuple[tuple[int, ...], np.dtype] | None]:
    """((shape, dtype) of a read's features, (shape, dtype) of its scales or None) for `num_layers` layers;
    `code_size`: the flat codes' length, for a projected compact store (FeatureStore.code_size)."""
    token = (num_layers, schema.num_frames, schema.tokens)
    dtype = np.dtype(DTYPES[schema.dtype])
    features = ((code_size,), dtype) if layout.projected_components(schema) is not None else \
        ((*token, schema.width), dtype)
    scales = (*token, GROUPS) if schema.encoding is not None else token
    return features, ((scales, np.dtype(np.float16)) if schema.dtype == "int8" else None)


class FeatureStore:
    """Read-only view of a store. Pickles as (url, storage_options) and reopens lazily in each process,
    which is what spawn DataLoader workers need (never fork after zarr has done I/O)."""

    def __init__(self, url: str | os.PathLike | Store, storage_options: dict[str, Any] | None = None) -> None:
        self._url = url if isinstance(url, Store) else os.fspath(url)
        self._options = dict(storage_options) if storage_options else None
        self._opened: OpenedStore | None = None

    @classmethod
    def open(cls, url: str | os.PathLike | Store, storage_options: dict[str, Any] | None = None) -> FeatureStore:
        """Open a store at a path, an fsspec URL (with storage_options), or an existing zarr Store."""
        store = cls(url, storage_options)
        store._state()  # fail now, with a clear message, rather than on first access
        return store

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "storage_options": self._options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["url"], state["storage_options"])  # type: ignore[misc]

    def _state(self) -> OpenedStore:
        if self._opened is None:
            configure_zarr()
            loc = ZarrStoreLocation(self._url) if isinstance(self._url, Store) \
                else open_location(self._url, self._options)
            self._opened = OpenedStore(loc)
        return self._opened

    def __repr__(self) -> str:
        url = self._url if isinstance(self._url, str) else repr(self._url)
        return f"FeatureStore({url!r})"

    # ---------------------------------------------------------------- description
    @property
    def url(self) -> str:
        return self._state().url

    @property
    def schema(self) -> StoreSchema:
        return self._state().schema

    @property
    def complete(self) -> bool:
        return self._state().complete

    @property
    def consolidated(self) -> bool:
        return self._state().consolidated

    @property
    def fingerprint(self) -> str:
        return self.schema.fingerprint

    @property
    def checksummed(self) -> bool:
        """Whether every chunk carries a crc32c (format 2); format-1 integrity is unchecked."""
        return self.schema.format_version >= 2

    @property
    def has_frames(self) -> bool:
        return self.schema.dense_gamma is not None

    @property
    def dense_gamma(self) -> int | None:
        return self.schema.dense_gamma

    @property
    def videos_per_shard(self) -> int:
        """P: 1 as extract writes; more in a packed copy (`dist-cache copy --videos-per-shard`), read-only."""
        return self._state().videos_per_shard

    @property
    def encoding(self) -> Encoding | None:
        """A compact store's fitted parameters (storage/encoding.py), read once and checked against the sha256 its
        schema recorded; None for a plain store."""
        st = self._state()
        if self.schema.encoding is None:
            return None
        if st.encoding is None:
            try:
                st.encoding = parameters.read(st.array, self.schema)
            except (EncodingError, ValueError) as err:
                raise StoreDamagedError(f"store {self.url}: {first_line(err)}; its codes cannot be decoded without "
                                        f"them: re-create the store (or copy it again from its source)") from None
        return st.encoding

    def code_size(self, layers: Sequence[int] | int | None = None) -> int | None:
        """Elements of the flat codes `read_sample` returns for `layers` in a projected compact store, else None."""
        encoding = self.encoding
        if encoding is None or not encoding.projected:
            return None
        return encoding.code_size(self.schema.layer_positions(layers), self.schema.num_frames, self.schema.tokens)

    def limitations(self) -> list[str]:
        """What this store lacks compared with a current one, one line each (for `info`)."""
        if self.schema.format_version >= 2:
            return []
        out = ["format 1 (dist-cache 0.1): no checksums, so damaged data is not detected (integrity unchecked)",
               "format 1: no dense frames and no per-view labels (every view has its video's label)"]
        bb = self.schema.backbone
        if str(bb["pretrained"]).lower() == "openai" and bb["activation"] != "quick_gelu":
            out.append(f"format 1: backbone {bb['model']} with OpenAI weights ran without QuickGELU, which those "
                       f"weights were trained with: its features are not CLIP's; re-extract with this dist-cache")
        return out

    @property
    def text_features(self) -> np.ndarray:
        return np.asarray(self._state().table(layout.TEXT), dtype=np.float32)

    @property
    def videos(self) -> list[str]:
        """Video paths, relative to the video root (checked: none is absolute or leaves the root)."""
        return [str(p) for p in self._state().table(layout.VIDEO_PATH)]

    def video(self, v: int) -> str:
        return str(self._state().table(layout.VIDEO_PATH)[v])

    @property
    def labels(self) -> np.ndarray:
        """(V,) int32: each video's label (checked to be a class index)."""
        return np.asarray(self._state().table(layout.VIDEO_LABEL))

    def video_sizes(self) -> np.ndarray:
        """(V,) int64: each video file's size in bytes as extraction recorded it; -1 where none was (a pending
        video, or a format-1 store from before sizes were recorded). A finalized store reads one table."""
        st = self._state()
        if st.complete:
            return np.asarray(st.table("videos/size_bytes"), dtype=np.int64)
        sizes = np.full(self.schema.num_videos, -1, dtype=np.int64)
        for v in range(self.schema.num_videos):
            rec = self.record(v)
            if rec is not None and rec.facts and rec.facts.get("size_bytes") is not None:
                sizes[v] = int(rec.facts["size_bytes"])
        return sizes

    def __len__(self) -> int:
        return self.schema.num_samples

    # ---------------------------------------------------------------- status
    def _check_index(self, i: int) -> tuple[int, int]:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise IndexError(f"sample index {i!r} out of range [0, {len(self)})")
        return divmod(int(i), self.schema.views_per_video)

    def _decode(self, i: int, data: bytes | None) -> dict[int, VideoRecord]:
        """The records in record i: video i's, or in a packed store group i's. {} while it is pending, or if it is
        unreadable: then its videos count as pending until they are written again (one warning names it)."""
        st = self._state()
        P = st.videos_per_shard
        if data is None:
            return {}
        try:
            recs = decode_group(data, i, P, self.schema) if P > 1 else [VideoRecord.decode(data, i, self.schema)]
        except RecordError as err:
            members = group_members(i, P, self.schema.num_videos)
            if members[0] not in st.bad_records:
                pending = f"video {i} counts as pending until extract redoes it" if P == 1 else \
                    f"videos {members[0]}..{members[-1]} count as pending until the copy redoes them"
                warnings.warn(f"store {st.url}: record {self._record_key(members[0])} is unreadable ({err}); "
                              f"{pending}", StoreDamageWarning, stacklevel=3)
            st.bad_records.update(dict.fromkeys(members, str(err)))
            return {}
        out = {}
        for rec in recs:
            if rec.status == SampleStatus.DONE:
                rec = self._with_labels(rec)
                st.done_records[rec.video_index] = rec
            out[rec.video_index] = rec
        return out

    def _record_key(self, v: int) -> str:
        """Where video v's record is: its own file, or its group's in a packed store."""
        P = self._state().videos_per_shard
        return layout.record_key(v) if P == 1 else layout.group_record_key(v // P)

    def _with_labels(self, rec: VideoRecord) -> VideoRecord:
        """Format-1 records have no per-view label: each view has its video's."""
        if all(view.label is not None for view in rec.views):
            return rec
        label = int(self.labels[rec.video_index])
        return dataclasses.replace(rec, views=tuple(dataclasses.replace(view, label=label) for view in rec.views))

    def record(self, v: int) -> VideoRecord | None:
        """Video v's record (facts, per-view plans and labels, or the failure), None while it is pending."""
        st = self._state()
        if not 0 <= v < self.schema.num_videos:
            raise IndexError(f"video index {v} out of range [0, {self.schema.num_videos})")
        if v in st.done_records:
            return st.done_records[v]
        if st.complete:
            rec = records.from_tables(st.table, v, self.schema.views_per_video)
            return None if rec is None else self._with_labels(rec)
        return self._decode(v // st.videos_per_shard, st.loc.read(self._record_key(v))).get(v)

    def _video_statuses(self) -> np.ndarray:
        st = self._state()
        if st.complete:
            per_sample = np.asarray(st.table("samples/status"), dtype=np.uint8)
            return per_sample[:: self.schema.views_per_video]
        V, P = self.schema.num_videos, st.videos_per_shard
        listed = layout.listed_records(st.loc.list_names(layout.RECORDS), V, P)
        raw = st.loc.read_many([key for i, key in listed.items() if P > 1 or i not in st.done_records])
        per_video = np.zeros(V, dtype=np.uint8)
        for i, key in listed.items():
            found = {i: st.done_records[i]} if P == 1 and i in st.done_records else self._decode(i, raw[key])
            for v, rec in found.items():
                per_video[v] = rec.status
        return per_video

    @property
    def status(self) -> np.ndarray:
        """(S,) uint8 SampleStatus codes. Incomplete stores read every record (fine locally)."""
        return np.repeat(self._video_statuses(), self.schema.views_per_video)

    def video_facts(self) -> dict[str, np.ndarray]:
        """(V,) arrays of every video's facts as the `videos/*` tables hold them, rows of videos not done holding
        the fills (storage/README.md): num_frames, width, height, fps, transform, vfr. A complete store reads its
        tables; an incomplete one gathers them from the records of its done videos (every one read)."""
        names = ("num_frames", "width", "height", "fps", "transform", "vfr")
        st = self._state()
        if st.complete:
            return {name: np.asarray(st.table(f"videos/{name}")) for name in names}
        done = np.flatnonzero(self._video_statuses() == SampleStatus.DONE)
        found = {int(v): rec for v in done if (rec := self.record(int(v))) is not None}
        tables = records.gather(found, self.schema)
        return {name: tables[f"videos/{name}"] for name in names}

    def done_indices(self) -> np.ndarray:
        return np.flatnonzero(self.status == SampleStatus.DONE)

    def progress(self) -> dict[str, int]:
        """Videos done / failed / pending (for `info` on a running extraction)."""
        return status_counts(self._video_statuses())

    # ---------------------------------------------------------------- samples
    def sample(self, i: int) -> dict[str, Any]:
        """Provenance of sample i: its video, label, view plan (frames, crop, flip, grayscale), status, facts."""
        v, k = self._check_index(i)
        fields = records.sample_dict(self.record(v), k, int(self.labels[v]))
        return {"video": self.video(v), "video_index": v, "view": k,
                "label_name": self.schema.class_names[fields["label"]], **fields}

    def label(self, i: int) -> int:
        """Sample i's label: its view's (an SSv2 flip may swap it), else its video's."""
        v, k = self._check_index(i)
        rec = self.record(v)
        if rec is not None and rec.status == SampleStatus.DONE:
            return int(rec.views[k].label)  # type: ignore[arg-type]
        return int(self.labels[v])

    def _require_done(self, i: int) -> tuple[int, int]:
        v, k = self._check_index(i)
        rec = self.record(v)
        if rec is None or rec.status != SampleStatus.DONE:
            status = rec.status.label if rec else "pending"
            why = f": {rec.error.splitlines()[-1] if rec.error else ''}" if rec else ""
            raise SampleNotDoneError(
                f"sample {i} (video {v}, {self.video(v)!r}) is {status}{why}; "
                f"its features were never written (use store.done_indices())")
        return v, k

    def _damage(self, v: int, array: str, err: shards.ShardDamage) -> StoreDamagedError:
        return StoreDamagedError(f"store {self.url}: video {v} ({self.video(v)}) is damaged: {array}: {err}; "
                                 f"{REPAIR_HINT}")

    def _read(self, name: str, v: int, k: int, first: int, out: np.ndarray) -> None:
        st = self._state()
        st.array(name)  # checks its layout, learns its shard format
        try:
            st.read_chunks(name, v, k, first, out)
        except shards.ShardDamage as err:
            raise self._damage(v, name, err) from None

    def read_sample(self, i: int, layers: Sequence[int] | int | None = None, *,
                    out: RawSample | None = None) -> RawSample:
        """Sample i's stored values for `layers` (backbone block indices, in that order; None: all):
        fp16 features, or int8 codes plus fp16 scales, exactly as stored.

        Each maximal run of consecutive stored layers is one ranged read (the whole sample is one), straight
        into `out` when given (e.g. views of pinned memory: no extra copy). Raises StoreDamagedError for
        missing or corrupt bytes, SampleNotDoneError for a sample without features."""
        v, k = self._require_done(i)
        pos = self.schema.layer_positions(layers)
        code_size = self.code_size(layers)
        if out is None:
            out = RawSample.empty(self.schema, len(pos), code_size)
        else:
            out.check(self.schema, len(pos), code_size)
        if code_size is not None:
            self._read_codes(v, k, pos, out)
            return out
        at = 0
        for a, b in _runs(pos):
            rows = slice(at, at + b - a)
            if self.checksummed:
                self._read(layout.FEATURES, v, k, a, out.features[rows])
                if out.scales is not None:
                    self._read(layout.SCALES, v, k, a, out.scales[rows])
            else:  # format 1: through zarr (slices: oindex on a sharded array is ~40x slower)
                st = self._state()
                out.features[rows] = st.array(layout.FEATURES)[int(i), a:b]
                if out.scales is not None:
                    out.scales[rows] = st.array(layout.SCALES)[int(i), a:b]
            at += b - a
        return out

    def _read_codes(self, v: int, k: int, pos: list[int], out: RawSample) -> None:
        """A projected compact store's codes of layers `pos`: one ranged read per run of consecutive layers (each
        layer is a whole number of chunks of `grain` components)."""
        enc, s = self.encoding, self.schema
        assert enc is not None
        per_component = s.num_frames * s.tokens
        offsets, at = enc.offsets, 0
        for a, b in _runs(pos):
            size = per_component * (offsets[b] - offsets[a])
            self._read(layout.CODES, v, k, offsets[a] // enc.grain, out.features[at:at + size])
            at += size
        if out.scales is not None:
            row = 0
            for a, b in _runs(pos):
                self._read(layout.SCALES, v, k, a, out.scales[row:row + b - a])
                row += b - a

    def features(self, i: int, layers: Sequence[int] | int | None = None, dtype: Any = np.float16) -> np.ndarray:
        """(L', T, N+1, C) token features of sample i, float16 (dequantised for int8 stores; reconstructed from
        their codes for compact stores, storage/README.md "Compact stores").

        dtype=np.float32 skips the float16 rounding of int8 and compact stores (and numpy's slow fp16 cast)."""
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise ValueError("dtype must be float16 or float32")
        raw = self.read_sample(i, layers)
        encoding = self.encoding
        if encoding is None:
            return raw.dequantized(dtype)
        tokens = encoding.decode(raw.features, raw.scales, self.schema.layer_positions(layers),
                                 self.schema.num_frames, self.schema.tokens)
        with np.errstate(over="ignore"):
            return tokens.astype(dtype, copy=False)

    def clip_embeddings(self, i: int) -> np.ndarray:
        """(T, E) float16: CLIP's own final per-frame image embedding for sample i."""
        v, k = self._require_done(i)
        if not self.checksummed:
            return np.asarray(self._state().array(layout.CLIP)[int(i)])
        out = np.empty((self.schema.num_frames, self.schema.embed_dim), np.float16)
        self._read(layout.CLIP, v, k, 0, out)
        return out

    def frames(self, i: int, gamma: int | None = None, *, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 (gamma*T, R, R, 3): sample i's rendered dense frames (gamma None: the stored G); for gamma < G
        the subset `dense_subset(G, gamma, T)`, which is what dense_indices gives for gamma. A JPEG store's frames
        are decoded here (only those of the subset), in the calling thread: Pillow releases the GIL."""
        G, subset = self._frame_subset(gamma)
        v, k = self._require_done(i)
        T, R = self.schema.num_frames, self.schema.image_size
        shape = (G * T if subset is None else len(subset), R, R, 3)
        if out is not None and (out.shape != shape or out.dtype != np.uint8 or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {shape}")
        if self.frames_format[0] == frames_codec.JPEG:
            out = np.empty(shape, np.uint8) if out is None else out
            payloads = self._frame_payloads(v, k, subset)
            fmt = self._state().formats[layout.FRAMES]
            for j, payload in enumerate(payloads):
                try:
                    fmt.decode_payload(payload, out[j].reshape(-1), f"frame {j}")
                except shards.ShardDamage as err:
                    raise self._damage(v, layout.FRAMES, err) from None
            return out
        full = out if subset is None and out is not None else np.empty((G * T, R, R, 3), np.uint8)
        self._read(layout.FRAMES, v, k, 0, full)
        if subset is None:
            return full
        return np.take(full, subset, axis=0, out=out)

    def frame_payloads(self, i: int, gamma: int | None = None) -> list[np.ndarray]:
        """A JPEG store's frames of sample i for `gamma` (None: the stored G) as stored: one JPEG each (1-D uint8,
        checksum verified), in frame order, from one ranged read. For decoding elsewhere (on a GPU) or copying
        into a store of the same quality without decoding."""
        if self.frames_format[0] != frames_codec.JPEG:
            raise ValueError(f"store {self.url} holds raw frames, not JPEG: use frames()")
        _, subset = self._frame_subset(gamma)
        v, k = self._require_done(i)
        return self._frame_payloads(v, k, subset)

    @property
    def frames_format(self) -> tuple[str, int | None]:
        """("raw", None) or ("jpeg", quality). ValueError for a store without dense frames."""
        found = self.schema.frames_format
        if found is None:
            raise ValueError(f"store {self.url} holds no dense frames (extract it with --dense-frames)")
        return found

    def _frame_subset(self, gamma: int | None) -> tuple[int, np.ndarray | None]:
        """(G, the stored frames' positions for gamma, or None for all of them)."""
        G = self.schema.dense_gamma
        if G is None:
            raise ValueError(f"store {self.url} holds no dense frames (extract it with --dense-frames)")
        gamma = G if gamma is None else int(gamma)
        return G, None if gamma == G else dense_subset(G, gamma, self.schema.num_frames)

    def _frame_payloads(self, v: int, k: int, subset: np.ndarray | None) -> list[np.ndarray]:
        """Video v view k's JPEG frames at `subset` (None: all): the whole sample in one read (cheap: a few hundred
        kB), then only the frames wanted."""
        st = self._state()
        st.array(layout.FRAMES)
        count = self.schema.dense_gamma * self.schema.num_frames
        try:
            payloads = st.read_payloads(layout.FRAMES, v, k, 0, count)
        except shards.ShardDamage as err:
            raise self._damage(v, layout.FRAMES, err) from None
        return payloads if subset is None else [payloads[int(j)] for j in subset]

    def stored_bytes(self, name: str, v: int) -> int:
        """Bytes video v's chunks of sharded array `name` occupy as stored (checksums included), from its shard's
        index: what a variable-size array (JPEG frames, compressed codecs) costs per video. StoreDamagedError if
        the shard or its index is damaged."""
        st = self._state()
        self._require_done(v * self.schema.views_per_video)
        st.array(name)
        fmt = st.formats[name]
        per_shard = fmt.samples_per_shard // self.schema.views_per_video
        try:
            index = st.shard_index(fmt, fmt.shard_key(v // per_shard))
        except shards.ShardDamage as err:
            raise self._damage(v, name, err) from None
        per_video = self.schema.views_per_video * fmt.chunks_per_sample
        rows = index[(v % per_shard) * per_video:(v % per_shard + 1) * per_video]
        return int(rows[rows[:, 0] != shards.MISSING, 1].sum())

    # ---------------------------------------------------------------- integrity
    def check_store(self) -> list[str]:
        """Findings about the store as a whole, one line each; [] when intact: every metadata document (present,
        JSON, equal to its consolidated copy), every listed array's layout, and every array that is not sharded
        per video read whole (every chunk present and passing its crc32c). storage/integrity.py."""
        return check_store(self._state())

    @property
    def repair_hint(self) -> str:
        """What rewrites damage: extract --repair, a new copy of a packed copy, a backup of a format-1 store."""
        return self._state().fix

    def check_video(self, v: int, deep: bool = False) -> list[str]:
        """Findings about video v's stored bytes, one line each; [] when it is intact (or not done).

        Shallow: its record decodes (and, in a complete store, agrees with the tables); every array's shard
        exists, its index passes its checksum, and every inner chunk of its samples is listed. deep=True also
        reads every chunk and checks its crc32c."""
        return next(self.check_videos([v], deep))[1]

    def check_videos(self, videos: Iterable[int], deep: bool = False) -> Iterator[tuple[int, list[str]]]:
        """(v, check_video(v, deep)) for each video in order (verify's pass, and extract --repair's), checked
        CHECK_THREADS at a time; the videos of one shard (a packed copy's shards hold many) in one thread, which reads
        the shard's index once, and never from the cache of earlier reads."""
        P = self.videos_per_shard

        def check(group: list[int]) -> list[tuple[int, list[str]]]:
            seen: dict[str, tuple[str, Any]] = {}  # array or "records" -> (key, its index / decoded record, or damage)
            return [(v, self._check(v, deep, seen)) for v in group]

        groups = [list(g) for _, g in itertools.groupby(map(int, videos), key=lambda v: v // P)]
        pool = concurrent.futures.ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="store-check")
        try:
            for checked in pool.map(check, groups):
                yield from checked
        finally:
            pool.shutdown(cancel_futures=True)  # a caller that stops early does not wait for the rest

    def _check(self, v: int, deep: bool, seen: dict[str, tuple[str, Any]]) -> list[str]:
        st = self._state()
        rec = self.record(v)
        findings = []
        if v in st.bad_records:
            findings.append(f"{self._record_key(v)} is unreadable ({st.bad_records[v]}): video {v} counts as pending")
        elif st.complete and rec is not None:
            findings += self._check_stored_record(v, rec, seen)
        if rec is None or rec.status != SampleStatus.DONE:
            return findings
        K = self.schema.views_per_video
        for spec in layout.sharded_arrays(self.schema):
            if not self.checksummed:
                key = f"{spec.name}/c.{v}" + ".0" * (len(spec.shape) - 1)
                if st.loc.read_range(key, 0, 1) is None:
                    findings.append(f"{spec.name}: its shard {key} is missing")
                continue
            st.array(spec.name)
            fmt = st.formats[spec.name]
            try:
                index = _once(seen, spec.name, fmt.shard_key(v // st.videos_per_shard),
                              lambda key, fmt=fmt: st.shard_index(fmt, key, cached=False), shards.ShardDamage)
                scratch = np.empty((fmt.chunks_per_sample, *fmt.chunk_shape[1:]), fmt.dtype) if deep else None
                for k in range(K):
                    if scratch is not None:
                        st.read_chunks(spec.name, v, k, 0, scratch, index=index)
                    else:
                        st.locate(spec.name, v, k, 0, fmt.chunks_per_sample, index)
            except shards.ShardDamage as err:
                findings.append(f"{spec.name}: {err}")
        return findings

    def _check_stored_record(self, v: int, rec: VideoRecord, seen: dict[str, tuple[str, Any]]) -> list[str]:
        """A complete store is read from its tables, but its records are what a later writer resumes from: each
        must still decode and agree with the tables."""
        st = self._state()
        key, P = self._record_key(v), st.videos_per_shard

        def decode(key: str) -> dict[int, VideoRecord]:
            data = st.loc.read(key)
            if data is None:
                raise RecordError("it is missing")
            if P > 1:
                return {r.video_index: r for r in decode_group(data, v // P, P, self.schema)}
            return {v: VideoRecord.decode(data, v, self.schema)}

        try:
            stored = _once(seen, "records", key, decode, RecordError).get(v)
        except RecordError as err:
            return [f"{key} is unreadable ({err})" if str(err) != "it is missing" else f"{key} is missing"]
        if stored is None or stored.status != rec.status:
            return [f"{key} says video {v} is {stored.status.label if stored else 'absent'}, the store's tables say "
                    f"{rec.status.label}"]
        return []


def _once(seen: dict[str, tuple[str, Any]], slot: str, key: str, load: Any, damage: type[Exception]) -> Any:
    """`load(key)`, remembered in `seen[slot]` while the same key is asked for again (its damage too)."""
    if slot not in seen or seen[slot][0] != key:
        try:
            seen[slot] = (key, load(key))
        except damage as err:
            seen[slot] = (key, err)
    value = seen[slot][1]
    if isinstance(value, damage):
        raise value
    return value


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 0] -> [(3, 6), (0, 1)]: maximal ascending runs, in the requested order."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
