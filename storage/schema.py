"""The store's self-description (root attribute "dist_cache"): validation, the compat subset, fingerprints.

The extract stage fills the content; this module only checks that the required fields are there with
the right JSON types, derives the "compat" subset that decides whether a rerun may resume into an
existing store, and names the first field that differs when it may not. See storage/README.md.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from storage.errors import StoreMismatchError
from storage.layout import CODECS, DTYPES

FORMAT_VERSION = 1
ATTR_KEY = "dist_cache"

# Every field that changes what is stored. Anything else in the schema (software versions, decoder,
# timestamps, notes) is informational: a rerun with a newer library may resume.
COMPAT_KEYS = (
    "format_version", "backbone", "preprocess", "layers", "num_frames", "views_per_video", "split",
    "dtype", "codec", "tokens", "width", "sampling", "num_videos", "class_names", "text",
)
# Backbone fields that identify the weights and the geometry; e.g. "open_clip_version" or the local path
# the weights were loaded from may change without changing a single feature.
BACKBONE_COMPAT_KEYS = (
    "model", "model_config", "pretrained", "weights_sha256", "image_size", "patch_size", "width",
    "embed_dim", "num_layers", "mean", "std",
)
# Fields the store derives itself; callers' values for them are replaced.
DERIVED_KEYS = ("compat", "videos_sha256")


def canonical_json(obj: Any) -> str:
    """One spelling per value, so equal content hashes equally on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"invalid store schema: {what}")


def validate_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Return a JSON-normalised copy of `schema` (tuples become lists), or raise ValueError naming the field."""
    _check(isinstance(schema, dict), "must be a dict")
    try:
        out = json.loads(json.dumps(schema, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"invalid store schema: not plain JSON ({exc})") from None
    for key in DERIVED_KEYS:
        out.pop(key, None)
    missing = [k for k in COMPAT_KEYS if k not in out]
    _check(not missing, f"missing fields {missing}")

    _check(out["format_version"] == FORMAT_VERSION,
           f"format_version {out['format_version']!r} is not supported (this version writes {FORMAT_VERSION})")

    bb = out["backbone"]
    _check(isinstance(bb, dict), "backbone must be a dict")
    missing = [k for k in BACKBONE_COMPAT_KEYS if k not in bb]
    _check(not missing, f"backbone is missing {missing}")
    _check(isinstance(bb["model"], str) and bb["model"] != "", "backbone.model must be a model name")
    _check(isinstance(bb["model_config"], dict), "backbone.model_config must be a dict")
    _check(isinstance(bb["pretrained"], str), "backbone.pretrained must be a string")
    _check(bb["weights_sha256"] is None or isinstance(bb["weights_sha256"], str),
           "backbone.weights_sha256 must be a string or null")
    for key in ("image_size", "patch_size", "width", "embed_dim", "num_layers"):
        _check(_is_int(bb[key]) and bb[key] > 0, f"backbone.{key} must be a positive int")
    for key in ("mean", "std"):
        _check(isinstance(bb[key], list) and len(bb[key]) == 3 and all(_is_number(x) for x in bb[key]),
               f"backbone.{key} must be 3 numbers")

    _check(isinstance(out["preprocess"], dict), "preprocess must be a dict")
    layers = out["layers"]
    _check(isinstance(layers, list) and len(layers) > 0 and all(_is_int(x) for x in layers),
           "layers must be a non-empty list of ints")
    _check(all(a < b for a, b in zip(layers, layers[1:])), "layers must be strictly increasing")
    _check(0 <= layers[0] and layers[-1] < bb["num_layers"],
           f"layers must lie in [0, {bb['num_layers']}) (backbone.num_layers)")
    for key in ("num_frames", "views_per_video", "tokens", "width"):
        _check(_is_int(out[key]) and out[key] > 0, f"{key} must be a positive int")
    _check(out["width"] == bb["width"], "width must equal backbone.width")
    _check(_is_int(out["num_videos"]) and out["num_videos"] >= 0, "num_videos must be an int >= 0")
    _check(out["split"] in ("train", "test"), "split must be 'train' or 'test'")
    _check(out["dtype"] in DTYPES, f"dtype must be one of {list(DTYPES)}")
    _check(out["codec"] in CODECS, f"codec must be one of {list(CODECS)}")
    _check(isinstance(out["sampling"], dict) and _is_int(out["sampling"].get("seed")),
           "sampling must be a dict with an int seed")
    names = out["class_names"]
    _check(isinstance(names, list) and len(names) > 0 and all(isinstance(n, str) for n in names),
           "class_names must be a non-empty list of strings")
    _check(len(set(names)) == len(names), "class_names must be unique")
    text = out["text"]
    _check(isinstance(text, dict) and isinstance(text.get("templates"), list)
           and all(isinstance(t, str) for t in text["templates"]),
           "text must be a dict with a list of template strings")
    return out


def compat_of(schema: dict[str, Any]) -> dict[str, Any]:
    """The subset of the schema two runs must agree on to write into the same store."""
    compat = {k: schema[k] for k in COMPAT_KEYS}
    compat["backbone"] = {k: schema["backbone"][k] for k in BACKBONE_COMPAT_KEYS}
    return compat


def videos_sha256(videos: Sequence[str], labels: Sequence[int]) -> str:
    """Hash of the manifest rows (path, label) in order: the store's sample index depends on the order."""
    rows = [[str(p), int(l)] for p, l in zip(videos, labels, strict=True)]
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


def fingerprint(schema: dict[str, Any]) -> str:
    """Content identity of a store: compat fields, class names and the video list (order included)."""
    basis = {"compat": schema["compat"], "class_names": schema["class_names"],
             "videos_sha256": schema["videos_sha256"]}
    return hashlib.sha256(canonical_json(basis).encode()).hexdigest()


def _first_difference(old: Any, new: Any, path: str) -> tuple[str, Any, Any] | None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            found = _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    return None if old == new else (path, old, new)


def format_value(value: Any, limit: int = 60) -> str:
    """Short human form: consecutive int runs as [0..11], everything else as compact JSON."""
    if (isinstance(value, list) and len(value) >= 3 and all(_is_int(x) for x in value)
            and all(b == a + 1 for a, b in zip(value, value[1:]))):
        return f"[{value[0]}..{value[-1]}]"
    text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_compatible(store_name: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise StoreMismatchError naming the first compat field where the store and this run differ."""
    if stored.get("format_version") != wanted["format_version"]:
        raise StoreMismatchError(
            f"store {store_name} has format_version {stored.get('format_version')!r}, this dist-cache "
            f"writes {wanted['format_version']}: use another --out")
    found = _first_difference(stored.get("compat", {}), wanted["compat"], "")
    if found:
        field, old, new = found
        raise StoreMismatchError(
            f"store {store_name} was extracted with {field} {format_value(old)}, not {format_value(new)}: "
            f"use another --out or the same flags")


class SchemaFacts:
    """What the reader and the writer both derive from a store's schema (`self.schema`)."""

    schema: dict[str, Any]

    @property
    def num_videos(self) -> int:
        return self.schema["num_videos"]

    @property
    def views_per_video(self) -> int:
        return self.schema["views_per_video"]

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.schema)
