"""One opened store: its checked schema, arrays checked against it before any read, small tables read once
and checked, shard indexes cached, and the ranged reads of inner chunks with their checksums.

Rebuilt in each process (FeatureStore pickles as its URL); the reader's public API is storage/reader.py.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np
import zarr

from dist_cache.errors import first_line
from dist_cache.paths import resolve_under
from storage import layout, shards
from storage.errors import MissingChunkError, StoreDamagedError, StoreNotFoundError, refused_access, store_fix
from storage.location import Location
from storage.records import VideoRecord
from storage.root import read_attrs, stored_schema
from storage.schema import ATTR_KEY, SampleStatus
from storage.strict import StrictStore

# Tables whose values index something: name -> lowest valid value (the highest is the class count or
# the number of statuses); checked when read, so a hostile store fails in one line, not deep inside.
_TABLE_RANGES = {layout.VIDEO_LABEL: 0, "samples/label": -1, "samples/status": 0, "videos/status": 0}

# Bytes of shard indexes kept per open store (16 bytes per inner chunk): every index of a store of one video per
# shard up to ~100k videos of ViT-B/16 (L=12, K=2: 400 bytes each), or 1,600 packed shards of 64 such videos.
INDEX_CACHE_BYTES = 48 << 20


class OpenedStore:
    """Everything a process needs to read; rebuilt after unpickling instead of being pickled."""

    def __init__(self, loc: Location) -> None:
        self.loc = loc
        url = loc.url
        try:
            attrs = read_attrs(loc)
        except Exception as err:  # noqa: BLE001 - only a refusal becomes one line; the rest propagates
            raise refused_access(url, err) or err from None
        if attrs is None:
            raise StoreNotFoundError(f"no dist-cache store at {url}")
        if ATTR_KEY not in attrs:
            raise StoreNotFoundError(f"{url} is a zarr group but not a dist-cache store (or its creation "
                                     f"was interrupted: rerun the extraction)")
        self.schema = stored_schema(attrs, url)
        if self.schema.format_version >= 2 and not attrs.get("created"):
            raise StoreNotFoundError(f"store {url} is still being created (or its creation was interrupted: "
                                     f"rerun the extraction)")
        self.complete = bool(attrs.get("complete"))
        zstore = loc.zarr_store(read_only=True)
        if self.schema.format_version >= 2:
            # Every read through zarr (tables, text embeddings) refuses an absent chunk. Format 1 (dist-cache 0.1)
            # did not store chunks that equal the fill value: there an absent chunk is the fill value.
            zstore = StrictStore(zstore, self._missing_chunk)
        try:
            group = zarr.open_group(zstore, mode="r", zarr_format=3)
            if not self.complete and group.metadata.consolidated_metadata is not None:
                # Left from an earlier finalize, then written to again: do not trust it.
                group = zarr.open_group(zstore, mode="r", zarr_format=3, use_consolidated=False)
        except (ValueError, TypeError, KeyError) as err:
            raise StoreDamagedError(f"store {url}: its root metadata does not parse ({first_line(err)}); "
                                    f"re-create the store") from None
        self.consolidated = group.metadata.consolidated_metadata is not None
        self.group = group
        self.arrays: dict[str, Any] = {}
        self.formats: dict[str, shards.ShardFormat] = {}
        self.tables: dict[str, np.ndarray] = {}
        self.done_records: dict[int, VideoRecord] = {}  # "done" never reverts, so it is cached
        self.bad_records: dict[int, str] = {}
        self.indexes: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.index_bytes = 0
        self.lock = threading.Lock()  # loader threads share one store
        self.encoding: Any = None  # a compact store's parameters (storage.encoding.Encoding), read once

    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def videos_per_shard(self) -> int:
        """P: 1 as extract writes, more in a packed copy (from the features array's shards)."""
        if self.schema.format_version == 1:
            return 1
        name = layout.feature_array(self.schema)
        self.array(name)
        return self.formats[name].samples_per_shard // self.schema.views_per_video

    @property
    def fix(self) -> str:
        """What rewrites damage to the store as a whole (a table, a metadata document)."""
        try:
            per_shard = self.videos_per_shard
        except StoreDamagedError:  # the features array's own metadata is what is damaged
            per_shard = 1
        return store_fix(self.schema.format_version, per_shard)

    def _missing_chunk(self, key: str) -> MissingChunkError:
        """Raised inside zarr's event loop, so it does no I/O: the fix is the extract's (read_whole() names a packed
        copy's own)."""
        fix = store_fix(self.schema.format_version, 1)
        return MissingChunkError(f"store {self.url}: {key}, a chunk of {key.rsplit('/', 1)[0]}, is missing (never "
                                 f"read as zeros); {fix}", key)

    def damaged(self, what: str) -> StoreDamagedError:
        return StoreDamagedError(f"store {self.url}: {what}; the store is damaged or was not made by dist-cache: "
                                 f"re-create it")

    # ---------------------------------------------------------------- arrays
    def array(self, name: str) -> Any:
        """An array, after checking its metadata is exactly what the schema implies (before any read)."""
        if name in self.arrays:
            return self.arrays[name]
        try:
            arr = self.group[name]
        except KeyError:
            raise StoreDamagedError(f"store {self.url} has no {name} array (its creation was interrupted or it was "
                                    f"deleted); re-create the store") from None
        except (ValueError, TypeError) as err:
            raise self.damaged(f"the metadata of {name} does not parse ({first_line(err)})") from None
        if self.schema.format_version == 1:
            self._check_v1_shape(name, arr)
        else:
            spec = self._spec(name, arr.metadata.to_dict())
            if not layout.matches(arr.metadata.to_dict(), spec):
                raise self.damaged(f"array {name} (shape {list(arr.shape)}) does not have the layout its schema "
                                   f"gives (shape {list(spec.shape)})")
            if spec.shards is not None:
                self.formats[name] = shards.ShardFormat.of(spec)
        self.arrays[name] = arr
        return arr

    def _spec(self, name: str, meta: dict[str, Any]) -> layout.ArraySpec:
        K = self.schema.views_per_video
        per_shard = 1
        if name in (layout.FEATURES, layout.CODES, layout.SCALES, layout.CLIP, layout.FRAMES):
            found = layout.videos_per_shard(meta, K)
            if found is None:
                raise self.damaged(f"array {name} does not have shards of whole videos of {K} samples")
            per_shard = found
        specs = {s.name: s for s in layout.data_arrays(self.schema, per_shard) + layout.table_arrays(self.schema)}
        if name not in specs:
            raise self.damaged(f"array {name} is not part of this store's layout")
        return specs[name]

    def _check_v1_shape(self, name: str, arr: Any) -> None:
        s = self.schema
        expected = {layout.FEATURES: (s.num_samples, len(s.layers), s.num_frames, s.tokens, s.width),
                    layout.SCALES: (s.num_samples, len(s.layers), s.num_frames, s.tokens),
                    layout.CLIP: (s.num_samples, s.num_frames, s.embed_dim),
                    layout.TEXT: (s.num_classes, s.embed_dim)}
        rows = {**{n: s.num_samples for n in layout.SAMPLE_TABLES}, **{n: s.num_videos for n in layout.VIDEO_TABLES},
                layout.VIDEO_PATH: s.num_videos, layout.VIDEO_LABEL: s.num_videos}
        want = expected.get(name)
        ok = tuple(arr.shape) == want if want else (name in rows and arr.shape[:1] == (rows[name],))
        if not ok:
            raise self.damaged(f"array {name} has shape {list(arr.shape)}, which its schema does not give")

    def table(self, name: str) -> np.ndarray:
        """A whole small array, read once (a few MB even for Kinetics, a handful of requests), its values
        checked where a bad one would index out of range."""
        if name in self.tables:
            return self.tables[name]
        if ((self.schema.format_version == 1 and name in layout.OPTIONAL_TABLES) or name in layout.LATER_TABLES) \
                and name not in self.group:
            # A store finalized before this table existed: every row is "unknown".
            spec = next(spec for spec in layout.table_arrays(self.schema) if spec.name == name)
            values = np.full(spec.shape, spec.fill_value, dtype=object if spec.dtype is str else spec.dtype)
        else:
            values = self.read_whole(name)
        self.check_values(name, values)
        self.tables[name] = values
        return values

    def check_values(self, name: str, values: np.ndarray) -> None:
        """Values that index something lie in range; video paths stay inside the video root."""
        low = _TABLE_RANGES.get(name)
        if low is not None:
            high = self.schema.num_classes if "label" in name else len(SampleStatus)
            bad = np.flatnonzero((values < low) | (values >= high))
            if len(bad):
                raise self.damaged(f"{name} row {int(bad[0])} is {values[bad[0]]}, outside [{low}, {high})")
        if name == layout.VIDEO_PATH:
            for v, path in enumerate(values):
                path = str(path)
                # resolve_under is the authority; the cheap test only spares it 240k clean paths
                if not path or path[0] in "/\\" or ".." in path or "\x00" in path or path[1:2] == ":":
                    resolve_under(".", path, f"store {self.url} videos/path row {v}")

    def read_whole(self, name: str) -> np.ndarray:
        """A small array read whole through zarr, fresh: an absent chunk or one failing its crc32c is one line
        naming the store, the array and the fix."""
        try:
            return self.array(name)[...]
        except MissingChunkError as err:
            raise MissingChunkError(f"store {self.url}: {err.key}, a chunk of {name}, is missing (never read as "
                                    f"zeros); {self.fix}", err.key) from None
        except ValueError as err:  # zarr's crc32c codec: a chunk fails its checksum
            raise StoreDamagedError(f"store {self.url}: array {name} does not decode ({first_line(err)}); "
                                    f"{self.fix}") from None

    def shard_index(self, fmt: shards.ShardFormat, key: str, cached: bool = True) -> np.ndarray:
        with self.lock:
            if cached and key in self.indexes:
                self.indexes.move_to_end(key)
                return self.indexes[key]
        index = fmt.decode_index(self.loc.read_suffix(key, fmt.index_nbytes))
        if cached:
            with self.lock:
                if key not in self.indexes:
                    self.indexes[key] = index
                    self.index_bytes += index.nbytes
                while self.index_bytes > INDEX_CACHE_BYTES:
                    self.index_bytes -= self.indexes.popitem(last=False)[1].nbytes
        return index

    def locate(self, name: str, v: int, k: int, first: int, count: int, index: np.ndarray | None
                ) -> tuple[shards.ShardFormat, str, np.ndarray, int]:
        """The shard format, shard key, index rows and position of chunks first..first+count of sample (v, k);
        ShardDamage unless every one of them is listed in the index (`index`: the shard's, if the caller has it)."""
        fmt = self.formats[name]
        per_shard = fmt.samples_per_shard // self.schema.views_per_video
        key = fmt.shard_key(v // per_shard)
        if index is None:
            index = self.shard_index(fmt, key)
        start = ((v % per_shard) * self.schema.views_per_video + k) * fmt.chunks_per_sample + first
        missing = shards.missing_chunks(index, start, start + count)
        if missing:
            raise shards.ShardDamage(f"its inner chunk {missing[0]} is missing from the shard index")
        return fmt, key, index[start:start + count], start

    def read_chunks(self, name: str, v: int, k: int, first: int, out: np.ndarray, index: np.ndarray | None = None
                    ) -> None:
        """Fill `out` (C-contiguous, whole chunks) with inner chunks first.. of sample (v, k): ONE ranged read
        when they are back to back (straight into `out` when uncompressed), every checksum verified. `index`: the
        shard's index if the caller has it (else the cached one, read once)."""
        fmt = self.formats[name]
        n = fmt.chunk_nbytes
        flat = out.reshape(-1).view(np.uint8)
        count = flat.size // n
        fmt, key, rows, start = self.locate(name, v, k, first, count, index)
        if not fmt.compressed and shards.is_contiguous(rows):
            crcs = np.empty((count, shards.CRC_BYTES), np.uint8)
            buffers = [b for j in range(count) for b in (flat[j * n:(j + 1) * n], crcs[j])]
            got = self.loc.read_into(key, int(rows[0, 0]), buffers)
            if got is None:
                raise shards.ShardDamage("its shard file is missing")
            if got < count * (n + shards.CRC_BYTES):
                raise shards.ShardDamage("its shard file is shorter than its index says (truncated)")
            for j in range(count):
                fmt.verify(flat[j * n:(j + 1) * n], crcs[j], f"inner chunk {start + j}")
            return
        for j, payload in enumerate(self._read_pieces(fmt, key, rows, start)):
            fmt.decode_payload(payload, flat[j * n:(j + 1) * n], f"inner chunk {start + j}")

    def read_payloads(self, name: str, v: int, k: int, first: int, count: int, index: np.ndarray | None = None
                      ) -> list[np.ndarray]:
        """The stored bytes (checksums verified, then dropped) of inner chunks first..first+count of sample (v, k),
        e.g. its JPEG frames: writable 1-D uint8 views of one buffer filled by ONE ranged read when the chunks
        are back to back (this writer's layout)."""
        fmt, key, rows, start = self.locate(name, v, k, first, count, index)
        return self._read_pieces(fmt, key, rows, start)

    def _read_pieces(self, fmt: shards.ShardFormat, key: str, rows: np.ndarray, start: int) -> list[np.ndarray]:
        if shards.is_contiguous(rows):
            spans = [(0, int(rows[-1, 0] + rows[-1, 1] - rows[0, 0]))]
            base = int(rows[0, 0])
        else:  # written by another tool (zarr writes Morton order): one read per chunk
            spans = [(int(o), int(o + length)) for o, length in rows]
            base = 0
        pieces: list[np.ndarray] = []
        for lo, hi in spans:
            buffer = np.empty(hi - lo, np.uint8)
            got = self.loc.read_into(key, base + lo, [buffer])
            if got is None:
                raise shards.ShardDamage("its shard file is missing")
            if got < buffer.size:
                raise shards.ShardDamage("its shard file is shorter than its index says (truncated)")
            pieces.append(buffer)
        if len(spans) == 1 and len(rows) > 1:  # one buffer: cut it into its chunks
            offsets = rows[:, 0] - rows[0, 0]
            pieces = [pieces[0][int(o):int(o + length)] for o, length in zip(offsets, rows[:, 1])]
        payloads = []
        for j, piece in enumerate(pieces):
            fmt.verify(piece[:-shards.CRC_BYTES], piece[-shards.CRC_BYTES:], f"inner chunk {start + j}")
            payloads.append(piece[:-shards.CRC_BYTES])
        return payloads
