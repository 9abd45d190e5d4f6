"""Array names, shapes, chunking and codecs of format_version 1 (the table in storage/README.md).

Everything here is a pure function of the schema, so every writer (and every concurrent finalizer)
creates byte-identical metadata, and creating an array that already exists can be checked for equality.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import zarr
from zarr.abc.store import Store
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.errors import ContainsArrayError, ContainsGroupError
from zarr.storage import MemoryStore

# Feature dtypes by schema name. int8 stores per-token absmax scales beside the codes.
DTYPES: dict[str, str] = {"fp16": "float16", "int8": "int8"}

# Compressors by schema name. fp16 activations compress < 10 % losslessly (measurements.md section 4),
# so "none" is the default and the fastest to read; the others exist for int8 codes and for users
# who pay for bytes more than for CPU.
CODECS: dict[str, Callable[[], Any]] = {
    "none": lambda: None,
    "zstd": lambda: ZstdCodec(level=3),
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
}

FEATURES = "features"
SCALES = "feature_scales"
CLIP = "clip_embeddings"
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
    """Video index of a records/ entry name, or None for anything else (temp files, strays)."""
    stem, dot, ext = name.partition(".")
    if dot and ext == "json" and len(stem) == 9 and stem.isdigit():
        return int(stem)
    return None


@dataclass(frozen=True)
class ArraySpec:
    name: str
    shape: tuple[int, ...]
    dtype: Any
    chunks: tuple[int, ...]
    shards: tuple[int, ...] | None = None
    codec: str = "zstd"
    fill_value: Any = 0

    def create_kwargs(self) -> dict[str, Any]:
        return dict(
            name=self.name, shape=self.shape, dtype=self.dtype, chunks=self.chunks, shards=self.shards,
            compressors=CODECS[self.codec](), fill_value=self.fill_value,
            chunk_key_encoding=CHUNK_KEY_ENCODING,
            # Store every chunk even when it equals the fill value, so "a done video has its shard
            # on disk" holds and a verify pass can count files.
            config={"write_empty_chunks": True},
        )


def _rows(n: int) -> int:
    return max(1, min(n, TABLE_ROWS))


def data_arrays(schema: dict[str, Any]) -> list[ArraySpec]:
    """Arrays created with the store (written per video, or once at creation)."""
    V, K, T = schema["num_videos"], schema["views_per_video"], schema["num_frames"]
    L, N1, C = len(schema["layers"]), schema["tokens"], schema["width"]
    E = schema["backbone"]["embed_dim"]
    S, codec = V * K, schema["codec"]
    specs = [
        # One inner chunk per (sample, layer): reading a layer subset reads only those bytes.
        # One shard per video: its writer owns it and writes it whole (zarr cannot write part of a shard safely).
        ArraySpec(FEATURES, (S, L, T, N1, C), DTYPES[schema["dtype"]], (1, 1, T, N1, C), (K, L, T, N1, C), codec),
        ArraySpec(CLIP, (S, T, E), "float16", (K, T, E), None, codec),
        ArraySpec(TEXT, (len(schema["class_names"]), E), "float32", (len(schema["class_names"]), E)),
        ArraySpec(VIDEO_PATH, (V,), str, (_rows(V),), None, "zstd", ""),
        ArraySpec(VIDEO_LABEL, (V,), "int32", (_rows(V),)),
    ]
    if schema["dtype"] == "int8":
        specs.insert(1, ArraySpec(SCALES, (S, L, T, N1), "float16", (1, 1, T, N1), (K, L, T, N1), codec))
    return specs


# Arrays finalize gathers from the records: name -> (dtype, per-row shape, fill).
SAMPLE_TABLES: dict[str, tuple[Any, tuple[int, ...], Any]] = {
    "samples/status": ("uint8", (), 0),
    "samples/sparse_indices": ("int32", ("T",), -1),
    "samples/window": ("float32", (), float("nan")),
    "samples/crop": ("int32", (4,), -1),
    "samples/flip": ("bool", (), False),
    "samples/grayscale": ("bool", (), False),
}
VIDEO_TABLES: dict[str, tuple[Any, tuple[int, ...], Any]] = {
    "videos/status": ("uint8", (), 0),
    "videos/error": (str, (), ""),
    "videos/num_frames": ("int32", (), -1),
    "videos/fps": ("float64", (), float("nan")),
    "videos/width": ("int32", (), -1),
    "videos/height": ("int32", (), -1),
    # The file's identity, for moved or re-downloaded copies: size always, sha256 with extract --hash-videos.
    "videos/size_bytes": ("int64", (), -1),
    "videos/sha256": (str, (), ""),
}
# Tables added after format_version 1 was first released: finalize always writes them, but a store
# finalized by an older dist-cache lacks them, so readers treat a missing one as all-fill ("unknown").
OPTIONAL_TABLES = frozenset({"videos/size_bytes", "videos/sha256"})


def table_arrays(schema: dict[str, Any]) -> list[ArraySpec]:
    V, K, T = schema["num_videos"], schema["views_per_video"], schema["num_frames"]
    specs = []
    for tables, rows in ((SAMPLE_TABLES, V * K), (VIDEO_TABLES, V)):
        for name, (dtype, row_shape, fill) in tables.items():
            row = tuple(T if d == "T" else d for d in row_shape)
            specs.append(ArraySpec(name, (rows, *row), dtype, (_rows(rows), *row), None, "zstd", fill))
    return specs


def _expected_metadata(spec: ArraySpec) -> dict[str, Any]:
    return zarr.create_array(MemoryStore(), **spec.create_kwargs()).metadata.to_dict()


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
    found, wanted = existing.metadata.to_dict(), _expected_metadata(spec)
    found.pop("attributes", None)
    wanted.pop("attributes", None)
    if found != wanted:
        raise ValueError(f"array {spec.name} exists with a different layout")
    return existing


def open_array(store: Store, name: str, mode: str = "r") -> zarr.Array:
    arr = zarr.open_array(store, path=name, mode=mode, zarr_format=3)
    # write_empty_chunks is a runtime setting, not stored metadata: reapply it on every open for writing.
    return arr.with_config({"write_empty_chunks": True}) if mode != "r" else arr
