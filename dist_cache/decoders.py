"""Video decoders behind one small interface, chosen by name and recorded in every store.

Two backends read the same frames:
- "decord" (the default): fast, but its wheels exist for x86-64 Linux and Windows only, and it is unmaintained;
- "pyav" (FFmpeg through PyAV): installs everywhere PyAV does.
Both number frames alike: frame i is the i-th frame in presentation order, the i-th a decode from the start
yields. Frame counts are what really decodes, not what the container claims (a truncated file claims more).
Every failure of one video is a `DecodeError` whose one-line message starts with the video's path; a caller
records it for that video and moves on.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from dist_cache.errors import DecodeError, UserError, first_line

# DecodeError is defined in errors.py (see there why) and exported here with the decoders that raise it.
__all__ = ["DECODERS", "DecodeError", "Decoder", "VideoFacts", "distinct_frames", "get_decoder"]

DECODERS = ("decord", "pyav")


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




def distinct_frames(indices: Iterable[int], num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(ascending distinct indices clamped to [0, num_frames), positions that gather them back into the
    order asked): each frame is decoded once, in file order, so seeks only go forward."""
    wanted = np.clip(np.asarray(list(indices), dtype=np.int64), 0, num_frames - 1)
    unique, inverse = np.unique(wanted, return_inverse=True)
    return unique, inverse.reshape(-1)
