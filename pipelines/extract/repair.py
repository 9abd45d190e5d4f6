"""`extract --repair`: which done videos of a store are damaged, by the store's own integrity check.

By default the check is shallow: each done video's record decodes, each of its shards exists and its index
passes its crc32c, and the index lists every inner chunk of the video's samples (a few small reads per video; a
deleted, truncated or replaced shard fails it). `--deep` also reads every chunk and checks its crc32c, which finds
a flipped bit anywhere, at the price of reading the whole store (storage/README.md, "Damage detection").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from storage import FeatureStore


@dataclass(frozen=True)
class Damage:
    video_index: int
    video: str
    finding: str  # the first finding, one line

    def describe(self) -> str:
        return f"video {self.video_index} ({self.video}): {self.finding}"


def damaged_videos(url: str, videos: Iterable[int], *, deep: bool = False,
                   storage_options: dict[str, Any] | None = None,
                   on_checked: Callable[[], None] = lambda: None) -> list[Damage]:
    """The videos among `videos` whose stored bytes fail the integrity check (`FeatureStore.check_videos`, verify's
    pass), in their order. Videos that are not done (pending, failed) have nothing to check."""
    store = FeatureStore.open(url, storage_options)
    damaged = []
    for v, findings in store.check_videos(videos, deep=deep):
        on_checked()
        if findings:
            damaged.append(Damage(v, store.video(v), findings[0]))
    return damaged
