"""Dense frames as JPEG: what the schema says about them, how one frame is encoded and decoded, and the zarr v3
codec that lets zarr and xarray read them like raw frames.

A store's `dense_frames` section is `{"gamma": G}` (raw uint8 frames, the format every store had before) or
`{"gamma": G, "format": "jpeg", "quality": Q}`. A JPEG store keeps the frames array's shape and meaning,
(S, G*T, R, R, 3) uint8, with one frame per inner chunk: each chunk is a baseline JPEG (4:2:0 chroma, libjpeg's
standard tables scaled to Q, the IJG quality) followed by its crc32c, inside the same per-video shards as every
other array. Raw frames of a ViT-B/16 view at gamma 2 are 2.41 MB; JPEG at Q = 90 is several times smaller
(benchmarks/RESULTS.md, "data_loader", has the measured bytes per clip).

Encoding and decoding use Pillow (libjpeg-turbo), which releases the GIL for both, so the store's writer threads
encode and the loader's reader threads decode in parallel. torchvision's CPU JPEG functions produce the same bytes
and pixels, but torchvision 0.29 deprecates them; its nvjpeg decoder is still the way to decode on a GPU
(`decode_on_device`), where the compressed bytes travel to the device instead of 10x as many pixels.
torch and torchvision are imported only there: the store itself does not need them.

The zarr codec `dist_cache.jpeg` (configuration `{"quality": Q}`) is registered with zarr when this module is
imported (storage imports it) and, for zarr or xarray alone, through the `zarr.codecs` entry point dist-cache
installs (pyproject.toml).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.common import parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    import torch
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer, NDBuffer

RAW, JPEG = "raw", "jpeg"
FORMATS = (RAW, JPEG)
DEFAULT_QUALITY = 90
CODEC_NAME = "dist_cache.jpeg"
# libjpeg's 2x2 chroma subsampling (Pillow's code 2): what every JPEG decoder, nvjpeg's hardware path included,
# handles fastest; the temporal encoder sees motion, which lives in luma.
_SUBSAMPLING_420 = 2
# A copy of a copy at another quality adds one to `encoded_before`; a bound keeps the schema small.
MAX_ENCODINGS = 16


def section(gamma: int, frames_format: str = RAW, quality: int | None = None,
            encoded_before: Sequence[int] = ()) -> dict[str, Any]:
    """The schema's `dense_frames` section. Raw frames are `{"gamma": G}` exactly, as every store before JPEG
    frames had, so such stores resume and keep their fingerprint. `encoded_before`: the qualities JPEG frames were
    encoded at before this store's (a copy at another quality decodes and encodes again), oldest first; only
    present when there are some, so the stores extract writes keep their section."""
    if frames_format == RAW:
        return {"gamma": gamma}
    out = {"gamma": gamma, "format": JPEG, "quality": DEFAULT_QUALITY if quality is None else quality}
    if encoded_before:
        out["encoded_before"] = [int(q) for q in encoded_before]
    return out


def section_problem(dense: Any) -> str | None:
    """Why `dense` is not a valid `dense_frames` section (None: it is). The gamma's bound is the schema's."""
    shape = 'null, {"gamma": G} or {"gamma": G, "format": "jpeg", "quality": Q[, "encoded_before": [Q, ...]]}'
    if not isinstance(dense, dict) or "gamma" not in dense:
        return f"dense_frames must be {shape}"
    if set(dense) == {"gamma"}:
        return None
    if set(dense) - {"encoded_before"} != {"gamma", "format", "quality"} or dense["format"] != JPEG:
        return f"dense_frames must be {shape}"
    before = dense.get("encoded_before", [])
    if not isinstance(before, list) or "encoded_before" in dense and not 1 <= len(before) <= MAX_ENCODINGS:
        return f"dense_frames.encoded_before must be a list of 1 to {MAX_ENCODINGS} qualities"
    for quality in [dense["quality"], *before]:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            return f"dense_frames.quality must be an int in [1, 100], got {quality!r}"
    return None


def format_of(dense: dict[str, Any] | None) -> tuple[str, int | None] | None:
    """(format, quality) of a valid `dense_frames` section: ("raw", None) or ("jpeg", Q); None without frames."""
    if dense is None:
        return None
    return (JPEG, int(dense["quality"])) if dense.get("format") == JPEG else (RAW, None)


def encodings(dense: dict[str, Any] | None) -> tuple[int, ...]:
    """The qualities a valid `dense_frames` section's JPEG frames were encoded at, oldest first, the stored one
    last; () for raw frames or none."""
    if dense is None or dense.get("format") != JPEG:
        return ()
    return (*map(int, dense.get("encoded_before", ())), int(dense["quality"]))


# ---------------------------------------------------------------- one frame
def encode(frame: np.ndarray, quality: int) -> bytes:
    """A (R, R, 3) uint8 frame as baseline JPEG bytes. Deterministic: the same pixels and quality give the same
    bytes (libjpeg-turbo's integer DCT), which `verify` relies on."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(frame), "RGB").save(
        buffer, format="JPEG", quality=quality, subsampling=_SUBSAMPLING_420, optimize=False, progressive=False)
    return buffer.getvalue()


def decode_into(data: Any, out: np.ndarray) -> None:
    """Decode JPEG bytes (any buffer) into `out`, a writable (R, R, 3) uint8 array. ValueError if they are not an
    R x R RGB JPEG that decodes whole: checked from the header before any pixel is allocated."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            if image.mode != "RGB" or image.size != (out.shape[1], out.shape[0]):
                raise ValueError(f"a {image.mode} {image.size[0]}x{image.size[1]} JPEG, not RGB "
                                 f"{out.shape[1]}x{out.shape[0]}")
            image.load()  # the decode itself, without the GIL
            out[...] = np.asarray(image)
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:  # Pillow's ways of saying "not this JPEG"
        raise ValueError(f"not a JPEG that decodes ({err})") from None


class JpegChunks:
    """The shard encoder's per-chunk codec for JPEG frames (storage.shards.ShardFormat): each inner chunk is one
    frame, given and returned as the raw frame's 1-D uint8 bytes."""

    def __init__(self, quality: int, frame_shape: tuple[int, ...]) -> None:
        self.quality, self.frame_shape = quality, frame_shape

    def encode(self, raw: np.ndarray) -> bytes:
        return encode(raw.reshape(self.frame_shape), self.quality)

    def decode(self, data: Any, out: np.ndarray) -> None:
        decode_into(data, out.reshape(self.frame_shape))


@dataclasses.dataclass(frozen=True)
class StoredJpegs:
    """A video's frames exactly as a JPEG store holds them, per view its G*T JPEGs in order: what a copy between
    stores of the same quality passes through, so the frames are never decoded and encoded again (each round
    would lose a little more)."""

    quality: int
    views: Sequence[Sequence[np.ndarray]]


# ---------------------------------------------------------------- on a GPU
def device_decode_problem(device: torch.device) -> str | None:
    """Why JPEG frames cannot be decoded on `device` (None: they can): torchvision's nvjpeg decoder must import and
    decode a frame there. Tried once, before training relies on it."""
    import torch

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError as err:
        return f"torchvision's JPEG decoder does not import ({err})"
    probe = torch.frombuffer(bytearray(encode(np.zeros((16, 16, 3), np.uint8), DEFAULT_QUALITY)), dtype=torch.uint8)
    try:
        decode_jpeg([probe], mode=ImageReadMode.RGB, device=device)
    except (RuntimeError, ValueError) as err:  # e.g. a torchvision built without nvjpeg
        return f"torchvision cannot decode JPEG on {device} ({str(err).splitlines()[0]})"
    return None


def decode_on_device(payloads: Sequence[np.ndarray], device: torch.device, frame_shape: tuple[int, ...]
                     ) -> torch.Tensor:
    """(n, R, R, 3) uint8 on `device` from n JPEGs (1-D uint8 host arrays, kept alive by the caller until the
    device's current stream has passed this point): one batched nvjpeg call. The result is a channels-last view
    of the decoded (n, 3, R, R), which is the layout normalisation wants next (`normalize_frames`).

    torchvision decodes on its own stream and makes the current stream wait for it, so the frames are ready for
    whatever the current stream runs next; the call itself returns once the decode is queued."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    decoded = decode_jpeg([torch.from_numpy(p) for p in payloads], mode=ImageReadMode.RGB, device=device)
    R, W, C = frame_shape
    wrong = next((tuple(t.shape) for t in decoded if tuple(t.shape) != (C, R, W)), None)
    if wrong is not None:  # checksummed bytes of another shape: not a store this dist-cache wrote
        raise ValueError(f"a stored JPEG frame decodes to {wrong}, not {(C, R, W)}")
    return torch.stack(decoded).permute(0, 2, 3, 1)


# ---------------------------------------------------------------- zarr
@dataclasses.dataclass(frozen=True)
class JpegCodec(ArrayBytesCodec):
    """zarr v3 array-to-bytes codec `dist_cache.jpeg`: each chunk of shape (1, ..., 1, H, W, 3) uint8 is one JPEG.
    The store's own reader and writer do not go through it (storage.shards encodes the same bytes); it is how
    zarr creates the frames array's metadata and how zarr and xarray users read (or write) JPEG frames."""

    is_fixed_size = False
    quality: int = DEFAULT_QUALITY

    def __init__(self, *, quality: int = DEFAULT_QUALITY) -> None:
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"{CODEC_NAME}: quality must be an int in [1, 100], got {quality!r}")
        object.__setattr__(self, "quality", quality)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        _, configuration = parse_named_configuration(data, CODEC_NAME, require_configuration=True)
        return cls(**configuration)

    def to_dict(self) -> dict[str, Any]:
        return {"name": CODEC_NAME, "configuration": {"quality": self.quality}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        chunk = tuple(getattr(chunk_grid, "chunk_shape", ()))
        if str(dtype.to_native_dtype()) != "uint8" or len(chunk) < 3 or chunk[-1] != 3 \
                or any(c != 1 for c in chunk[:-3]):
            raise ValueError(f"{CODEC_NAME} encodes uint8 chunks of one (H, W, 3) frame each, not {chunk} "
                             f"{dtype}")

    def compute_encoded_size(self, input_byte_length: int, chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # JPEG's size depends on the pixels

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        frame = np.empty(chunk_spec.shape[-3:], np.uint8)
        decode_into(chunk_bytes.as_numpy_array(), frame)
        return chunk_spec.prototype.nd_buffer.from_numpy_array(frame.reshape(chunk_spec.shape))

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        # In a thread, as zarr runs numcodecs' codecs: Pillow releases the GIL, so a shard's frames decode at once.
        return await asyncio.to_thread(self._decode_sync, chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        frame = chunk_array.as_numpy_array().reshape(chunk_spec.shape[-3:])
        return chunk_spec.prototype.buffer.from_bytes(encode(frame, self.quality))

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return await asyncio.to_thread(self._encode_sync, chunk_array, chunk_spec)


register_codec(CODEC_NAME, JpegCodec)
