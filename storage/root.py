"""The root node (zarr.json) of a store: its attributes read defensively, and written whole.

Root attributes: {"dist_cache": schema, "created": bool, "complete": bool, "summary": {...} | null}.
The root is the first thing a writer publishes (create-if-absent), so of several writers racing to create
a store exactly one schema wins; "created" turns true once every array and the manifest tables exist.
"""

from __future__ import annotations

import json
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from dist_cache.errors import first_line
from storage.errors import StoreDamagedError, StoreNotFoundError
from storage.location import Location
from storage.schema import ATTR_KEY, READABLE_VERSIONS, SchemaError, StoreSchema

ROOT_KEY = "zarr.json"


def read_attrs(loc: Location) -> dict[str, Any] | None:
    """The root group's attributes (one GET), None if there is no root node. A root that is not a zarr
    group, or not JSON (a truncated file), is a one-line error, never a traceback."""
    data = loc.read(ROOT_KEY)
    if data is None:
        return None
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise StoreDamagedError(f"store {loc.url}: its root zarr.json is not valid JSON ({len(data)} bytes, "
                                f"truncated or overwritten); restore it from a copy or re-create the store") from None
    if not isinstance(meta, dict) or meta.get("node_type") != "group":
        raise StoreNotFoundError(f"{loc.url} is not a dist-cache store (its root zarr.json is not a zarr group)")
    attrs = meta.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise StoreDamagedError(f"store {loc.url}: its root attributes are not a JSON object; re-create the store")
    return attrs


def stored_schema(attrs: dict[str, Any], url: str) -> StoreSchema:
    """The schema in a store's root attributes, validated like any stranger's data."""
    raw = attrs.get(ATTR_KEY)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version not in READABLE_VERSIONS:
        raise StoreNotFoundError(f"store {url} has format_version {version}, this dist-cache reads "
                                 f"{' and '.join(map(str, READABLE_VERSIONS))}: upgrade dist-cache")
    try:
        return StoreSchema.from_json(raw)
    except SchemaError as err:
        raise StoreDamagedError(f"store {url}: {first_line(err)}; the store is damaged or was not made by "
                                f"dist-cache: re-create it") from None


def group_json(attrs: dict[str, Any]) -> bytes:
    """zarr.json of a root group with these attributes, exactly as zarr writes it."""
    meta = GroupMetadata(attributes=attrs, zarr_format=3)
    return meta.to_buffer_dict(default_buffer_prototype())[ROOT_KEY].to_bytes()
