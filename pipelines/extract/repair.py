"""`extract --repair`: which done videos of a store are damaged, by the store's own integrity check.

By default the check is shallow: each done video's record decodes, each of its shards exists and its index
passes its crc32c, and the index lists every inner chunk of the video's samples (a few small reads per video; a
deleted, truncated or replaced shard fails it). `--deep` also reads every chunk and checks its crc32c, which finds
a flipped bit anywhere, at the price of reading the whole store (storage/README.md, "Damage detection").
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from storage import FeatureStore

# Checks are small reads (or whole-shard reads with --deep): a few in flight hide a remote store's latency.
CHECK_THREADS = 8


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
    """The videos among `videos` whose stored bytes fail the integrity check, ascending. Videos that are not
    done (pending, failed) have nothing to check."""
    store = FeatureStore.open(url, storage_options)

    def check(v: int) -> Damage | None:
        findings = store.check_video(v, deep=deep)
        return Damage(v, store.video(v), findings[0]) if findings else None

    damaged = []
    with concurrent.futures.ThreadPoolExecutor(CHECK_THREADS, thread_name_prefix="store-check") as pool:
        for found in pool.map(check, videos):
            on_checked()
            if found is not None:
                damaged.append(found)
    return damaged
