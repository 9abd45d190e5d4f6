"""FeatureStore: read-only access to a feature store, complete or still being extracted.

A complete store is read from its finalized tables and consolidated metadata (a handful of requests to
open remotely). An incomplete one is read from the per-video records, so `info` can show progress and
nothing is ever returned for a sample whose record is not "done": zarr returns zeros for shards that
were never written, so the record, not the array, is the truth.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import zarr
from zarr.abc.store import Store

from storage import layout, records
from storage.errors import SampleNotDoneError, StoreNotFoundError
from storage.quantize import dequantize_int8
from storage.remote import Location, ZarrStoreLocation, configure_zarr, open_location
from storage.schema import ATTR_KEY, FORMAT_VERSION, SchemaFacts, format_value


class _Opened:
    """Everything a process needs to read; rebuilt after unpickling instead of being pickled."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        zstore = loc.zarr_store(read_only=True)
        try:
            # Uses consolidated metadata when the root has it (a complete store): the arrays below then
            # open without further requests.
            group = zarr.open_group(zstore, mode="r", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError):
            raise StoreNotFoundError(f"no dist-cache store at {loc.url}") from None
        attrs = group.attrs.asdict()
        if ATTR_KEY not in attrs:
            raise StoreNotFoundError(f"{loc.url} is a zarr group but not a dist-cache store (or its creation "
                                     f"was interrupted: rerun the extraction)")
        self.schema: dict[str, Any] = attrs[ATTR_KEY]
        if self.schema.get("format_version") != FORMAT_VERSION:
            raise StoreNotFoundError(f"store {loc.url} has format_version {self.schema.get('format_version')}, "
                                     f"this dist-cache reads {FORMAT_VERSION}: upgrade dist-cache")
        self.complete = bool(attrs.get("complete"))
        if not self.complete and group.metadata.consolidated_metadata is not None:
            # Left from an earlier finalize, then written to again: do not trust it.
            group = zarr.open_group(zstore, mode="r", zarr_format=3, use_consolidated=False)
        self.consolidated = group.metadata.consolidated_metadata is not None
        self.summary = attrs.get("summary")
        self.group = group
        self.arrays: dict[str, Any] = {}
        self.tables: dict[str, np.ndarray] | None = None
        self.done_records: dict[int, dict[str, Any]] = {}  # "done" never reverts, so it is cached

    def array(self, name: str) -> Any:
        if name not in self.arrays:
            self.arrays[name] = self.group[name]
        return self.arrays[name]

    def table(self, name: str) -> np.ndarray:
        """A whole small array, read once. In a complete store the first call reads every table at once:
        a few MB even for Kinetics, and a handful of requests."""
        if self.tables is None:
            self.tables = {}
            if self.complete:
                names = list(layout.SAMPLE_TABLES) + list(layout.VIDEO_TABLES) + [layout.VIDEO_PATH,
                                                                                  layout.VIDEO_LABEL]
                self.tables = {n: self._read_table(n) for n in names}
        if name not in self.tables:
            self.tables[name] = self._read_table(name)
        return self.tables[name]

    def _read_table(self, name: str) -> np.ndarray:
        try:
            return self.array(name)[...]
        except KeyError:
            if name not in layout.OPTIONAL_TABLES:
                raise
        # A store finalized before this table existed: every row is "unknown".
        dtype, _row, fill = layout.VIDEO_TABLES[name]
        return np.full((self.schema["num_videos"],), fill, dtype=object if dtype is str else dtype)


class FeatureStore(SchemaFacts):
    """Read-only view of a store. Pickles as (url, storage_options) and reopens lazily in each process,
    which is what spawn DataLoader workers need (never fork after zarr has done I/O)."""

    def __init__(self, url: str | os.PathLike | Store, storage_options: dict[str, Any] | None = None) -> None:
        self._url = url if isinstance(url, Store) else os.fspath(url)
        self._options = dict(storage_options) if storage_options else None
        self._opened: _Opened | None = None

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

    def _state(self) -> _Opened:
        if self._opened is None:
            configure_zarr()
            loc = ZarrStoreLocation(self._url) if isinstance(self._url, Store) \
                else open_location(self._url, self._options)
            self._opened = _Opened(loc)
        return self._opened

    def refresh(self) -> None:
        """Forget cached state, e.g. to see progress of a running extraction."""
        self._opened = None

    def __repr__(self) -> str:
        url = self._url if isinstance(self._url, str) else repr(self._url)
        return f"FeatureStore({url!r})"

    # ---------------------------------------------------------------- description
    @property
    def url(self) -> str:
        return self._state().loc.url

    @property
    def schema(self) -> dict[str, Any]:
        return self._state().schema

    @property
    def complete(self) -> bool:
        return self._state().complete

    @property
    def consolidated(self) -> bool:
        return self._state().consolidated

    @property
    def layers(self) -> list[int]:
        return list(self.schema["layers"])

    @property
    def num_frames(self) -> int:
        return self.schema["num_frames"]

    @property
    def tokens(self) -> int:
        return self.schema["tokens"]

    @property
    def width(self) -> int:
        return self.schema["width"]

    @property
    def dtype(self) -> str:
        return self.schema["dtype"]

    @property
    def backbone(self) -> dict[str, Any]:
        return self.schema["backbone"]

    @property
    def class_names(self) -> list[str]:
        return list(self.schema["class_names"])

    @property
    def text_features(self) -> np.ndarray:
        return np.asarray(self._state().array(layout.TEXT)[...], dtype=np.float32)

    @property
    def videos(self) -> list[str]:
        return [str(p) for p in self._videos()]

    @property
    def labels(self) -> np.ndarray:
        return self._labels()

    def __len__(self) -> int:
        return self.num_videos * self.views_per_video

    def _videos(self) -> np.ndarray:
        return self._state().table(layout.VIDEO_PATH)

    def _labels(self) -> np.ndarray:
        return np.asarray(self._state().table(layout.VIDEO_LABEL))

    # ---------------------------------------------------------------- status
    def _check_index(self, i: int) -> tuple[int, int]:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < len(self):
            raise IndexError(f"sample index {i!r} out of range [0, {len(self)})")
        return divmod(int(i), self.views_per_video)

    def _record(self, v: int) -> dict[str, Any] | None:
        st = self._state()
        if v in st.done_records:
            return st.done_records[v]
        data = st.loc.read(layout.record_key(v))
        rec = None if data is None else records.decode(data, v)
        if rec is not None and rec["status"] == records.DONE:
            st.done_records[v] = rec
        return rec

    def _video_status(self, v: int) -> tuple[str, str | None]:
        st = self._state()
        if st.complete:
            code = int(st.table("videos/status")[v])
            return records.STATUS_NAMES[code], (str(st.table("videos/error")[v]) or None)
        rec = self._record(v)
        return (rec["status"], rec["error"]) if rec else ("pending", None)

    @property
    def status(self) -> np.ndarray:
        """(S,) uint8: 0 pending, 1 done, 2 failed. Incomplete stores read every record (fine locally)."""
        st = self._state()
        if st.complete:
            return np.asarray(st.table("samples/status"), dtype=np.uint8)
        names = st.loc.list_names(layout.RECORDS)
        indices = sorted(v for v in map(layout.record_index, names) if v is not None and v < self.num_videos)
        per_video = np.zeros(self.num_videos, dtype=np.uint8)
        todo = [v for v in indices if v not in st.done_records]
        raw = st.loc.read_many([layout.record_key(v) for v in todo])
        for v in indices:
            rec = st.done_records.get(v)
            if rec is None and raw.get(layout.record_key(v)) is not None:
                rec = records.decode(raw[layout.record_key(v)], v)
                if rec["status"] == records.DONE:
                    st.done_records[v] = rec
            if rec is not None:
                per_video[v] = records.STATUS_CODES[rec["status"]]
        return np.repeat(per_video, self.views_per_video)

    def done_indices(self) -> np.ndarray:
        return np.flatnonzero(self.status == records.STATUS_CODES[records.DONE])

    def progress(self) -> dict[str, int]:
        """Videos done / failed / pending (for `info` on a running extraction)."""
        per_video = self.status[:: self.views_per_video] if len(self) else np.zeros(0, np.uint8)
        counts = {name: int((per_video == code).sum()) for name, code in records.STATUS_CODES.items()}
        return {"done": counts["done"], "failed": counts["failed"], "pending": counts["pending"]}

    # ---------------------------------------------------------------- samples
    def sample(self, i: int) -> dict[str, Any]:
        """Provenance of sample i: its video, label, view plan (frames, crop, flip, grayscale), status."""
        v, k = self._check_index(i)
        label = int(self._labels()[v])
        out: dict[str, Any] = {"video": str(self._videos()[v]), "video_index": v, "label": label,
                               "label_name": self.schema["class_names"][label], "view": k}
        st = self._state()
        if not st.complete:
            out.update(records.sample_fields(self._record(v), k))
            return out
        t = st.table
        done = int(t("samples/status")[i]) == records.STATUS_CODES[records.DONE]
        has_facts = int(t("videos/num_frames")[v]) >= 0
        status, error = self._video_status(v)
        out.update({
            "status": status, "error": error,
            "sparse_indices": np.asarray(t("samples/sparse_indices")[i], dtype=np.int64) if done else None,
            "window": float(t("samples/window")[i]) if done else None,
            "crop": tuple(int(x) for x in t("samples/crop")[i]) if done else None,
            "flip": bool(t("samples/flip")[i]) if done else None,
            "grayscale": bool(t("samples/grayscale")[i]) if done else None,
            "num_frames": int(t("videos/num_frames")[v]) if has_facts else None,
            "fps": float(t("videos/fps")[v]) if has_facts else None,
            "width": int(t("videos/width")[v]) if has_facts else None,
            "height": int(t("videos/height")[v]) if has_facts else None,
            "size_bytes": size if (size := int(t("videos/size_bytes")[v])) >= 0 else None,
            "sha256": str(t("videos/sha256")[v]) or None,
        })
        return out

    def _require_done(self, i: int) -> tuple[int, int]:
        v, k = self._check_index(i)
        status, error = self._video_status(v)
        if status != records.DONE:
            why = f": {error.splitlines()[-1] if error else ''}" if status == records.FAILED else ""
            raise SampleNotDoneError(
                f"sample {i} (video {v}, {str(self._videos()[v])!r}) is {status}{why}; "
                f"its features were never written (use store.done_indices())")
        return v, k

    def _layer_positions(self, layers: Sequence[int] | int | None) -> list[int] | None:
        if layers is None:
            return None
        wanted = [layers] if isinstance(layers, (int, np.integer)) else [int(x) for x in layers]
        have = {layer: pos for pos, layer in enumerate(self.schema["layers"])}
        missing = [x for x in wanted if x not in have]
        if missing or not wanted:
            raise ValueError(f"layers {missing or wanted} are not in this store; available layers: "
                             f"{format_value(self.layers)}")
        return [have[x] for x in wanted]

    def features(self, i: int, layers: Sequence[int] | int | None = None, dtype: Any = np.float16) -> np.ndarray:
        """(L', T, N+1, C) token features of sample i, float16 (dequantised for int8 stores).

        `layers` are backbone block indices (see .layers), in the order wanted; only their inner chunks
        are read. dtype=np.float32 skips the float16 rounding of int8 stores (and numpy's slow fp16 cast)."""
        self._require_done(i)
        dtype = np.dtype(dtype)
        if dtype not in (np.float16, np.float32):
            raise ValueError("dtype must be float16 or float32")
        pos = self._layer_positions(layers)
        st = self._state()
        runs = _runs(list(range(len(self.schema["layers"]))) if pos is None else pos)

        def read(name: str) -> np.ndarray:
            # Slices, not zarr's orthogonal indexing: oindex on a sharded array is ~40x slower here
            # (65 ms vs 1.6 ms for one ViT-B layer), and a slice reads exactly its inner chunks.
            arr = st.array(name)
            parts = [np.asarray(arr[int(i), a:b]) for a, b in runs]
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        if self.schema["dtype"] == "int8":
            codes, scales = read(layout.FEATURES), read(layout.SCALES)
            if dtype == np.float32:
                return codes.astype(np.float32) * scales.astype(np.float32)[..., None]
            return dequantize_int8(codes, scales)
        return read(layout.FEATURES).astype(dtype, copy=False)

    def clip_embeddings(self, i: int) -> np.ndarray:
        """(T, E) float16: CLIP's own final per-frame image embedding for sample i."""
        self._require_done(i)
        return np.asarray(self._state().array(layout.CLIP)[int(i)])


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 0] -> [(3, 6), (0, 1)]: maximal ascending runs, in the requested order."""
    runs: list[tuple[int, int]] = []
    for p in positions:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
