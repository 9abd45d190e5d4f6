"""Array names, shapes, chunking and codecs of format_version 2 (the table in storage/README.md).

Everything here is a pure function of the schema, so every writer (and every concurrent finalizer)
creates byte-identical metadata, creating an array that already exists can be checked for equality, and
a reader can check that a stored array is exactly what its schema says before sizing anything from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError
from zarr.storage import MemoryStore

from storage import encoding as enc
from storage.frames_codec import JPEG, RAW, JpegCodec
from storage.quantize import GROUPS
from storage.schema import DTYPES, StoreSchema

# Compressors by schema name. fp16 activations compress < 10 % losslessly (docs/DESIGN.md, storage), so
# "none" is the default and the fastest to write and read; the others exist for int8 codes, frames and for
# users who pay for bytes more than for CPU. storage/shards.py encodes the same bytes (proven by a test).
CODECS: dict[str, Callable[[], list[Any]]] = {
    "none": lambda: [],
    "zstd": lambda: [ZstdCodec(level=3)],
    "blosc-zstd": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
}

FEATURES = "features"
CODES = enc.CODES  # a projected compact store's features: flat PCA codes per sample (storage/encoding.py)
SCALES = "feature_scales"
CLIP = "clip_embeddings"
FRAMES = "frames"
TEXT = "text_embeddings"
VIDEO_PATH = "videos/path"
VIDEO_LABEL = "videos/label"
RECORDS = "records"

# "." keeps each array's shards in one flat folder (features/c.<v>.0.0.0.0): the default "/" would
# make four nested directories per video, about a million directories per array for Kinetics-400.
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}

# Rows per chunk of the small per-video / per-sample arrays finalize writes: few objects to fetch remotely.
TABLE_ROWS = 65536


def record_key(video_index: int) -> str:
    return f"{RECORDS}/{video_index:09d}.json"


def record_index(name: str) -> int | None:
    """Video index of a records/ entry name, or None for anything else (temp files, strays, group records)."""
    stem, dot, ext = name.partition(".")
    if dot and ext == "json" and len(stem) == 9 and stem.isdigit():
        return int(stem)
    return None


# A packed copy (`copy --videos-per-shard P`) holds P videos per shard and records them one group at a time:
# records/group-{g:09d}.json, written after the group's shards, holds the records of videos g*P .. g*P+P-1.
GROUP_RECORD_PREFIX = "group-"


def group_record_key(group: int) -> str:
    return f"{RECORDS}/{GROUP_RECORD_PREFIX}{group:09d}.json"


def group_record_index(name: str) -> int | None:
    """Group index of a records/ entry name of a packed store's group record, or None."""
    return record_index(name[len(GROUP_RECORD_PREFIX):]) if name.startswith(GROUP_RECORD_PREFIX) else None


def listed_records(names: Iterable[str], num_videos: int, videos_per_shard: int) -> dict[int, str]:
    """The records among records/ entry `names`, ascending: video index -> key, or in a packed store group index ->
    key; anything else (temp files, strays, records past the store's videos) left out."""
    P = videos_per_shard
    index, key = (group_record_index, group_record_key) if P > 1 else (record_index, record_key)
    return {i: key(i) for i in sorted(i for i in map(index, names) if i is not None and i * P < num_videos)}


def videos_per_shard(meta: dict[str, Any], views_per_video: int) -> int | None:
    """P of a sharded data array from its metadata (its shards hold K*P samples), None if that is not a whole
    number of videos."""
    grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape") or [0]
    rows = grid[0]
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < views_per_video or rows % views_per_video:
        return None
    return rows // views_per_video


# Each array's dimension names (zarr v3's dimension_names), which xarray needs to open a store. Within a group an
# axis name means one length: the dense frames (G*T) are not the frames (T).
DIMENSIONS: dict[str, tuple[str, ...]] = {
    FEATURES: ("sample", "layer", "frame", "token", "channel"),
    SCALES: ("sample", "layer", "frame", "token"),
    CLIP: ("sample", "frame", "embedding"),
    FRAMES: ("sample", "dense_frame", "height", "width", "rgb"),
    TEXT: ("class", "embedding"),
    enc.CODES: ("sample", "code"),
    enc.MEAN: ("layer", "channel"),
    enc.COMPONENTS: ("component", "channel"),
    enc.CHANNEL_SCALES: ("component",),
    enc.CHANNEL_GROUPS: ("component",),
    "samples/sparse_indices": ("sample", "frame"),
    "samples/crop": ("sample", "xywh"),
}


def dimension_names(name: str) -> tuple[str, ...]:
    """An array's dimension names: DIMENSIONS, else one per row of the video or sample tables."""
    return DIMENSIONS.get(name) or (("video",) if name.startswith("videos/") else ("sample",))


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    codec: str = "zstd"
    fill_value: Any = 0
    # JPEG frames (frames_codec): each inner chunk one frame encoded at this quality; `codec` does not apply.
    jpeg_quality: int | None = None
    dims: tuple[str, ...] | None = None  # dimension names, where they are not the name's (dimension_names)

    def create_kwargs(self) -> dict[str, Any]:
        if self.jpeg_quality is not None:
            coding = dict(serializer=JpegCodec(quality=self.jpeg_quality), compressors=[Crc32cCodec()])
        else:
            coding = dict(compressors=[*CODECS[self.codec](), Crc32cCodec()])
        return dict(
            name=self.name, shape=self.shape, dtype=self.dtype, chunks=self.chunks, shards=self.shards,
            dimension_names=self.dims or dimension_names(self.name),
            # crc32c last: every chunk (inner chunk of a shard, or table chunk) carries its checksum, and
            # zarr checks it on every read. A shard's index has its own (zarr's default index codecs).
            **coding, fill_value=self.fill_value,
            chunk_key_encoding=CHUNK_KEY_ENCODING,
            # Store every chunk even when it equals the fill value, so "a done video has its shard
            # on disk" holds and a missing chunk always means damage.
            config={"write_empty_chunks": True},
        )


def _rows(n: int) -> int:
    return max(1, min(n, TABLE_ROWS))


def feature_array(schema: StoreSchema) -> str:
    """The array holding a sample's features: `features`, or a projected compact store's flat `codes`."""
    return enc.CODES if projected_components(schema) is not None else FEATURES


def projected_components(schema: StoreSchema) -> list[int] | None:
    """K per stored layer of a fitted projected compact store, else None."""
    section = schema.encoding
    if section is None or section.get("pca") is None or not section.get("fit"):
        return None
    return list(section["fit"]["components"])


def data_arrays(schema: StoreSchema, videos_per_shard: int = 1) -> list[ArraySpec]:
    """Arrays created with the store (written per video, or once at creation)."""
    V, K, T = schema.num_videos, schema.views_per_video, schema.num_frames
    L, N1, C, E = len(schema.layers), schema.tokens, schema.width, schema.embed_dim
    S, codec, P = V * K, schema.codec, K * videos_per_shard
    components = projected_components(schema)
    if components is None:
        # One inner chunk per (sample, layer): reading a layer subset reads only those bytes.
        # One shard per video: its writer owns it and writes it whole (zarr cannot write part of a shard safely).
        features = ArraySpec(FEATURES, (S, L, T, N1, C), DTYPES[schema.dtype], (1, 1, T, N1, C), (P, L, T, N1, C),
                             codec)
    else:
        # A flat row of every layer's (T, N+1, K_l) codes per sample, in chunks of `grain` components of one
        # layer (storage/encoding.py: ragged K without padding, one contiguous read per sample).
        M, grain = T * N1 * sum(components), math.gcd(*components)
        features = ArraySpec(enc.CODES, (S, M), DTYPES[schema.dtype], (1, T * N1 * grain), (P, M), codec)
    specs = [
        features,
        ArraySpec(CLIP, (S, T, E), "float16", (1, T, E), (P, T, E), codec),
        ArraySpec(TEXT, (schema.num_classes, E), "float32", (schema.num_classes, E)),
        ArraySpec(VIDEO_PATH, (V,), str, (_rows(V),), None, "zstd", ""),
        ArraySpec(VIDEO_LABEL, (V,), "int32", (_rows(V),)),
    ]
    if schema.dtype == "int8" and schema.encoding is not None:
        # A compact store's token scales: one per channel group (storage/quantize.py, quantize_scaled).
        G = GROUPS
        specs.insert(1, ArraySpec(SCALES, (S, L, T, N1, G), "float16", (1, 1, T, N1, G), (P, L, T, N1, G), codec,
                                  dims=(*DIMENSIONS[SCALES], "group")))
    elif schema.dtype == "int8":
        specs.insert(1, ArraySpec(SCALES, (S, L, T, N1), "float16", (1, 1, T, N1), (P, L, T, N1), codec))
    if schema.dense_gamma is not None:
        R, GT = schema.image_size, schema.dense_gamma * T
        frames_format, quality = schema.frames_format or (RAW, None)
        if frames_format == JPEG:
            # One frame per inner chunk (a JPEG each): a gamma that divides G decodes only its own frames.
            specs.append(ArraySpec(FRAMES, (S, GT, R, R, 3), "uint8", (1, 1, R, R, 3), (P, GT, R, R, 3), codec,
                                   jpeg_quality=quality))
        else:
            specs.append(ArraySpec(FRAMES, (S, GT, R, R, 3), "uint8", (1, GT, R, R, 3), (P, GT, R, R, 3), codec))
    return specs + encoding_arrays(schema)


def encoding_arrays(schema: StoreSchema) -> list[ArraySpec]:
    """A compact store's fitted parameters (float32, one chunk each, written at creation)."""
    if schema.encoding is None or not schema.encoding.get("fit"):
        return []
    L, C = len(schema.layers), schema.width
    components = projected_components(schema)
    dims = components if components is not None else [C] * L
    specs = []
    if components is not None:
        specs += [ArraySpec(enc.MEAN, (L, C), "float32", (L, C)),
                  ArraySpec(enc.COMPONENTS, (sum(dims), C), "float32", (sum(dims), C))]
    if schema.encoding.get("quantization") is not None:
        specs.append(ArraySpec(enc.CHANNEL_SCALES, (sum(dims),), "float32", (sum(dims),)))
        specs.append(ArraySpec(enc.CHANNEL_GROUPS, (sum(dims),), "uint8", (sum(dims),)))
    return specs


def sharded_arrays(schema: StoreSchema, videos_per_shard: int = 1) -> list[ArraySpec]:
    """The per-video data arrays, in the order a video's shards are written (its record comes after)."""
    return [s for s in data_arrays(schema, videos_per_shard) if s.shards is not None]


# Arrays finalize gathers from the records: name -> (dtype, per-row shape, fill).
SAMPLE_TABLES: dict[str, tuple[Any, tuple[int | str, ...], Any]] = {
    "samples/status": ("uint8", (), 0),
    "samples/label": ("int32", (), -1),
    "samples/sparse_indices": ("int32", ("T",), -1),
    "samples/window": ("float32", (), float("nan")),
    "samples/crop": ("int32", (4,), -1),
    "samples/flip": ("bool", (), False),
    "samples/grayscale": ("bool", (), False),
}
VIDEO_TABLES: dict[str, tuple[Any, tuple[int | str, ...], Any]] = {
    "videos/status": ("uint8", (), 0),
    "videos/error": (str, (), ""),
    "videos/num_frames": ("int32", (), -1),
    "videos/fps": ("float64", (), float("nan")),
    "videos/width": ("int32", (), -1),
    "videos/height": ("int32", (), -1),
    # The file's identity, for moved or re-downloaded copies: size always, sha256 with extract --hash-videos.
    "videos/size_bytes": ("int64", (), -1),
    "videos/sha256": (str, (), ""),
    # What the decoder reported about the video: the display transform it applied to show the frames upright
    # ("none", or FFmpeg's filters: dist_cache.display.TRANSFORMS) and whether the frame rate varies (0 or 1).
    # "" and -1: unknown (decord does not report the transform; a video extracted before these were recorded).
    "videos/transform": (str, (), ""),
    "videos/vfr": ("int8", (), -1),
}
# Tables a format-1 store may lack: videos/size_bytes and videos/sha256 joined format 1 late, and
# samples/label is new in format 2. Readers treat a missing one as all fill ("unknown").
OPTIONAL_TABLES = frozenset({"videos/size_bytes", "videos/sha256", "samples/label"})
# Tables a store of any format may lack: finalized before they existed. Also read as all fill.
LATER_TABLES = frozenset({"videos/transform", "videos/vfr"})


def table_arrays(schema: StoreSchema) -> list[ArraySpec]:
    V, K, T = schema.num_videos, schema.views_per_video, schema.num_frames
    specs = []
    for tables, rows in ((SAMPLE_TABLES, V * K), (VIDEO_TABLES, V)):
        for name, (dtype, row_shape, fill) in tables.items():
            row = tuple(T if d == "T" else int(d) for d in row_shape)
            specs.append(ArraySpec(name, (rows, *row), dtype, (_rows(rows), *row), None, "zstd", fill))
    return specs


def metadata_document(spec: ArraySpec) -> bytes:
    """The array's zarr.json exactly as zarr writes it on creation (what `extract --repair` restores)."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    store = MemoryStore()
    zarr.create_array(store, **spec.create_kwargs())
    return sync(store.get(f"{spec.name}/zarr.json", default_buffer_prototype())).to_bytes()


# Metadata that says nothing about the bytes: arrays written before dimension names were recorded still match.
_DESCRIPTIVE = ("attributes", "dimension_names")


def matches(found: dict[str, Any], spec: ArraySpec) -> bool:
    """Whether stored array metadata is exactly what `spec` creates (attributes and dimension names aside)."""
    def essential(meta: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in meta.items() if k not in _DESCRIPTIVE}

    created = zarr.create_array(MemoryStore(), **spec.create_kwargs())
    return essential(found) == essential(created.metadata.to_dict())


def create_or_open(store: Store, spec: ArraySpec) -> zarr.Array:
    """Create the array, or open it if a (concurrent or earlier) writer already made the same one.

    Never overwrites: `overwrite=True` deletes the array's prefix, which would drop shards another
    writer just committed. A same-named array with other metadata is a layout conflict -> ValueError.
    """
    try:
        return zarr.create_array(store, overwrite=False, **spec.create_kwargs())
    except (ContainsArrayError, ContainsGroupError, FileExistsError):
        pass
    existing = open_array(store, spec.name, mode="r+")
    if not matches(existing.metadata.to_dict(), spec):
        raise ValueError(f"array {spec.name} exists with a different layout")
    return existing


def open_array(store: Store, name: str, mode: str = "r") -> zarr.Array:
    arr = zarr.open_array(store, path=name, mode=mode, zarr_format=3)
    # write_empty_chunks is a runtime setting, not stored metadata: reapply it on every open for writing.
    return arr.with_config({"write_empty_chunks": True}) if mode != "r" else arr
