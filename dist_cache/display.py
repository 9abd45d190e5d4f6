"""Showing a video upright: a container's display matrix, the transform FFmpeg's players apply for it, and that
transform applied to decoded RGB frames.

Phones record in the sensor's orientation and store a display matrix (MP4/MOV `tkhd`; Matroska's projection
pose) saying how to turn the picture. `ffmpeg` and `ffplay` insert a filter for it (fftools' autorotate):
`transform` makes the same choice from the same matrix, so frames come out as those tools show them, and
`apply` does it with exact pixel moves (a rotation by a multiple of 90 degrees or a mirror moves pixels and
changes none). decord 0.6 rotates by 90, 180 and 270 degrees the same way for MP4/MOV, from its FFmpeg 4's
`rotate` tag (the rotation part of the matrix); it ignores a matrix's mirroring (a mirrored video comes out
rotated or as stored) and Matroska's matrices, which its FFmpeg does not read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# What `transform` returns, as the filters FFmpeg's tools insert ("" for none).
TRANSFORMS = ("", "transpose=clock", "transpose=cclock", "transpose=clock_flip", "transpose=cclock_flip",
              "hflip", "vflip", "hflip,vflip")


def _c_round(x: float) -> float:
    """C's round(): halves away from zero (Python's round() takes them to even); NaN stays NaN."""
    return x if math.isnan(x) else math.copysign(math.floor(abs(x) + 0.5), x)


def matrix_rotation(matrix: Sequence[int]) -> float:
    """libavutil's av_display_rotation_get: the angle in degrees (counter-clockwise, in [-180, 180]) by which the
    matrix rotates the frame; NaN for a singular matrix. `matrix` is the 9 int32 of AV_PKT_DATA_DISPLAYMATRIX."""
    m = [v / 65536.0 for v in matrix[:6]]  # 16.16 fixed point
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0.0 or scale1 == 0.0:
        return math.nan
    return -math.degrees(math.atan2(m[1] / scale1, m[0] / scale0))


def clockwise_degrees(matrix: Sequence[int]) -> float:
    """fftools' get_rotation: the clockwise angle to turn the frame by, rounded to a degree, in [0, 360)."""
    theta = -_c_round(matrix_rotation(matrix))
    return theta if math.isnan(theta) else theta - 360 * math.floor(theta / 360 + 0.9 / 360)


def transform(matrix: Sequence[int] | None) -> str:
    """The filters `ffmpeg`/`ffplay` insert to show a frame carrying `matrix` upright (fftools' autorotate, whose
    choices this copies one for one); "" for none. An angle more than a degree from a multiple of 90, which those
    tools turn with the `rotate` filter (black corners) and warn that they do not expect, is left as decoded,
    as decord leaves it."""
    if matrix is None:
        return ""
    theta = clockwise_degrees(matrix)
    if abs(theta - 90) < 1.0:
        return "transpose=cclock_flip" if matrix[3] > 0 else "transpose=clock"
    if abs(theta - 180) < 1.0:
        return ",".join(name for name, flipped in (("hflip", matrix[0] < 0), ("vflip", matrix[4] < 0)) if flipped)
    if abs(theta - 270) < 1.0:
        return "transpose=clock_flip" if matrix[3] < 0 else "transpose=cclock"
    if abs(theta) < 1.0 or math.isnan(theta):
        return "vflip" if matrix[4] < 0 else ""
    return ""


def apply(frame: np.ndarray, how: str) -> np.ndarray:
    """`frame` (H, W, C) transformed as FFmpeg's filter chain `how` would (see TRANSFORMS), C-contiguous."""
    if not how:
        return frame
    if how == "transpose=clock":  # 90 degrees clockwise
        out = np.rot90(frame, -1)
    elif how == "transpose=cclock":  # 90 degrees counter-clockwise
        out = np.rot90(frame, 1)
    elif how == "transpose=clock_flip":  # clockwise, then upside down: the anti-diagonal mirror
        out = np.rot90(frame, -1)[::-1]
    elif how == "transpose=cclock_flip":  # counter-clockwise, then upside down: the main-diagonal mirror
        out = frame.transpose(1, 0, *range(2, frame.ndim))
    elif how == "hflip":
        out = frame[:, ::-1]
    elif how == "vflip":
        out = frame[::-1]
    elif how == "hflip,vflip":  # 180 degrees
        out = frame[::-1, ::-1]
    else:
        raise ValueError(f"unknown display transform {how!r}: one of {TRANSFORMS}")
    return np.ascontiguousarray(out)
