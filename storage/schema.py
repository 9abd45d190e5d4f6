"""The store's self-description (root attribute "dist_cache") as one validated, frozen `StoreSchema`.

The extract stage fills the content; `StoreSchema.__post_init__` is the one place that checks it, whether
it comes from a caller or from a stored store (a stranger's data: every count is bounded before anything
is allocated from it). The schema derives the "compat" subset that decides whether a rerun may resume into
an existing store, and the store's fingerprint. See storage/README.md ("The schema").
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from dist_cache.decoders import DECODERS
from dist_cache.sampling import DENSE_GAMMAS, Sampling
from storage import frames_codec
from storage.encoding import ENCODED_FORMAT_VERSION, check_section, compat_of
from storage.errors import StoreMismatchError

FORMAT_VERSION = 2
# Format 1 (dist-cache 0.1) stores are read, never written into. Format 3 is format 2 plus an `encoding` (compact
# stores, storage/encoding.py): a dist-cache that predates it refuses such a store in one line instead of reading
# its codes as tokens.
READABLE_VERSIONS = (1, 2, ENCODED_FORMAT_VERSION)
ATTR_KEY = "dist_cache"

DTYPES: dict[str, str] = {"fp16": "float16", "int8": "int8"}
CODEC_NAMES = ("none", "zstd", "blosc-zstd", "blosc-lz4")
PRECISIONS = ("fp32", "fp16", "bf16")
# The activation of the tower's MLPs, e.g. quick_gelu (OpenAI CLIP), gelu, gelu_tanh, swiglu (EVA02): a short name.
ACTIVATION_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,31}")
# What a tower's prefix tokens are (backbone.prefix_tokens), in stored order before the patches.
PREFIX_KINDS = ("class", "register", "distillation")
SPLITS = ("train", "test")

# Backbone fields that identify the weights, the geometry and the function computed; e.g.
# "open_clip_version" or the local path the weights were loaded from may change without changing a feature.
# In this order a mismatch is named by its most telling field: other weights by their sha256, before their name.
BACKBONE_COMPAT_KEYS = (
    "model", "model_config", "weights_sha256", "pretrained", "image_size", "patch_size", "width",
    "embed_dim", "num_layers", "mean", "std", "activation",
)
# Keys the store derives itself (stored for other readers, recomputed on reading).
DERIVED_KEYS = ("compat", "videos_sha256")

# Upper bounds on what a schema may claim, checked before anything is sized from it. Generous for any real
# dataset (Kinetics-700: 650k videos), small enough that a hostile store cannot make a reader allocate
# terabytes: the per-sample tables of MAX_SAMPLES samples with MAX_FRAMES frames stay addressable.
LIMITS = {
    "num_videos": 100_000_000, "views_per_video": 1024, "num_frames": 4096, "tokens": 1 << 20,
    "width": 1 << 16, "num_layers": 1024, "embed_dim": 1 << 16, "image_size": 1 << 14, "patch_size": 1 << 14,
    "num_classes": 1 << 20,
}
MAX_SAMPLES = 2**31 - 1  # sample indices fit int32 everywhere


class SampleStatus(enum.IntEnum):
    """A sample's (and its video's) extraction state, as stored in samples/status and videos/status."""

    PENDING = 0
    DONE = 1
    FAILED = 2

    @property
    def label(self) -> str:
        """The spelling in records and messages: "pending", "done", "failed"."""
        return self.name.lower()


def status_counts(codes: Any) -> dict[str, int]:
    """{"done", "failed", "pending"} counts of an array (or sequence) of SampleStatus codes."""
    codes = np.asarray(codes)
    return {s.label: int((codes == s).sum()) for s in (SampleStatus.DONE, SampleStatus.FAILED, SampleStatus.PENDING)}


class SchemaError(ValueError):
    """A schema that is not a valid dist-cache schema; the message names the field."""


def canonical_json(obj: Any) -> str:
    """One spelling per value, so equal content hashes equally on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise SchemaError(f"invalid store schema: {what}")


def _bounded(value: Any, name: str, limit: int, low: int = 1) -> None:
    _check(_is_int(value) and low <= value <= limit,
           f"{name} must be an int in [{low}, {limit}], got {format_value(value)}")


def _plain(obj: Any, what: str) -> Any:
    """A deep, JSON-normalised copy (tuples become lists), or SchemaError if obj is not plain JSON."""
    try:
        return json.loads(json.dumps(obj, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"invalid store schema: {what} is not plain JSON ({exc})") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class StoreSchema:
    """Everything a stranger needs to reuse or reproduce a store's features. Nested sections are JSON
    dicts (treat them as read-only); their required keys are checked here."""

    format_version: int
    backbone: dict[str, Any]
    preprocess: dict[str, Any]
    layers: tuple[int, ...]
    num_frames: int
    views_per_video: int
    split: str
    dtype: str
    codec: str
    precision: str
    tokens: int
    width: int
    sampling: dict[str, Any]
    dense_frames: dict[str, Any] | None
    num_videos: int
    class_names: tuple[str, ...]
    text: dict[str, Any]
    # Informational top-level keys (software versions, notes): kept, never compared.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    # sha256 of the manifest rows, set when the store is created (see with_manifest).
    videos_sha256: str | None = None
    # Compact stores (format 3): what was done to the tokens (storage/encoding.py); None for plain stores.
    encoding: dict[str, Any] | None = None
    # A format-1 schema exactly as stored (to_json returns it; compat follows format 1's rule).
    legacy: dict[str, Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check(self.format_version in READABLE_VERSIONS,
               f"format_version {format_value(self.format_version)} is not one this dist-cache reads "
               f"({', '.join(map(str, READABLE_VERSIONS))})")
        bb = self.backbone
        _check(isinstance(bb, dict), "backbone must be a dict")
        missing = [k for k in BACKBONE_COMPAT_KEYS if k not in bb]
        _check(not missing, f"backbone is missing {missing}")
        _check(isinstance(bb["model"], str) and bb["model"] != "", "backbone.model must be a model name")
        _check(isinstance(bb["model_config"], dict), "backbone.model_config must be a dict")
        _check(isinstance(bb["pretrained"], str), "backbone.pretrained must be a string")
        _check(bb["weights_sha256"] is None or isinstance(bb["weights_sha256"], str),
               "backbone.weights_sha256 must be a string or null")
        for key in ("image_size", "patch_size", "width", "embed_dim", "num_layers"):
            _bounded(bb[key], f"backbone.{key}", LIMITS[key])
        for key in ("mean", "std"):
            _check(isinstance(bb[key], list) and len(bb[key]) == 3 and all(_is_number(x) for x in bb[key]),
                   f"backbone.{key} must be 3 numbers")
        _check(isinstance(bb["activation"], str) and ACTIVATION_PATTERN.fullmatch(bb["activation"]) is not None,
               "backbone.activation must be a short lower-case name (quick_gelu, gelu, gelu_tanh, swiglu, ...)")

        _check(isinstance(self.preprocess, dict), "preprocess must be a dict")
        decoder = self.preprocess.get("decoder")
        _check(isinstance(decoder, dict) and decoder.get("name") in DECODERS and isinstance(decoder.get("version"),
                                                                                            str),
               f"preprocess.decoder must be {{\"name\": one of {list(DECODERS)}, \"version\": str}}")
        layers = self.layers
        _check(isinstance(layers, tuple) and 0 < len(layers) and all(_is_int(x) for x in layers),
               "layers must be a non-empty list of ints")
        _check(all(a < b for a, b in zip(layers, layers[1:])), "layers must be strictly increasing")
        _check(0 <= layers[0] and layers[-1] < bb["num_layers"],
               f"layers must lie in [0, {bb['num_layers']}) (backbone.num_layers)")
        for key in ("num_frames", "views_per_video", "tokens", "width"):
            _bounded(getattr(self, key), key, LIMITS[key])
        self._check_token_layout(bb)
        _check(self.width == bb["width"], "width must equal backbone.width")
        _bounded(self.num_videos, "num_videos", LIMITS["num_videos"], low=0)
        _check(self.num_videos * self.views_per_video <= MAX_SAMPLES,
               f"num_videos * views_per_video must be at most {MAX_SAMPLES}")
        for key, allowed in (("split", SPLITS), ("dtype", DTYPES), ("codec", CODEC_NAMES),
                             ("precision", PRECISIONS)):
            _check(getattr(self, key) in allowed, f"{key} must be one of {list(allowed)}")
        names = self.class_names
        _check(isinstance(names, tuple) and 0 < len(names) <= LIMITS["num_classes"]
               and all(isinstance(n, str) for n in names), "class_names must be a non-empty list of strings")
        _check(len(set(names)) == len(names), "class_names must be unique")
        _check(isinstance(self.sampling, dict) and _is_int(self.sampling.get("seed")),
               "sampling must be a dict with an int seed")
        self._check_flip_label_map(self.sampling.get("flip_label_map"))
        if self.dense_frames is not None:
            problem = frames_codec.section_problem(self.dense_frames)
            _check(problem is None, problem or "")
            gamma = self.dense_frames["gamma"]
            # The values extract --dense-gamma writes and train --gamma takes: any other G would be offered to
            # train (info, the hints) as a gamma its flag refuses.
            _check(_is_int(gamma) and gamma in DENSE_GAMMAS,
                   f"dense_frames.gamma must be one of {', '.join(map(str, DENSE_GAMMAS))}, got {format_value(gamma)}")
        text = self.text
        _check(isinstance(text, dict) and isinstance(text.get("templates"), list)
               and all(isinstance(t, str) for t in text["templates"]),
               "text must be a dict with a list of template strings")
        _check(isinstance(self.extra, dict), "extra must be a dict")
        _check(self.videos_sha256 is None or isinstance(self.videos_sha256, str), "videos_sha256 must be a string")
        _check((self.encoding is not None) == (self.format_version == ENCODED_FORMAT_VERSION),
               f"format_version {ENCODED_FORMAT_VERSION} (and only it) has an encoding section")
        if self.encoding is not None:
            why = check_section(self.encoding, num_layers=len(layers), width=self.width, dtype=self.dtype)
            _check(why is None, str(why))

    def _check_token_layout(self, bb: dict[str, Any]) -> None:
        """Which stored token is which (backbone.prefix_tokens, backbone.grid); records written before they were
        recorded describe open_clip ViTs, one class token and a square grid."""
        if "prefix_tokens" not in bb and "grid" not in bb:
            return
        prefix, grid = bb.get("prefix_tokens"), bb.get("grid")
        _check(isinstance(prefix, list) and len(prefix) <= 64 and all(p in PREFIX_KINDS for p in prefix),
               f"backbone.prefix_tokens must be a list of {list(PREFIX_KINDS)}")
        side = bb["image_size"] // bb["patch_size"]
        _check(grid == [side, side], f"backbone.grid must be [{side}, {side}] (image_size // patch_size)")
        _check(self.tokens == len(prefix) + side * side,
               f"tokens must be len(backbone.prefix_tokens) + {side}x{side} patches")

    def _check_flip_label_map(self, pairs: Any) -> None:
        if pairs is None:
            return
        names = set(self.class_names)
        _check(isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 for p in pairs),
               "sampling.flip_label_map must be null or a list of [class, class] pairs")
        flat = [n for p in pairs for n in p]
        unknown = [n for n in flat if n not in names]
        _check(not unknown, f"sampling.flip_label_map names {format_value(unknown[:1])}, which is not a class")
        _check(len(set(flat)) == len(flat), "sampling.flip_label_map must name each class at most once")

    # ---------------------------------------------------------------- JSON
    @classmethod
    def from_json(cls, data: Any) -> StoreSchema:
        """Parse and validate a schema (a caller's, or a store's root attribute). Raises SchemaError."""
        _check(isinstance(data, dict), "must be a dict")
        raw = _plain(data, "the schema")
        version = raw.get("format_version")
        legacy = None
        if version == 1:
            legacy = copy.deepcopy(raw)
            raw = _upgrade_v1(raw)
        fields = {f.name for f in dataclasses.fields(cls)} - {"extra", "legacy"}
        required = fields - {"videos_sha256", "encoding"}
        missing = sorted(k for k in required if k not in raw)
        _check(not missing, f"missing fields {missing}")
        _check(isinstance(raw["layers"], list), "layers must be a non-empty list of ints")
        _check(isinstance(raw["class_names"], list), "class_names must be a non-empty list of strings")
        values = {k: raw[k] for k in fields if k in raw}
        values["layers"] = tuple(raw["layers"])
        values["class_names"] = tuple(raw["class_names"])
        extra = {k: v for k, v in raw.items() if k not in fields and k not in DERIVED_KEYS}
        return cls(**values, extra=extra, legacy=legacy)

    def to_json(self) -> dict[str, Any]:
        """The root attribute "dist_cache": every field, plus the derived compat (a fresh deep copy)."""
        if self.legacy is not None:
            return copy.deepcopy(self.legacy)
        out: dict[str, Any] = copy.deepcopy(self.extra)
        for f in dataclasses.fields(self):
            if f.name not in ("extra", "legacy") and not (f.name == "encoding" and self.encoding is None):
                out[f.name] = copy.deepcopy(getattr(self, f.name))
        out["layers"], out["class_names"] = list(self.layers), list(self.class_names)
        out["compat"] = self.compat
        return out

    def with_manifest(self, videos: Sequence[str], labels: Sequence[int]) -> StoreSchema:
        return dataclasses.replace(self, videos_sha256=videos_sha256(videos, labels))

    # ---------------------------------------------------------------- derived
    @property
    def num_samples(self) -> int:
        return self.num_videos * self.views_per_video

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def embed_dim(self) -> int:
        return int(self.backbone["embed_dim"])

    @property
    def image_size(self) -> int:
        return int(self.backbone["image_size"])

    @property
    def dense_gamma(self) -> int | None:
        """G, the dense frames stored per sparse frame, or None when the store holds no frames."""
        return None if self.dense_frames is None else int(self.dense_frames["gamma"])

    def view_sampling(self) -> Sampling | None:
        """How this store's views were planned (plan_views' arguments), or None where the record lacks them."""
        return Sampling.recorded(self.sampling, self.num_frames, self.views_per_video, self.split)

    @property
    def frames_format(self) -> tuple[str, int | None] | None:
        """How the dense frames are stored: ("raw", None) or ("jpeg", quality); None when the store holds none."""
        return frames_codec.format_of(self.dense_frames)

    @property
    def compat(self) -> dict[str, Any]:
        """The subset of the schema two runs must agree on to write into the same store."""
        if self.legacy is not None:
            stored = self.legacy.get("compat")
            return copy.deepcopy(stored) if isinstance(stored, dict) else _v1_compat(self.legacy)
        compat = {k: copy.deepcopy(getattr(self, k)) for k in COMPAT_FIELDS}
        compat["layers"], compat["class_names"] = list(self.layers), list(self.class_names)
        compat["backbone"] = {k: self.backbone[k] for k in BACKBONE_COMPAT_KEYS}
        # The decoder's version may change (a bug-fix release decodes the same frames); its name may not.
        compat["preprocess"]["decoder"] = {"name": self.preprocess["decoder"]["name"]}
        if self.encoding is not None:  # the request, not the fit (a resume reuses the stored fit)
            compat["encoding"] = compat_of(self.encoding)
        if compat["dense_frames"] is not None:
            # The encodes a copy's JPEG frames went through before: their history, not a setting a writer must
            # share. extract --repair into such a copy writes frames encoded once, which lie closer to the video's
            # than the chain verify holds them to (every one of 329 frames and quality chains tried).
            compat["dense_frames"].pop("encoded_before", None)
        return compat

    @property
    def fingerprint(self) -> str:
        """Content identity of a store: compat fields, class names and the video list (order included)."""
        basis = {"compat": self.compat, "class_names": list(self.class_names), "videos_sha256": self.videos_sha256}
        return hashlib.sha256(canonical_json(basis).encode()).hexdigest()

    def layer_positions(self, layers: Sequence[int] | int | None) -> list[int]:
        """Positions in the stored layer axis of backbone block indices `layers` (None: all), in that order."""
        if layers is None:
            return list(range(len(self.layers)))
        wanted = [int(layers)] if isinstance(layers, (int, np.integer)) else [int(x) for x in layers]
        have = {layer: pos for pos, layer in enumerate(self.layers)}
        missing = [x for x in wanted if x not in have]
        if missing or not wanted:
            raise ValueError(f"layers {missing or wanted} are not in this store; available layers: "
                             f"{format_value(list(self.layers))}")
        return [have[x] for x in wanted]

    @property
    def encoded(self) -> bool:
        """A compact store (format 3): its features are codes to decode with the store's encoding."""
        return self.encoding is not None

    @property
    def fitted(self) -> bool:
        """Whether the encoding's parameters are fitted (always, in a store; not yet in a run's wanted schema)."""
        return self.encoding is None or self.encoding.get("fit") is not None

    def with_fit(self, fit: dict[str, Any]) -> StoreSchema:
        """This (wanted) schema with its encoding's fit recorded."""
        assert self.encoding is not None
        return dataclasses.replace(self, encoding={**self.encoding, "fit": fit})

    def check_compatible(self, wanted: StoreSchema, store_name: str) -> None:
        """Raise StoreMismatchError unless a run with schema `wanted` may write into this (stored) schema."""
        if self.format_version != wanted.format_version and not (
                self.format_version >= 2 and wanted.format_version >= 2):
            raise StoreMismatchError(
                f"store {store_name} has format_version {self.format_version} (made by dist-cache "
                f"{'0.1' if self.format_version == 1 else 'another version'}); this dist-cache reads it but writes "
                f"only format_version {wanted.format_version}: use a new --out")
        # Between format 2 and 3 the difference that matters is the encoding (or the dtype), so name that.
        mine, theirs = self.compat, wanted.compat
        for compat in (mine, theirs):
            compat.setdefault("encoding", None)
            compat["format_version"] = min(compat["format_version"], 2)
        found = _first_difference(mine, theirs, "")
        if found:
            field, old, new = found
            raise StoreMismatchError(
                f"store {store_name} was extracted with {field} {format_value(old)}, not {format_value(new)}: "
                f"use another --out or the same flags")


COMPAT_FIELDS = (
    "format_version", "backbone", "preprocess", "layers", "num_frames", "views_per_video", "split", "dtype",
    "codec", "precision", "tokens", "width", "sampling", "dense_frames", "num_videos", "class_names", "text",
)
# Format 1's rule, for the fingerprint of stores made by dist-cache 0.1.
_V1_COMPAT_FIELDS = (
    "format_version", "backbone", "preprocess", "layers", "num_frames", "views_per_video", "split",
    "dtype", "codec", "tokens", "width", "sampling", "num_videos", "class_names", "text",
)


def _v1_compat(raw: dict[str, Any]) -> dict[str, Any]:
    compat = {k: copy.deepcopy(raw.get(k)) for k in _V1_COMPAT_FIELDS}
    backbone = raw.get("backbone") if isinstance(raw.get("backbone"), dict) else {}
    compat["backbone"] = {k: backbone.get(k) for k in BACKBONE_COMPAT_KEYS if k != "activation"}
    return compat


def _upgrade_v1(raw: dict[str, Any]) -> dict[str, Any]:
    """A format-1 schema in format 2's terms: what dist-cache 0.1 did implicitly, made explicit."""
    out = dict(raw)
    backbone = dict(out.get("backbone") or {})
    config = backbone.get("model_config")
    # 0.1 ran whatever activation open_clip's config named; configs say so with "quick_gelu".
    backbone["activation"] = "quick_gelu" if isinstance(config, dict) and config.get("quick_gelu") else "gelu"
    out["backbone"] = backbone
    preprocess = dict(out.get("preprocess") or {})
    if not isinstance(preprocess.get("decoder"), dict):
        preprocess["decoder"] = {"name": "decord", "version": "unknown"}
    out["preprocess"] = preprocess
    out.setdefault("precision", "fp32")  # 0.1 ran CLIP in fp32
    out.setdefault("dense_frames", None)
    sampling = dict(out.get("sampling") or {})
    sampling.setdefault("flip_label_map", None)
    out["sampling"] = sampling
    return out


def videos_sha256(videos: Sequence[str], labels: Sequence[int]) -> str:
    """Hash of the manifest rows (path, label) in order: the store's sample index depends on the order."""
    rows = [[str(path), int(label)] for path, label in zip(videos, labels, strict=True)]
    return hashlib.sha256(canonical_json(rows).encode()).hexdigest()


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
    if (isinstance(value, (list, tuple)) and len(value) >= 3 and all(_is_int(x) for x in value)
            and all(b == a + 1 for a, b in zip(value, value[1:]))):
        return f"[{value[0]}..{value[-1]}]"
    try:
        text = json.dumps(value, separators=(", ", ": ")) if not isinstance(value, str) else repr(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
