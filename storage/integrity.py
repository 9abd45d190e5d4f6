"""The integrity of a store as a whole, beside its videos' shards (FeatureStore.check_videos): every metadata
document and every array that is not sharded per video (the tables, the text embeddings, whatever the layout adds).

- Each node's own `zarr.json` exists, is JSON, and equals the copy consolidated into the root `zarr.json`. Readers
  of a complete store use the consolidated copy, but a writer resuming or repairing the store reads each node's own.
- Each array the store lists (its consolidated metadata, and every array its layout gives) has the layout its
  schema gives.
- Each array that is not sharded per video is read whole, fresh: every chunk must be there (an absent chunk is
  never zarr's fill value) and pass its crc32c, and values that index something must be in range. These arrays
  are small (a few MB for Kinetics-400), so a shallow check reads them too: byte for byte at every depth.
"""

from __future__ import annotations

import json
from typing import Any

from dist_cache.errors import UserError, first_line
from storage import layout
from storage.errors import MissingChunkError, StoreDamagedError
from storage.opened import OpenedStore
from storage.strict import METADATA_DOCUMENT

SHARDING_CODEC = "sharding_indexed"


def listed_nodes(st: OpenedStore) -> dict[str, dict[str, Any] | None]:
    """Node name -> its consolidated metadata (None when the store is not consolidated): every node the
    consolidated metadata lists, every array the layout gives (the finalize tables only once complete: before,
    they are absent or stale and unread), and their parent groups."""
    nodes: dict[str, dict[str, Any] | None] = {}
    if st.consolidated:  # the root's JSON as stored (it parsed on opening), not zarr's reading of it
        root = json.loads(st.loc.read(METADATA_DOCUMENT) or b"{}")
        listed = (root.get("consolidated_metadata") or {}).get("metadata") or {}
        nodes.update({name: meta for name, meta in listed.items() if isinstance(meta, dict)})
    try:
        per_shard = st.videos_per_shard
    except StoreDamagedError:
        per_shard = 1  # reported below, with the features array's metadata
    expected = layout.data_arrays(st.schema, per_shard) + (layout.table_arrays(st.schema) if st.complete else [])
    for spec in expected:
        if spec.name not in nodes and (spec.name in layout.LATER_TABLES or (
                st.schema.format_version == 1 and spec.name in layout.OPTIONAL_TABLES)):
            continue  # finalized before they existed, or format 1 (storage/README.md, "Format 1"): read as unknown
        nodes.setdefault(spec.name, None)
    for name in list(nodes):
        parts = name.split("/")
        for end in range(1, len(parts)):
            nodes.setdefault("/".join(parts[:end]), None)
    return dict(sorted(nodes.items()))


def check_store(st: OpenedStore) -> list[str]:
    """Findings about the store as a whole, one line each (no store name: the caller adds it); [] if intact."""
    findings: list[str] = []
    for name, consolidated in listed_nodes(st).items():
        finding, own = _check_document(st, name, consolidated)
        if finding:
            findings.append(finding)
        meta = consolidated or own
        if meta is None or meta.get("node_type") != "array":
            continue  # a group, or an array whose only metadata is damaged (reported above)
        try:
            st.array(name)
            if _sharded(meta):
                continue  # per video: FeatureStore.check_videos
            st.check_values(name, st.read_whole(name))
        except MissingChunkError as err:
            findings.append(f"{err.key}, a chunk of {name}, is missing")
        except UserError as err:  # damaged layout or values, a chunk failing its crc32c, a path leaving the root
            findings.append(_without_store(first_line(err, 300), st.url))
    return findings


def _check_document(st: OpenedStore, name: str, consolidated: dict[str, Any] | None
                    ) -> tuple[str | None, dict[str, Any] | None]:
    """(finding or None, the node's own metadata if it parses)."""
    key = f"{name}/{METADATA_DOCUMENT}"
    data = st.loc.read(key)
    if data is None:
        return f"{key} is missing", None
    try:
        own = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        return f"{key} is not valid JSON ({len(data)} bytes, truncated or overwritten)", None
    if not isinstance(own, dict):
        return f"{key} is not a JSON object", None
    if consolidated is None:
        return None, own
    # A group's consolidated copy carries an (empty) consolidated_metadata of its own; its document does not.
    expected = {k: v for k, v in consolidated.items() if not (k == "consolidated_metadata" and k not in own)}
    if own != expected:
        return f"{key} differs from the copy consolidated in the root zarr.json", own
    return None, own


def _sharded(meta: dict[str, Any]) -> bool:
    codecs = meta.get("codecs") or []
    return bool(codecs) and isinstance(codecs[0], dict) and codecs[0].get("name") == SHARDING_CODEC


def _without_store(message: str, url: str) -> str:
    """A StoreDamagedError's text without its leading 'store URL: ' and its trailing fix (the report names both)."""
    prefix = f"store {url}: "
    message = message[len(prefix):] if message.startswith(prefix) else message
    return message.split("; ")[0]
