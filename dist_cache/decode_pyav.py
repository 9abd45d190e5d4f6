"""The PyAV backend (see `dist_cache.decoders`): FFmpeg through PyAV, for every platform PyAV installs on.

Frames are numbered as decord numbers them: the file's video packets sorted by presentation timestamp
(pts), frame i being the i-th; as every packet holds one frame, that is the i-th frame a decode from the
start yields. A wanted frame is found by its pts after seeking to the keyframe before it, so a seek is
exact by construction: when the frame does not appear there (a container whose index misleads the seek),
the file is decoded from the start instead. A file whose packets carry no pts, or repeat one, is decoded
from the start with frames counted as they come out.

A truncated file is indexed up to where its data ends. Its decodable count is the first frame, in
presentation order, that does not decode, found by decoding forward from the last keyframe (and from
earlier ones if that fails): bisecting on "frame i decodes" would assume the decodable frames form a prefix,
which B-frames break (a cut can keep a P-frame and lose the B-frames shown before it).

Frames are turned upright by the stream's display matrix, as `ffmpeg` and decord show them (`dist_cache.display`):
FFmpeg hands the matrix to every decoded frame (checked with PyAV 12, 13 and 18: FFmpeg 6.1, 7.0 and 8).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence

import av
import numpy as np

from dist_cache import display
from dist_cache.decode_base import VideoFacts, distinct_frames, variable_rate
from dist_cache.errors import DecodeError, first_line


def _reason(exc: Exception) -> str:
    # FFmpegError's str() repeats the file name; its strerror is the message alone.
    return getattr(exc, "strerror", None) or first_line(exc)


# swscale on one thread, like the decoder: decoding runs in many worker processes side by side, and PyAV's default
# (threads chosen per call) made the conversion 2-3x slower per frame. PyAV 12 and 13 lack the option.
_RGB_OPTIONS: dict = {"threads": 1}


def _rgb24(frame: av.VideoFrame) -> np.ndarray:
    try:
        return frame.to_ndarray(format="rgb24", **_RGB_OPTIONS)
    except TypeError:
        _RGB_OPTIONS.clear()
        return frame.to_ndarray(format="rgb24")


class _Decoding:
    """Frames of one stream from where its container stands, in presentation order, past damage.

    A packet the decoder rejects is skipped (its frame is missing, later ones may still come); a read error
    ends the packets like the end of the file (a truncated file), and the decoder's delayed frames are still
    flushed out. The last error is kept for the message about a missing frame.
    """

    def __init__(self, container: av.container.InputContainer, stream: av.video.stream.VideoStream):
        self.error: str | None = None
        self._frames = self._run(container, stream)

    def _run(self, container, stream) -> Iterator[av.VideoFrame]:
        packets = container.demux(stream)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                self.error, packet = _reason(exc), None
            try:
                # demux ends with an empty packet, which flushes the decoder; None does so after a read error.
                yield from stream.codec_context.decode(packet)
            except av.FFmpegError as exc:
                self.error = _reason(exc)
            if packet is None:
                return

    def find(self, pts: int) -> av.VideoFrame | None:
        """The frame at `pts`, or None once a later one (or the end) shows it is not coming."""
        for frame in self._frames:
            if frame.pts == pts:
                return frame
            if frame.pts is None or frame.pts > pts:
                return None
        return None

    def skip(self, count: int) -> av.VideoFrame | None:
        """The frame after the next `count` ones, or None at the end."""
        for k, frame in enumerate(self._frames):
            if k == count:
                return frame
        return None


class _Video:
    """One open file: its container, video stream and packet index (what decord builds when it opens a file)."""

    def __init__(self, path: str | os.PathLike):
        if not os.path.isfile(path):
            raise DecodeError(f"{path}: file not found")
        self.path = path
        self.transform: str | None = None  # the display transform, known once a frame has decoded
        self.container, self.stream = self._open()
        try:
            self._index()
        except BaseException:
            self.container.close()
            raise

    def _open(self) -> tuple[av.container.InputContainer, av.video.stream.VideoStream]:
        try:
            container = av.open(str(self.path))
        except av.FFmpegError as exc:
            raise DecodeError(f"{self.path}: cannot open as a video ({_reason(exc)})") from exc
        if not container.streams.video:
            container.close()
            raise DecodeError(f"{self.path}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # one thread: decoding runs in many worker processes side by side
        return container, stream

    def _index(self) -> None:
        pts, key = [], []
        try:
            for packet in self.container.demux(self.stream):
                if packet.size == 0 or packet.is_discard:  # the final flush packet; frames an edit list cuts
                    continue
                pts.append(packet.pts)
                key.append(packet.is_keyframe)
        except av.FFmpegError:
            pass  # the data ends early (a truncated file): index what was read
        if not pts:
            raise DecodeError(f"{self.path}: no video frames")
        self.count = len(pts)
        self.pts: np.ndarray | None = None  # None: frames are counted from the start instead
        self.keys = np.zeros(0, dtype=np.int64)
        if any(p is None for p in pts) or len(set(pts)) != len(pts):
            return
        order = np.argsort(np.asarray(pts, dtype=np.int64), kind="stable")
        self.pts = np.asarray(pts, dtype=np.int64)[order]
        self.keys = np.flatnonzero(np.asarray(key, dtype=bool)[order])  # positions, in pts order

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> _Video:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def fps(self) -> float:
        rate = self.stream.average_rate or self.stream.guessed_rate
        return float(rate or 0.0)

    def _key_before(self, position: int) -> int | None:
        k = int(np.searchsorted(self.keys, position, side="right")) - 1
        return None if k < 0 else k

    def _seek(self, key: int) -> _Decoding:
        """Decoding from keyframe `key` (the k-th), or from before it: MP4 and Matroska seek by pts, and land
        on the keyframe at or before it."""
        self.container.seek(int(self.pts[self.keys[key]]), stream=self.stream, backward=True)
        return _Decoding(self.container, self.stream)

    def _missing(self, position: int, decoding: _Decoding) -> DecodeError:
        why = f" ({decoding.error})" if decoding.error else ""
        return DecodeError(f"{self.path}: frame {position} of {self.count} does not decode{why}")

    def frames(self, positions: Sequence[int], keep: Callable[[int], bool] = lambda p: True) -> dict[int, np.ndarray]:
        """RGB frames at the ascending `positions` for which `keep` holds; the others are only checked to decode.

        Seeks to the keyframe before a position whenever it lies past the current keyframe interval.
        """
        out: dict[int, np.ndarray] = {}
        if self.pts is None:
            return self._from_start(positions, keep)
        decoding, current = None, None
        for n, position in enumerate(positions):
            key = self._key_before(position)
            if key is None:  # no keyframe before it: only a decode from the start can be exact
                return {**out, **self._from_start(positions[n:], keep)}
            if decoding is None or key != current:
                decoding, current = self._seek(key), key
            frame = decoding.find(int(self.pts[position]))
            if frame is None and key > 0:  # the seek may have landed past the keyframe: one interval earlier
                decoding = self._seek(key - 1)
                frame = decoding.find(int(self.pts[position]))
            if frame is None:
                return {**out, **self._from_start(positions[n:], keep)}
            if keep(position):
                out[position] = self.rgb(frame)
        return out

    def rgb(self, frame: av.VideoFrame) -> np.ndarray:
        """The frame as uint8 RGB (H, W, 3), turned as its display matrix says (one matrix per stream)."""
        if self.transform is None:
            self.transform = self._display_transform(frame)
        return display.apply(_rgb24(frame), self.transform)

    @staticmethod
    def _display_transform(frame: av.VideoFrame) -> str:
        matrix = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
        return "" if matrix is None else display.transform(np.frombuffer(bytes(matrix), dtype=np.int32).tolist())

    @property
    def vfr(self) -> bool | None:
        """Whether the frames' presentation times stray from a constant rate (None: the file has none)."""
        return None if self.pts is None else variable_rate(self.pts[: self.count])

    def _from_start(self, positions: Sequence[int], keep: Callable[[int], bool]) -> dict[int, np.ndarray]:
        """Like `frames`, decoding a fresh opening of the file from its first packet."""
        container, stream = self._open()
        with container:
            decoding = _Decoding(container, stream)
            out, previous = {}, -1
            for position in positions:
                if self.pts is None:
                    frame = decoding.skip(position - previous - 1)
                else:
                    frame = decoding.find(int(self.pts[position]))
                if frame is None:
                    raise self._missing(position, decoding)
                if keep(position):
                    out[position] = self.rgb(frame)
                previous = position
            return out

    def tail(self) -> list[int]:
        """The positions from the last keyframe on: decoding them all proves the claimed count."""
        if self.pts is None or not len(self.keys):
            return list(range(self.count))  # counted from the start: decoding the last proves every earlier
        return list(range(int(self.keys[-1]), self.count))

    def decodable_count(self) -> int:
        """Frames [0, n) decode, damage lying at the end: n is the first missing frame counted from the last
        keyframe whose own frame decodes."""
        if self.pts is None or not len(self.keys):
            container, stream = self._open()
            with container:
                return self._first_missing(_Decoding(container, stream), 0)
        for key in reversed(range(len(self.keys))):
            start = int(self.keys[key])
            end = self._first_missing(self._seek(key), start)
            if end > start:
                return end
        return 0

    def _first_missing(self, decoding: _Decoding, start: int) -> int:
        """The first position from `start` on (which `decoding` starts at) whose frame does not come."""
        for position in range(start, self.count):
            frame = decoding.skip(0) if self.pts is None else decoding.find(int(self.pts[position]))
            if frame is None:
                return position
        return self.count


class PyAVDecoder:
    name = "pyav"

    def info(self) -> dict[str, str]:
        libavcodec = ".".join(str(v) for v in av.library_versions["libavcodec"])
        return {"name": self.name, "version": f"{av.__version__} (libavcodec {libavcodec})"}

    @staticmethod
    def _claimed(video: _Video) -> VideoFacts:
        first = video.frames([0])[0]  # raises, with its reason, when not even the first frame decodes
        return VideoFacts(num_frames=video.count, fps=video.fps, width=int(first.shape[1]), height=int(first.shape[0]),
                          transform=video.transform, vfr=video.vfr)

    def probe(self, path: str | os.PathLike) -> VideoFacts:
        with _Video(path) as video:
            facts = self._claimed(video)
            if video.count > 1:
                facts.num_frames = video.decodable_count()
            return facts

    def read(self, path: str | os.PathLike, indices: Iterable[int]) -> np.ndarray:
        with _Video(path) as video:
            unique, inverse = distinct_frames(indices, video.count)
            frames = video.frames(unique.tolist())
        return np.stack([frames[p] for p in unique.tolist()])[inverse]

    def probe_and_read(
        self, path: str | os.PathLike, frames_for: Callable[[VideoFacts], Sequence[int]]
    ) -> tuple[VideoFacts, np.ndarray]:
        """One opening, one forward pass: the planned frames, decoded together with every frame from the last
        keyframe on, which proves the claimed count; only when that fails is the count found and the plan redone."""
        with _Video(path) as video:
            facts = self._claimed(video)
            wanted = list(frames_for(facts))
            try:
                frames = video.frames(sorted(set(wanted) | set(video.tail())), keep=set(wanted).__contains__)
            except DecodeError:
                facts.num_frames = video.decodable_count()
                if facts.num_frames == video.count:
                    raise  # the count holds, so the failure is a planned frame's own
                wanted = list(frames_for(facts))
                frames = video.frames(sorted(set(wanted)))
            return facts, np.stack([frames[p] for p in wanted])
