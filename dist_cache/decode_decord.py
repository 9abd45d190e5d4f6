"""The decord backend (see `dist_cache.decoders`).

decord indexes a file's packets when it opens it, numbers frames in presentation order and seeks to the
keyframe before each wanted frame. It turns MP4/MOV frames upright by their display matrix's rotation, but
ignores its mirroring and Matroska's matrices (`dist_cache.display`), and does not say what it applied: its facts'
`transform` is None (unknown). It can hang in native code on corrupt files while holding the GIL
(dmlc/decord #373): run it in `dist_cache.decode_pool.DecodePool` wherever a hang must cost one video only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence

import decord
import numpy as np

from dist_cache.decode_base import VideoFacts, distinct_frames, variable_rate
from dist_cache.errors import DecodeError, first_line


def _reason(exc: Exception) -> str:
    """The useful part of a decord error: its first line, without the native timestamp and source location."""
    return re.sub(r"^(\[[\d:]+\] \S+:\d+: )+", "", first_line(exc, limit=1000))


def _open(path: str | os.PathLike) -> decord.VideoReader:
    if not os.path.isfile(path):
        raise DecodeError(f"{path}: file not found")
    try:
        # One thread: decoding runs in many worker processes side by side.
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    except Exception as exc:  # decord raises its own DECORDError (a bare Exception) for every failure
        raise DecodeError(f"{path}: cannot open as a video ({_reason(exc)})") from exc


def _frame(vr: decord.VideoReader, path: str | os.PathLike, index: int) -> np.ndarray:
    try:
        return vr.get_batch([index]).asnumpy()[0]
    except Exception as exc:
        raise DecodeError(f"{path}: frame {index} of {len(vr)} does not decode ({_reason(exc)})") from exc


def _decodes(path: str | os.PathLike, index: int) -> bool:
    """Whether frame `index` decodes, asked of a fresh reader (a failed seek can leave decord's reader unusable)."""
    try:
        _frame(_open(path), path, index)
        return True
    except DecodeError:
        return False


def _read(vr: decord.VideoReader, path: str | os.PathLike, indices: Iterable[int]) -> np.ndarray:
    unique, inverse = distinct_frames(indices, len(vr))
    try:
        batch = vr.get_batch(unique.tolist()).asnumpy()
    except Exception as exc:
        raise DecodeError(f"{path}: decoding {len(unique)} frames failed ({_reason(exc)})") from exc
    return batch[inverse]


def _last_decodable(path: str | os.PathLike, num_frames: int) -> int:
    """The count of a video whose frame 0 decodes and last claimed frame does not: the last frame that
    decodes, found by bisection, as the tail is what a truncated file loses."""
    good, bad = 0, num_frames - 1  # invariant: frame `good` decodes, frame `bad` does not
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if _decodes(path, mid) else (good, mid)
    return good + 1


class DecordDecoder:
    name = "decord"

    def info(self) -> dict[str, str]:
        return {"name": self.name, "version": decord.__version__}

    @staticmethod
    def _claimed(vr: decord.VideoReader, path: str | os.PathLike) -> VideoFacts:
        """The container's frame count (a truncated file claims more than it holds), with frame 0's size."""
        if len(vr) == 0:
            raise DecodeError(f"{path}: no video frames")
        first = _frame(vr, path, 0)
        try:  # presentation times in seconds, from the index decord built on opening: nothing is decoded
            vfr: bool | None = variable_rate(vr.get_frame_timestamp(np.arange(len(vr)))[:, 0])
        except Exception:  # decord's own DECORDError
            vfr = None
        return VideoFacts(num_frames=len(vr), fps=float(vr.get_avg_fps()), width=int(first.shape[1]),
                          height=int(first.shape[0]), vfr=vfr)

    def probe(self, path: str | os.PathLike) -> VideoFacts:
        facts = self._claimed(_open(path), path)
        if facts.num_frames > 1 and not _decodes(path, facts.num_frames - 1):
            facts.num_frames = _last_decodable(path, facts.num_frames)
        return facts

    def read(self, path: str | os.PathLike, indices: Iterable[int]) -> np.ndarray:
        vr = _open(path)
        if len(vr) == 0:
            raise DecodeError(f"{path}: no video frames")
        return _read(vr, path, indices)

    def probe_and_read(
        self, path: str | os.PathLike, frames_for: Callable[[VideoFacts], Sequence[int]]
    ) -> tuple[VideoFacts, np.ndarray]:
        """The claimed count is trusted for planning and the last frame read with the planned ones: when it
        decodes, the count was right (what `probe` checks); when not, the file is probed and read again."""
        vr = _open(path)
        claimed = self._claimed(vr, path)
        wanted = list(frames_for(claimed))
        try:
            # The same reader: it decodes on from frame 0 to the planned frames, seeking only forward.
            frames = _read(vr, path, [*wanted, claimed.num_frames - 1])
            return claimed, frames[: len(wanted)]
        except DecodeError:
            facts = self.probe(path)
            if facts.num_frames == claimed.num_frames:
                raise  # the last frame decodes, so the failure is a planned frame's own
        return facts, self.read(path, frames_for(facts))
