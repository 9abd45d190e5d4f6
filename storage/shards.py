"""The bytes of one shard, encoded and checked here instead of by zarr's per-chunk codec pipeline.

The format is zarr v3's sharding codec exactly as storage/layout.py declares it, so zarr (and xarray)
read these shards like their own:

    [chunk 0][crc32c 0][chunk 1][crc32c 1] ... [index: (offset, nbytes) uint64 LE per chunk][crc32c of index]

Each inner chunk is its raw C-order little-endian bytes (compressed with the array's codec, if any)
followed by the crc32c of those bytes; `nbytes` includes the 4 checksum bytes; the index lists the
chunks in C order of the shard's chunk grid, a missing chunk as (2**64-1, 2**64-1). zarr itself writes
chunks in Morton order; this writer writes them in C order, i.e. sample-major and layer-minor, so one
sample's layers are one contiguous byte range that a reader fetches in ONE ranged read. zarr reads
either order through the index.

Writing it ourselves is what lets the writer keep up with the disk: zarr encodes chunk by chunk through
asyncio and copies every chunk twice, where this yields views of the caller's array plus 4-byte checksums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import crc32c as _crc32c
import numpy as np
from numcodecs import Blosc, Zstd

from storage.frames_codec import JpegChunks
from storage.layout import ArraySpec

MISSING = 2**64 - 1
CRC_BYTES = 4
INDEX_ENTRY_BYTES = 16


@dataclass(frozen=True)
class Encoded:
    """An inner chunk already in its stored form (e.g. a JPEG frame copied from another store), written as is."""

    data: Any  # bytes or a 1-D uint8 array


class ShardDamage(Exception):
    """Bytes that fail the shard format (bad checksum, impossible index, missing or short chunk).
    Internal: the reader turns it into a StoreDamagedError that names the store, the video and the fix."""


def crc32c(data: Any) -> bytes:
    """Little-endian crc32c of a bytes-like object or a 1-D uint8 array, as zarr's crc32c codec stores it.

    The `crc32c` package (hardware CRC32C, ~20 GB/s, releases the GIL) rather than zarr's google-crc32c,
    whose wheel computes it in software at ~4 GB/s: slower than the disk (storage/README.md, "Writing")."""
    return _crc32c.crc32c(data).to_bytes(CRC_BYTES, "little")


def _compressor(codec: str, itemsize: int) -> Any:
    """The numcodecs object that produces the same bytes as layout.CODECS[codec] in zarr (see tests)."""
    if codec == "none":
        return None
    if codec == "zstd":
        return Zstd(level=3, checksum=False)
    if codec == "blosc-zstd":
        return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE, blocksize=0, typesize=itemsize)
    if codec == "blosc-lz4":
        return Blosc(cname="lz4", clevel=5, shuffle=Blosc.SHUFFLE, blocksize=0, typesize=itemsize)
    raise ValueError(f"unknown codec {codec!r}")


@dataclass(frozen=True)
class ShardFormat:
    """How one sharded array's shards are laid out: inner chunk size, chunks per shard, compressor."""

    name: str
    dtype: np.dtype
    chunk_shape: tuple[int, ...]  # one inner chunk, leading sample axis included
    chunks_per_sample: int
    samples_per_shard: int
    codec: str
    jpeg_quality: int | None = None  # JPEG frames: each inner chunk one frame, encoded at this quality

    @classmethod
    def of(cls, spec: ArraySpec) -> ShardFormat:
        assert spec.shards is not None and spec.chunks[0] == 1, spec
        grid = [s // c for s, c in zip(spec.shards, spec.chunks)]
        # Inner chunks span every axis but the sample axis and (features) the layer axis or (JPEG frames) the
        # frame axis, so chunk j of a shard in C order is bytes [j * chunk_nbytes, (j+1) * chunk_nbytes) of the
        # shard's C-order array.
        assert all(g == 1 for g in grid[2:]), spec
        return cls(spec.name, np.dtype(spec.dtype), spec.chunks, math.prod(grid[1:]), grid[0], spec.codec,
                   spec.jpeg_quality)

    def shard_key(self, shard: int) -> str:
        """The store key of shard number `shard` (chunk key encoding "." of layout.CHUNK_KEY_ENCODING)."""
        return f"{self.name}/c.{shard}" + ".0" * (len(self.chunk_shape) - 1)

    @property
    def chunk_nbytes(self) -> int:
        return math.prod(self.chunk_shape) * self.dtype.itemsize

    @property
    def chunks_per_shard(self) -> int:
        return self.samples_per_shard * self.chunks_per_sample

    @property
    def index_nbytes(self) -> int:
        return self.chunks_per_shard * INDEX_ENTRY_BYTES + CRC_BYTES

    @property
    def compressed(self) -> bool:
        """Whether stored chunks differ from the values' bytes (and in size from one another)."""
        return self.codec != "none" or self.jpeg_quality is not None

    def _chunk_codec(self) -> Any:
        """What turns one inner chunk's values into its stored bytes and back (None: they are the same)."""
        if self.jpeg_quality is not None:
            return JpegChunks(self.jpeg_quality, self.chunk_shape[-3:])
        return _compressor(self.codec, self.dtype.itemsize)

    # ---------------------------------------------------------------- writing
    def raw_chunks(self, block: np.ndarray) -> Iterator[np.ndarray]:
        """The inner chunks of a C-contiguous block of whole samples, in C order, as 1-D uint8 views."""
        flat = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        n = self.chunk_nbytes
        for start in range(0, flat.size, n):
            yield flat[start:start + n]

    def encode(self, chunks: Iterable[np.ndarray | Encoded | None], sizes: list[int] | None = None
               ) -> Iterator[Any]:
        """The shard's bytes as a sequence of buffers (views of `chunks` where uncompressed), index last.

        `chunks` are every inner chunk of the shard in C order, each a 1-D uint8 array of chunk_nbytes, an
        `Encoded` chunk (already its stored bytes: copied as is), or None for a chunk the shard does not hold
        (listed as missing: a packed shard's failed videos, or the rows past the array's end in its last shard).
        `sizes`, if given, receives each chunk's stored bytes (0: missing). Lazy: the caller's writer overlaps
        the encoding and checksum of chunk j+1 with the write of chunk j."""
        compressor = self._chunk_codec()
        index = np.full((self.chunks_per_shard, 2), MISSING, dtype="<u8")
        offset = count = 0
        for raw in chunks:
            size = 0  # a missing chunk's
            if raw is not None:
                if isinstance(raw, Encoded):
                    data = np.frombuffer(raw.data, dtype=np.uint8)
                else:
                    data = raw if compressor is None else np.frombuffer(compressor.encode(raw), dtype=np.uint8)
                size = data.size + CRC_BYTES
                index[count] = (offset, size)
                offset += size
                yield data
                yield crc32c(data)
            count += 1
            if sizes is not None:
                sizes.append(size)
        if count != self.chunks_per_shard:
            raise ValueError(f"{self.name}: {count} inner chunks for a shard of {self.chunks_per_shard}")
        body = index.tobytes()
        yield body
        yield crc32c(body)

    # ---------------------------------------------------------------- reading
    def decode_index(self, data: bytes | None) -> np.ndarray:
        """(chunks_per_shard, 2) uint64 (offset, nbytes) from a shard's last index_nbytes bytes."""
        if data is None:
            raise ShardDamage("its shard file is missing")
        if len(data) < self.index_nbytes:
            raise ShardDamage(f"its shard file is {len(data)} bytes, shorter than the shard index")
        body, crc = data[-self.index_nbytes:-CRC_BYTES], data[-CRC_BYTES:]
        if crc32c(body) != crc:
            raise ShardDamage("its shard index fails its crc32c checksum (truncated or overwritten file)")
        index = np.frombuffer(body, dtype="<u8").reshape(self.chunks_per_shard, 2)
        present = index[:, 0] != MISSING
        if self.compressed:
            bad = present & ((index[:, 1] <= CRC_BYTES) | (index[:, 1] > 2 * self.chunk_nbytes + 1024))
        else:
            bad = present & (index[:, 1] != self.chunk_nbytes + CRC_BYTES)
        if bad.any():
            raise ShardDamage(f"its shard index gives chunk {int(np.flatnonzero(bad)[0])} an impossible size")
        return index

    def verify(self, data: np.ndarray, crc: Any, what: str) -> None:
        if crc32c(data) != bytes(crc):
            raise ShardDamage(f"{what} fails its crc32c checksum")

    def decode_payload(self, payload: np.ndarray, out: np.ndarray, what: str) -> None:
        """Write the values of one chunk's stored bytes (checksum already checked and removed) into `out`."""
        compressor = self._chunk_codec()
        if compressor is None:
            out[:] = payload
            return
        try:
            compressor.decode(payload, out=out)
        except Exception as err:  # a checksummed chunk that still fails to decode: not our format
            kind = "decode as a JPEG frame" if self.jpeg_quality is not None else "decompress"
            raise ShardDamage(f"{what} does not {kind} ({type(err).__name__})") from None


def missing_chunks(index: np.ndarray, start: int, stop: int) -> list[int]:
    """Chunk positions in [start, stop) that the index lists as absent."""
    return [int(j) + start for j in np.flatnonzero(index[start:stop, 0] == MISSING)]


def is_contiguous(rows: np.ndarray) -> bool:
    """Whether the chunks of these index rows lie back to back in the file, in order (this writer's layout)."""
    return bool(np.all(rows[1:, 0] == rows[:-1, 0] + rows[:-1, 1]))
