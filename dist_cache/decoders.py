"""Video decoders behind one small interface, chosen by name and recorded in every store.

Two backends read the same frames:
- "pyav" (FFmpeg through PyAV; extraction's default): installs everywhere, at decord's CPU cost per video;
- "decord": wheels for x86-64 Linux and Windows only, FFmpeg 4 (no AV1, some display matrices ignored), no release
  since 2021.
Both number frames alike: frame i is the i-th frame in presentation order, the i-th a decode from the start
yields. Frame counts are what really decodes, not what the container claims (a truncated file claims more).
Every failure of one video is a `DecodeError` whose one-line message starts with the video's path; a caller
records it for that video and moves on.
"""

from __future__ import annotations

import numpy as np

from dist_cache.decode_base import Decoder, VideoFacts, distinct_frames
from dist_cache.errors import DecodeError, UserError, first_line

# DecodeError is defined in errors.py (see there why), the shared types in decode_base.py (see there why); all are
# exported here with the decoders that use them.
__all__ = ["DECODERS", "DecodeError", "Decoder", "VideoFacts", "disagreement", "distinct_frames", "get_decoder"]

DECODERS = ("decord", "pyav")

# How far the two decoders' RGB may differ. Measured (tests/test_real_videos.py; decord 0.6 with its FFmpeg 4,
# PyAV 18 with FFmpeg 8): identical bytes on every even-size clip and on 4:4:4 ones of any size (H.264, HEVC, VP9,
# MPEG-4, BT.709 and full-range tags). On odd-size 4:2:0 frames swscale cannot use its exact YUV->RGB converter and
# interpolates the half-size chroma planes, which FFmpeg 4 and 8 do differently: the colour differs at sharp
# colour edges (up to 29 levels; mean 0.4-1.0 over a frame), while the luma the RGB carries stays within 3
# levels. So: luma (ITU-R 601 weights) within LUMA_TOLERANCE at every pixel, and the mean |RGB difference| within
# MEAN_TOLERANCE. A wrong frame, orientation, colour range or matrix breaks the first.
LUMA_TOLERANCE = 4.0
MEAN_TOLERANCE = 3.0
_LUMA = np.array([0.299, 0.587, 0.114])


def disagreement(a: np.ndarray, b: np.ndarray) -> str | None:
    """Why two decodes of the same frames (uint8 (..., H, W, 3)) are not the same pictures within the decoders'
    tolerance, or None when they are."""
    if a.shape != b.shape:
        return f"frames of {a.shape[-2]}x{a.shape[-3]} against {b.shape[-2]}x{b.shape[-3]}"
    a, b = a.astype(np.float32), b.astype(np.float32)
    luma = float(np.abs((a - b) @ _LUMA).max()) if a.size else 0.0
    mean = float(np.abs(a - b).mean()) if a.size else 0.0
    if luma > LUMA_TOLERANCE or mean > MEAN_TOLERANCE:
        return (f"luma differs by up to {luma:.1f} levels and RGB by {mean:.2f} on average (tolerance "
                f"{LUMA_TOLERANCE:g} and {MEAN_TOLERANCE:g})")
    return None


def get_decoder(name: str = "decord") -> Decoder:
    """The backend called `name`; a UserError when it is unknown or cannot be imported on this machine."""
    if name == "decord":
        try:
            from dist_cache.decode_decord import DecordDecoder
        except ImportError as exc:
            raise UserError(
                f"the decord decoder cannot be used here ({first_line(exc)}); decord has wheels for x86-64 Linux "
                "and Windows only: choose the pyav decoder"
            ) from None
        return DecordDecoder()
    if name == "pyav":
        from dist_cache.decode_pyav import PyAVDecoder

        return PyAVDecoder()
    raise UserError(f"unknown decoder {name!r}: choose one of {', '.join(DECODERS)}")
