"""`dist-cache info`: what a store holds and how far its extraction got, for people and for scripts.

Besides the schema and progress: whether dense frames are stored and for which gammas, what CLIP ran in
(precision, activation) and which decoder read the videos, what a format-1 store lacks, and what the store
occupies where it lives: a local store is walked, an object store listed; an HTTP server lists nothing, so
there the object count is derived from the consolidated metadata and the status table, and the size is the
shard bytes the store's summary recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from dist_cache.model.tokens import TokenLayout
from storage import FeatureStore, SampleStatus, layout
from storage.remote import open_location
from storage.root import read_attrs


def dense_gammas(stored_gamma: int | None) -> list[int]:
    """The gammas a store's dense frames serve: the stored G and every g dividing it (dist_cache.sampling's
    dense_subset: gamma's dense frames are a subset of G's exactly when gamma divides G)."""
    if stored_gamma is None:
        return []
    return [g for g in range(1, stored_gamma + 1) if stored_gamma % g == 0]


def store_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    store = FeatureStore.open(url, storage_options=storage_options)
    schema = store.schema
    K = schema.views_per_video
    per_video = store.status[::K]
    failed = []
    for v in map(int, (per_video == SampleStatus.FAILED).nonzero()[0]):
        record = store.record(v)
        failed.append({"video": store.video(v), "error": record.error if record else None})
    counts = store.progress()
    G = schema.dense_gamma
    return {
        "store": url,
        "complete": store.complete,
        "fingerprint": store.fingerprint,
        "format_version": schema.format_version,
        "videos": schema.num_videos,
        "samples": len(store),
        **{name: count * K for name, count in counts.items()},
        "failed_videos": failed,
        "precision": schema.precision,
        "activation": schema.backbone["activation"],
        "decoder": schema.preprocess["decoder"],
        "dense_frames": None if G is None else {"gamma": G, "gammas": dense_gammas(G)},
        "tokens": token_description(schema.backbone),
        "bytes_per_view": bytes_per_view(store),
        "videos_per_shard": store.videos_per_shard,
        **usage(store, url, storage_options),
        "limitations": limitations(store),
        "schema": schema.to_json(),
    }


def token_description(backbone: dict[str, Any]) -> dict[str, Any]:
    """Which stored token is which, and what DiST takes from them (dist_cache/model/tokens.py)."""
    tokens = TokenLayout.of_record(backbone)
    counts = {kind: tokens.prefix.count(kind) for kind in dict.fromkeys(tokens.prefix)}
    prefix = " + ".join(f"{n} {kind}{'s' if n > 1 else ''}" for kind, n in counts.items()) or "no prefix token"
    dropped = [kind for kind in counts if kind != "class"]
    taken = "the class token" if tokens.has_class else "the mean of the patch tokens (computed in training)"
    return {
        "prefix": list(tokens.prefix), "grid": list(tokens.grid), "patch_size": backbone["patch_size"],
        "image_size": backbone["image_size"],
        "text": (f"{prefix}, then {tokens.grid[0]}x{tokens.grid[1]} patches row-major (patch "
                 f"{backbone['patch_size']} px, {backbone['image_size']} px images); DiST's summary token: {taken}"
                 + (f"; {' and '.join(k + 's' for k in dropped)} dropped" if dropped else "")),
    }


def bytes_per_view(store: FeatureStore) -> dict[str, int]:
    """Uncompressed bytes one view (sample) stores, per array (features, scales, embeddings, dense frames), and in
    total: a video takes views_per_video times this (plus its codec's saving, if any)."""
    sizes = {spec.name: math.prod(spec.shape[1:]) * np.dtype(spec.dtype).itemsize
             for spec in layout.sharded_arrays(store.schema)}
    return {**sizes, "total": sum(sizes.values())}


def limitations(store: FeatureStore) -> list[str]:
    """What the store lacks (format 1), and the warning for a backbone run with GELU where its weights were trained
    with QuickGELU (format-1 stores, and format-2 stores written before dist-cache built the activation from the
    weights; `dist_cache.backbone.activation_mismatch` knows which tags). open_clip is only imported for those."""
    out = store.limitations()
    backbone = store.schema.backbone
    pretrained = str(backbone["pretrained"])
    if backbone["activation"] == "gelu" and pretrained != "none" and not any("QuickGELU" in line for line in out) \
            and "/" not in pretrained and "." not in pretrained:  # a tag, not a checkpoint file
        from dist_cache.backbone import activation_mismatch

        warning = activation_mismatch(backbone)
        if warning:
            out.append(f"backbone: {warning}")
    return out


def usage(store: FeatureStore, url: str, storage_options: dict | None) -> dict[str, Any]:
    """{"objects", "bytes", "measured"}: "listing" (a walk, an object store's listing), or over HTTP "metadata"
    (objects derived from the metadata, bytes the shards' from the store's summary), or None: unknown."""
    unknown = {"objects": None, "bytes": None, "measured": None}
    loc = open_location(url, storage_options)
    found = loc.usage()
    if found is not None:
        return {"objects": found.objects, "bytes": found.bytes, "measured": "listing"}
    summary = (read_attrs(loc) or {}).get("summary")
    group = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3)
    if not store.complete or not isinstance(summary, dict) or group.metadata.consolidated_metadata is None:
        return unknown
    return {"objects": _derived_objects(store, group), "bytes": summary.get("bytes"), "measured": "metadata"}


def _derived_objects(store: FeatureStore, group: zarr.Group) -> int:
    """Objects a complete store written by dist-cache consists of: a zarr.json per node, every chunk of the
    tables, the shards that hold a done video, and the records."""
    nodes = group.metadata.consolidated_metadata.flattened_metadata
    K, P = store.schema.views_per_video, store.videos_per_shard
    status = store.status[::K]
    with_shard = {v // P for v in map(int, (status == SampleStatus.DONE).nonzero()[0])}
    records = math.ceil(len(status) / P) if P > 1 else int((status != SampleStatus.PENDING).sum())
    objects = 1 + len(nodes) + records
    sharded = {spec.name for spec in layout.sharded_arrays(store.schema)}
    for name, meta in nodes.items():
        if getattr(meta, "node_type", None) != "array":
            continue
        if name in sharded:
            objects += len(with_shard)
        else:
            grid = meta.chunk_grid.chunk_shape  # type: ignore[attr-defined]
            objects += math.prod(math.ceil(n / c) for n, c in zip(meta.shape, grid))
    return objects


def _size(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def format_info(info: dict, show_failed: bool = False) -> str:
    schema = info["schema"]
    backbone = schema["backbone"]
    layers = schema["layers"]
    decoder = info["decoder"]
    dense = info["dense_frames"]
    frames = (f"dense frames for gamma {', '.join(map(str, dense['gammas']))} (stored G={dense['gamma']})"
              if dense else "none stored (training decodes the dense frames from the videos)")
    P = info["videos_per_shard"]
    if info["measured"] == "listing":
        where = f"{info['objects']} objects, {_size(info['bytes'])}"
    elif info["measured"] == "metadata":
        where = (f"{info['objects']} objects (from the metadata), {_size(info['bytes'])} of shards (from the "
                 f"store's summary; HTTP cannot list the rest)")
    else:
        where = "objects and size unknown over HTTP (an incomplete store)"
    lines = [
        f"{info['store']}: {'complete' if info['complete'] else 'INCOMPLETE'}, {info['videos']} videos, "
        f"{info['samples']} samples ({info['done']} done, {info['failed']} failed, {info['pending']} pending)",
        f"  backbone   {backbone['model']} pretrained={backbone['pretrained']} "
        f"sha256={(backbone['weights_sha256'] or 'none')[:16]}, activation {info['activation']}, "
        f"run in {info['precision']}",
        f"  features   layers {layers[0]}..{layers[-1]} ({len(layers)}) x {schema['num_frames']} frames x "
        f"{schema['tokens']} tokens x {schema['width']} ch, {schema['dtype']}, codec {schema['codec']}",
        f"  tokens     {info['tokens']['text']}",
        f"  per view   {_size(info['bytes_per_view']['total'])} uncompressed ("
        + ", ".join(f"{name} {_size(n)}" for name, n in info["bytes_per_view"].items() if name != "total") + ")",
        f"  frames     {frames}",
        f"  sampling   split {schema['split']}, {schema['views_per_video']} view(s)/video, "
        f"{schema['sampling'].get('policy', 'unrecorded policy')}, seed {schema['sampling']['seed']}, "
        f"image {backbone['image_size']} px, decoded by {decoder['name']} {decoder['version']}",
        f"  classes    {len(schema['class_names'])}, text templates {schema['text']['templates']}",
        f"  storage    format {info['format_version']}, "
        + ("" if P == 1 else f"packed copy of {P} videos per shard (read-only), ") + where,
        f"  fingerprint {info['fingerprint'][:16]}",
    ]
    lines += [f"  note: {note}" for note in info["limitations"]]
    if show_failed:
        lines += [f"  failed: {f['video']}: {f['error']}" for f in info["failed_videos"]]
    elif info["failed_videos"]:
        lines.append(f"  {len(info['failed_videos'])} failed video(s): list them with --failed")
    return "\n".join(lines)
