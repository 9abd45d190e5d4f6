"""Video files as users' downloads leave them: cut short, or remuxed with the index first (as served on the web)."""

from __future__ import annotations

import os
from pathlib import Path

import av


def remux_faststart(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy a video's packets (no re-encoding) into an mp4 with its index first, as served on the web, so
    that a truncated copy still opens (an mp4 whose index is at the end opens only whole)."""
    with av.open(str(src)) as source, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        video = source.streams.video[0]
        copy = out.add_stream_from_template(video)
        for packet in source.demux(video):
            if packet.dts is None:  # the flush packet at the end
                continue
            packet.stream = copy
            out.mux(packet)


def truncate_file(path: str | os.PathLike, keep_fraction: float) -> None:
    """Cut a file to its first `keep_fraction` of bytes, like an interrupted download."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction)])
