"""What every video decoder shares: the facts a probe returns, the interface, and the frame-index rule.

Apart from decoders.py so that the backends (decode_decord.py, decode_pyav.py) can import it while decoders.py
imports them by name: with these in decoders.py, decoders and its backends would import each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class VideoFacts:
    """What sampling plans from (compared by ==): the decodable frame count, the fps, and the size of the frames
    as decoded, i.e. as displayed (rotated by the container's display matrix). Also, for the record and not
    compared: the display transform applied (`dist_cache.display.TRANSFORMS`; "" for none) and whether the
    frame rate varies (`variable_rate`); None where the decoder cannot tell."""

    num_frames: int
    fps: float
    width: int
    height: int
    transform: str | None = field(default=None, compare=False)
    vfr: bool | None = field(default=None, compare=False)

    def to_dict(self) -> dict:
        """As JSON for a store's record; the facts the decoder could not tell are left out (unknown)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> VideoFacts:
        return cls(int(d["num_frames"]), float(d["fps"]), int(d["width"]), int(d["height"]), d.get("transform"),
                   d.get("vfr"))


# How far, in frame intervals, a frame's presentation time may stray from where a constant rate puts it before
# the video counts as variable-rate: one interval, so timestamp rounding (a 1 ms Matroska time base at 120 fps
# is 8 or 9 ms a frame) and a dropped frame do not count, while a rate that changes for a stretch does.
VFR_DRIFT_FRAMES = 1.0


def variable_rate(times: Sequence[float] | np.ndarray) -> bool:
    """Whether presentation times (ascending, any unit) stray from a constant rate by more than VFR_DRIFT_FRAMES
    frame intervals at some frame: then frame index i, which sampling uses, is not time i / fps."""
    t = np.asarray(times, dtype=np.float64)
    if len(t) < 3 or t[-1] <= t[0]:
        return False
    interval = (t[-1] - t[0]) / (len(t) - 1)
    return bool(np.abs((t - t[0]) / interval - np.arange(len(t))).max() > VFR_DRIFT_FRAMES)


class Decoder(Protocol):
    def probe(self, path: str | os.PathLike) -> VideoFacts:
        """Frame count, fps and size (of frame 0, which must decode); the count is what decodes."""

    def read(self, path: str | os.PathLike, indices: Iterable[int]) -> np.ndarray:
        """uint8 frames (n, H, W, 3) in the order of `indices` (repeats allowed), clamped to the container's
        count: plan indices from `probe`'s count, since a frame past it raises DecodeError."""

    def probe_and_read(
        self, path: str | os.PathLike, frames_for: Callable[[VideoFacts], Sequence[int]]
    ) -> tuple[VideoFacts, np.ndarray]:
        """`probe(path)` and `read(path, frames_for(facts))` in one decoding pass where the file is whole.

        Probing decodes the end of the video, and a plan's frames span most of it (a 10 s clip is often one
        keyframe interval): decoding both together halves the work. Only a damaged file costs more.
        """

    def info(self) -> dict[str, str]:
        """{"name", "version"}: recorded in a store, since frame counts and pixels may drift between builds."""


def distinct_frames(indices: Iterable[int], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(ascending distinct indices clamped to [0, num_frames), positions that gather them back into the
    order asked): each frame is decoded once, in file order, so seeks only go forward."""
    wanted = np.clip(np.asarray(list(indices), dtype=np.int64), 0, num_frames - 1)
    unique, inverse = np.unique(wanted, return_inverse=True)
    return unique, inverse.reshape(-1)
