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

from dist_cache.decode_base import Decoder, VideoFacts, distinct_frames
from dist_cache.errors import DecodeError, UserError, first_line

# DecodeError is defined in errors.py (see there why), the shared types in decode_base.py (see there why); all are
# exported here with the decoders that use them.
__all__ = ["DECODERS", "DecodeError", "Decoder", "VideoFacts", "distinct_frames", "get_decoder"]

DECODERS = ("decord", "pyav")


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
