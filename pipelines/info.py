"""`dist-cache info`: what a store holds and how far its extraction got, for people and for scripts.

Besides the schema and progress: whether dense frames are stored, for which gammas, how (raw, or JPEG of a quality)
and at how many bytes per clip view, what CLIP ran in
(precision, activation) and which decoder read the videos, how many done videos are short, variable-rate or turned
upright by their display matrix (`pipelines.video_notes`), what a format-1 store lacks, and what the store
occupies where it lives: a local store is walked, an object store listed; an HTTP server lists nothing, so
there the object count is derived from the consolidated metadata and the status table, and the size is the
shard bytes the store's summary recorded.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import zarr

from dist_cache.errors import first_line
from dist_cache.model.tokens import TokenLayout
from pipelines.compact import sample_bytes
from pipelines.video_notes import VideoNotes
from storage import FeatureStore, SampleStatus, StoreDamagedError, frames_codec, layout
from storage.remote import open_location
from storage.root import read_attrs


def dense_gammas(stored_gamma: int | None) -> list[int]:
    """The gammas a store's dense frames serve: the stored G and every g dividing it (dist_cache.sampling's
    dense_subset: gamma's dense frames are a subset of G's exactly when gamma divides G)."""
    if stored_gamma is None:
        return []
    return [g for g in range(1, stored_gamma + 1) if stored_gamma % g == 0]


# What info itself checks on its way (FeatureStore.check_store); the videos' shards are verify's.
CHECKED = ("every metadata document and every table and text embedding (every chunk, its crc32c); the videos' "
           "shards were not checked: `dist-cache verify` checks them")


def store_info(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    store = FeatureStore.open(url, storage_options=storage_options)
    schema = store.schema
    K = schema.views_per_video
    damage = store.check_store()
    try:
        per_video = store.status[::K]
        failed = []
        for v in map(int, (per_video == SampleStatus.FAILED).nonzero()[0]):
            record = store.record(v)
            failed.append({"video": store.video(v), "error": record.error if record else None})
        counts: dict[str, int | None] = {name: count * K for name, count in store.progress().items()}
        facts = store.video_facts()
        done = per_video == SampleStatus.DONE
        notes: VideoNotes | None = VideoNotes.from_tables(facts["num_frames"][done], facts["vfr"][done],
                                                          facts["transform"][done], schema.num_frames)
        G = schema.dense_gamma
        dense = None if G is None else frames_info(store, damage)
    except StoreDamagedError as err:  # what the counts come from is damaged: say so, show the rest
        damage = damage or [first_line(err)]
        failed, counts, notes = [], dict.fromkeys(("done", "failed", "pending")), None
        dense = None if schema.dense_gamma is None else {"gamma": schema.dense_gamma,
                                                          "gammas": dense_gammas(schema.dense_gamma)}
    return {
        "store": url,
        "complete": store.complete,
        "damaged": bool(damage),
        "damage": damage,
        "repair": store.repair_hint if damage else None,
        "checked": CHECKED,
        "fingerprint": store.fingerprint,
        "format_version": schema.format_version,
        "videos": schema.num_videos,
        "samples": len(store),
        **counts,
        "failed_videos": failed,
        "precision": schema.precision,
        "activation": schema.backbone["activation"],
        "decoder": schema.preprocess["decoder"],
        "dense_frames": dense,
        "video_notes": None if notes is None else notes.to_dict(),
        "tokens": token_description(schema.backbone),
        "videos_per_shard": store.videos_per_shard,
        "format": store_format(schema),
        "bytes_per_view": _bytes_per_view(schema, dense),
        "encoding": schema.encoding,
        **usage(store, url, storage_options),
        "limitations": limitations(store),
        "schema": schema.to_json(),
    }


def _bytes_per_view(schema, dense: dict | None) -> dict[str, int] | None:
    """Stored bytes of one clip view per sharded array (format 2 and later): the layout's, with JPEG frames' measured
    size (`frames_info`) in place of the raw frames' (None where not measured yet)."""
    if schema.format_version < 2:
        return None
    per_view = sample_bytes(schema)
    if dense is not None and layout.FRAMES in per_view and "format" in dense:
        per_view[layout.FRAMES] = dense["bytes_per_view"]
    return per_view


# Videos whose frame shards' indexes `info` reads to measure the frames' bytes per clip view (one small read each).
FRAME_BYTES_SAMPLE = 16


def frames_info(store: FeatureStore, damage: list[str]) -> dict[str, Any]:
    """The dense frames: stored G and the gammas they serve, format and quality, and bytes per clip view: exact for
    raw frames, for JPEG the mean over the shard indexes of the first FRAME_BYTES_SAMPLE done videos (None before
    any is done). A damaged shard among those is added to `damage` and left out of the mean."""
    schema = store.schema
    G, (kind, quality) = schema.dense_gamma, store.frames_format
    done = [int(v) for v in np.flatnonzero(store.status[::schema.views_per_video] == SampleStatus.DONE)]
    raw = G * schema.num_frames * (schema.image_size**2 * 3 + 4)  # each frame's bytes and its chunk's checksum
    per_view: float | None = None
    if kind == frames_codec.RAW:
        per_view = raw
    elif done and store.checksummed:
        sizes = []
        for v in done[:FRAME_BYTES_SAMPLE]:
            try:
                sizes.append(store.stored_bytes(layout.FRAMES, v))
            except StoreDamagedError as err:  # one video's shard: the counts and the other videos still stand
                damage.append(first_line(err))
        per_view = sum(sizes) / (len(sizes) * schema.views_per_video) if sizes else None
    return {"gamma": G, "gammas": dense_gammas(G), "format": kind, "quality": quality,
            "encoded_before": list(frames_codec.encodings(schema.dense_frames)[:-1]),
            "bytes_per_view": None if per_view is None else round(per_view),
            "raw_bytes_per_view": raw}


def store_format(schema) -> str:
    """The features' format in a few words: fp16, int8 (per-token absmax), or a compact store's encoding."""
    section = schema.encoding
    if section is None:
        return "fp16" if schema.dtype == "fp16" else "int8, per-token absmax scales (format 2)"
    fit = section.get("fit") or {}
    parts = []
    if section["pca"] is not None:
        request, comps = section["pca"]["request"], fit.get("components") or []
        kept = fit.get("variance_kept") or []
        which = f"top {request} components" if isinstance(request, int) else f"{request} of the variance"
        spread = f"K {min(comps)}..{max(comps)}" if comps and min(comps) != max(comps) else f"K {comps[0]}" \
            if comps else "K ?"
        parts.append(f"PCA codes ({which}: {spread}" + (f", variance kept {min(kept):.4f}..{max(kept):.4f})"
                                                         if kept else ")"))
    parts.append("int8 with per-channel and per-token scales" if section["quantization"] else "fp16")
    return ", ".join(parts)


def fit_quality(section: dict | None) -> str | None:
    """A compact store's recorded fit and its error on held-out videos, one line, or None."""
    fit = (section or {}).get("fit")
    if not fit:
        return None
    where = f"fit on {len(fit['fit_videos'])} videos ({fit['fit_tokens']} tokens per layer, by {fit['source']})"
    holdout = fit.get("holdout")
    if not holdout:
        return f"{where}; error not measured (no video held out)"
    rel, inl, cos = holdout["relative"], holdout["relative_inliers"], holdout["cosine_min"]
    return (f"{where}; on {len(fit['holdout_videos'])} held-out videos: relative error {min(rel):.2%}..{max(rel):.2%} "
            f"per layer ({min(inl):.2%}..{max(inl):.2%} without outlier channels), least token cosine {min(cos):.4f}")


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
    try:
        loc = open_location(url, storage_options)
        found = loc.usage()
        if found is not None:
            return {"objects": found.objects, "bytes": found.bytes, "measured": "listing"}
        summary = (read_attrs(loc) or {}).get("summary")
        group = zarr.open_group(loc.zarr_store(read_only=True), mode="r", zarr_format=3)
        if not store.complete or not isinstance(summary, dict) or group.metadata.consolidated_metadata is None:
            return unknown
        return {"objects": _derived_objects(store, group), "bytes": summary.get("bytes"), "measured": "metadata"}
    except StoreDamagedError:  # over HTTP the objects are derived from the status table: damaged, and said so
        return unknown


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


def _offsets(schema: dict) -> str:
    """How a test split's clips were placed, where not centred in their segments (the default, and every store made
    before the choice existed)."""
    sampling = schema["sampling"]
    if sampling.get("test_offsets", "centred") == "centred":
        return ""
    return f" at the {sampling['test_offsets']}'s offsets (gamma {sampling.get('test_offsets_gamma')})"


def _frames_format(dense: dict) -> str:
    if "format" not in dense:  # the tables it is measured from are damaged (store_info)
        return "format and size not read (the store's tables are damaged)"
    if dense["format"] == frames_codec.RAW:
        return f"raw uint8, {_size(dense['bytes_per_view'])} per clip view"
    per_view = dense["bytes_per_view"]
    jpeg = f"JPEG quality {dense['quality']}"
    if dense["encoded_before"]:
        jpeg += f" (encoded again: first at quality {', then '.join(map(str, dense['encoded_before']))})"
    if per_view is None:
        return f"{jpeg}, size not measured yet (no video done)"
    return (f"{jpeg}, {_size(per_view)} per clip view "
            f"({dense['raw_bytes_per_view'] / per_view:.1f}x smaller than raw)")


def format_info(info: dict, show_failed: bool = False) -> str:
    schema = info["schema"]
    backbone = schema["backbone"]
    layers = schema["layers"]
    decoder = info["decoder"]
    dense = info["dense_frames"]
    frames = (f"dense frames for gamma {', '.join(map(str, dense['gammas']))} (stored G={dense['gamma']}), "
              + _frames_format(dense) if dense else "none stored (training decodes the dense frames from the videos)")
    notes = None if info["video_notes"] is None else VideoNotes(**info["video_notes"])
    P = info["videos_per_shard"]
    if info["measured"] == "listing":
        where = f"{info['objects']} objects, {_size(info['bytes'])}"
    elif info["measured"] == "metadata":
        where = (f"{info['objects']} objects (from the metadata), {_size(info['bytes'])} of shards (from the "
                 f"store's summary; HTTP cannot list the rest)")
    else:
        where = "objects and size unknown over HTTP (an incomplete store)"
    state = "DAMAGED" if info["damaged"] else "complete" if info["complete"] else "INCOMPLETE"
    counts = ", ".join(f"{'?' if info[name] is None else info[name]} {name}" for name in ("done", "failed", "pending"))
    lines = [
        f"{info['store']}: {state}, {info['videos']} videos, {info['samples']} samples ({counts})",
        f"  backbone   {backbone['model']} pretrained={backbone['pretrained']} "
        f"sha256={(backbone['weights_sha256'] or 'none')[:16]}, activation {info['activation']}, "
        f"run in {info['precision']}",
        f"  features   layers {layers[0]}..{layers[-1]} ({len(layers)}) x {schema['num_frames']} frames x "
        f"{schema['tokens']} tokens x {schema['width']} ch, {info['format']}, codec {schema['codec']}",
        f"  tokens     {info['tokens']['text']}",
        *([f"  fit        {fit_quality(info['encoding'])}"] if fit_quality(info["encoding"]) else []),
        *([f"  per view   {_size(sum(v or 0 for v in info['bytes_per_view'].values()))} stored per clip view ("
           + ", ".join(f"{k} {_size(v)}" for k, v in info["bytes_per_view"].items()) + ")"]
          if info["bytes_per_view"] else []),
        f"  frames     {frames}",
        f"  sampling   split {schema['split']}, {schema['views_per_video']} view(s)/video, "
        f"{schema['sampling'].get('policy', 'unrecorded policy')}{_offsets(schema)}, "
        f"seed {schema['sampling']['seed']}, "
        f"image {backbone['image_size']} px, decoded by {decoder['name']} {decoder['version']}",
        f"  videos     of the {notes.videos} done: {notes.describe(schema['num_frames'])}" if notes else
        "  videos     not counted (the store's tables are damaged)",
        f"  classes    {len(schema['class_names'])}, text templates {schema['text']['templates']}",
        f"  storage    format {info['format_version']}, "
        + ("" if P == 1 else f"packed copy of {P} videos per shard (read-only), ") + where,
        f"  fingerprint {info['fingerprint'][:16]}",
    ]
    lines += [f"  damaged: {finding}" for finding in info["damage"]]
    if info["damaged"]:
        lines.append(f"  fix: {info['repair']}")
    lines.append(f"  checked    {info['checked']}")
    lines += [f"  note: {note}" for note in info["limitations"]]
    if show_failed:
        lines += [f"  failed: {f['video']}: {f['error']}" for f in info["failed_videos"]]
    elif info["failed_videos"]:
        lines.append(f"  {len(info['failed_videos'])} failed video(s): list them with --failed")
    return "\n".join(lines)
