"""A zarr Store wrapper under which a missing chunk is an error, never zarr's fill value.

zarr reads an absent chunk as its fill value: a deleted `videos/label/c.0` reads as every label 0, and a deleted
`text_embeddings/c.0.0` as zero text features. Every chunk of a dist-cache store is stored, even all-zero ones
(storage/layout.py: write_empty_chunks), so an absent one is always damage. Readers (and a writer's own reads)
go through this wrapper; only metadata documents may be absent (zarr probes for them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from zarr.abc.store import ByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

METADATA_DOCUMENT = "zarr.json"


def is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] == METADATA_DOCUMENT


class StrictStore(WrapperStore[Store]):
    """Reads of absent chunk keys raise `missing(key)` (an exception naming the store, the key and the fix)."""

    def __init__(self, store: Store, missing: Callable[[str], Exception]) -> None:
        super().__init__(store)
        self._missing = missing

    def _with_store(self, store: Store) -> StrictStore:
        return type(self)(store, self._missing)

    async def get(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
                  ) -> Buffer | None:
        found = await self._store.get(key, prototype, byte_range)
        if found is None and not is_metadata(key):
            raise self._missing(key)
        return found

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        key_ranges = list(key_ranges)
        found = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _range), value in zip(key_ranges, found):
            if value is None and not is_metadata(key):
                raise self._missing(key)
        return found

    def __repr__(self) -> str:
        return f"StrictStore({self._store!r})"
