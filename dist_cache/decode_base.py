"""What every video decoder shares: the facts a probe returns, the interface, and the frame-index rule.

Apart from decoders.py so that the backends (decode_decord.py, decode_pyav.py) can import it while decoders.py
imports them by name: with these in decoders.py, decoders and its backends would import each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np


@dataclass
class VideoFacts:
    num_frames: int
    fps: float
    width: int
    height: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> VideoFacts:
        return cls(int(d["num_frames"]), float(d["fps"]), int(d["width"]), int(d["height"]))


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
