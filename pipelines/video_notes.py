"""The videos sampling treats in a way worth a word, counted for extract's summary and `info`.

- short: fewer frames than T, the frames per view. TSN's segments are then shorter than a frame, and a view
  repeats frames, in time order (5 frames at T=8: [0 1 1 2 3 3 3 4] or so): CLIP sees them, as the reference and
  mmaction2's samplers would also give it repeats.
- variable frame rate: frames are sampled by index, so equal segments are equal in frames, not in seconds.
- turned upright: the decoder applied the container's display matrix (a phone video); decord does not say, so
  its stores count these as unknown, as do stores finalized before these facts were recorded.
The rules are the README's ("Sampling and views"); the facts are the decoder's, recorded per video.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class VideoNotes:
    """Counts over the videos seen; `*_unknown`: videos whose decoder did not tell."""

    videos: int = 0
    short: int = 0
    vfr: int = 0
    vfr_unknown: int = 0
    turned: int = 0
    turned_unknown: int = 0

    def add(self, facts: Mapping[str, Any], frames: int) -> None:
        """One video's facts (a record's, or `VideoFacts.to_dict()`), with the store's T."""
        self.videos += 1
        self.short += int(facts["num_frames"]) < frames
        vfr, transform = facts.get("vfr"), facts.get("transform")
        self.vfr += bool(vfr)
        self.vfr_unknown += vfr is None
        self.turned += bool(transform)
        self.turned_unknown += transform is None

    def merge(self, other: VideoNotes) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @classmethod
    def from_tables(cls, num_frames: np.ndarray, vfr: np.ndarray, transform: np.ndarray, frames: int) -> VideoNotes:
        """From a store's per-video tables, rows of the videos to count (vfr -1 and transform "": unknown)."""
        transform = np.asarray(transform, dtype=object)
        return cls(videos=len(num_frames), short=int((np.asarray(num_frames) < frames).sum()),
                   vfr=int((np.asarray(vfr) == 1).sum()), vfr_unknown=int((np.asarray(vfr) < 0).sum()),
                   turned=int(((transform != "") & (transform != "none")).sum()),
                   turned_unknown=int((transform == "").sum()))

    def to_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def describe(self, frames: int) -> str:
        """What was found, each with what it means for sampling, in one line (the caller says of which videos)."""
        parts = [f"{self.short} shorter than {frames} frames (their views repeat frames)",
                 f"{self.vfr} with a variable frame rate (sampled by frame index, not time)"
                 + (f", {self.vfr_unknown} unknown" if self.vfr_unknown else ""),
                 f"{self.turned} turned upright by a display matrix"
                 + (f", {self.turned_unknown} unknown (decord does not report it, and older stores did not record it)"
                    if self.turned_unknown else "")]
        return "; ".join(parts)
