"""Compact stores: what was done to the tokens, its fitted parameters, and the numpy encode and decode.

A compact store (format_version 3) keeps, per stored layer l, either the tokens themselves as int8 with a
per-channel scale r_l and a per-token scale s_t (`x = s_t * r_l * q`), or their PCA codes
`z = (x - mu_l) @ B_l.T` (B_l: the K_l x C top principal components as rows), as fp16 or as int8 in the same
two-scale scheme (per-component r_l). The parameters (mu, B, r) are fitted on a sample of the store's own
features (storage/pca.py) and stored in small arrays under `encoding/`; the schema's `encoding` section says what
was requested, what was fitted and how well (storage/README.md, "Compact stores", with the numpy recipe).

PCA codes of all layers are one flat row per sample: for each stored layer in order, its (T, N+1, K_l) codes in
C order. Per-layer K may differ (`--pca 0.99`): a regular (S, L, T, N+1, max K) array would pad the short layers,
and one array per layer would make a sample L separate reads. The flat row has neither cost: its inner chunks
are `grain` components of one layer (grain = the gcd of the K_l), so one sample is still one contiguous ranged
read, any run of consecutive layers is a contiguous range of chunks, and no byte is padding.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from storage.quantize import dequantize_scaled, quantize_scaled

ENCODED_FORMAT_VERSION = 3
QUANTIZATION = "int8-channel-token"
PCA = "pca"
# Fraction requests round each layer's K up to a multiple of this, so the layers share a chunk grain of at
# least 8 components (the extra components are real ones, not padding).
FRACTION_K_MULTIPLE = 8

CODES = "codes"
MEAN = "encoding/mean"
COMPONENTS = "encoding/components"
CHANNEL_SCALES = "encoding/channel_scales"
CHANNEL_GROUPS = "encoding/channel_groups"


class EncodingError(ValueError):
    """An encoding section or parameters that do not describe a valid compact store."""


# ---------------------------------------------------------------- the schema's section
def request_of(pca: int | float | None, dtype: str, sample_videos: int | None, seed: int) -> dict[str, Any]:
    """The schema's `encoding` section before the fit: what the user asked for (and what compat compares)."""
    if pca is not None:
        check_pca_request(pca)
    return {"pca": None if pca is None else {"request": pca}, "quantization": QUANTIZATION if dtype == "int8" else None,
            "sample": {"seed": int(seed), "videos": "auto" if sample_videos is None else int(sample_videos)},
            "fit": None}


def check_pca_request(pca: Any) -> None:
    """A component count >= 1, or a share of the centred variance in (0, 1)."""
    if isinstance(pca, bool) or not isinstance(pca, (int, float)):
        raise EncodingError(f"pca request must be a component count or a variance fraction, got {pca!r}")
    if isinstance(pca, int) and pca < 1:
        raise EncodingError(f"pca request {pca}: a component count must be at least 1")
    if isinstance(pca, float) and not 0.0 < pca < 1.0:
        raise EncodingError(f"pca request {pca}: a variance fraction must lie in (0, 1)")


def compat_of(section: dict[str, Any]) -> dict[str, Any]:
    """The part of an encoding section two runs must agree on to write into one store: the request, not the fit."""
    return {k: section.get(k) for k in ("pca", "quantization", "sample")}


def check_section(section: Any, *, num_layers: int, width: int, dtype: str) -> str | None:
    """Why `section` is not a valid encoding section for this geometry, or None."""
    if not isinstance(section, dict):
        return "encoding must be a dict"
    pca, quant, sample, fit = (section.get(k) for k in ("pca", "quantization", "sample", "fit"))
    if pca is not None:
        if not isinstance(pca, dict) or "request" not in pca:
            return "encoding.pca must be null or {\"request\": K or fraction}"
        try:
            check_pca_request(pca["request"])
        except EncodingError as err:
            return str(err)
    if quant not in (None, QUANTIZATION):
        return f"encoding.quantization must be null or {QUANTIZATION!r}"
    if (quant is not None) != (dtype == "int8"):
        return f"encoding.quantization is {quant!r} but dtype is {dtype}"
    if pca is None and quant is None:
        return "encoding must project (pca), quantise (int8) or both"
    if not (isinstance(sample, dict) and isinstance(sample.get("seed"), int)
            and (sample.get("videos") == "auto" or (isinstance(sample.get("videos"), int) and sample["videos"] >= 2))):
        return "encoding.sample must be {\"seed\": int, \"videos\": \"auto\" or an int >= 2}"
    if fit is None:
        return None
    if not isinstance(fit, dict) or not isinstance(fit.get("sha256"), str):
        return "encoding.fit must be null or a dict with the parameters' sha256"
    components = fit.get("components")
    if pca is None:
        if components is not None:
            return "encoding.fit.components must be null without pca"
    elif not (isinstance(components, list) and len(components) == num_layers
              and all(isinstance(k, int) and not isinstance(k, bool) and 1 <= k <= width for k in components)):
        return f"encoding.fit.components must list {num_layers} component counts in [1, {width}]"
    return None


# ---------------------------------------------------------------- the fitted parameters
@dataclasses.dataclass(frozen=True, eq=False)
class Encoding:
    """The fitted parameters of a compact store, and the encode/decode of its tokens (numpy, float32).

    `components` None: no projection (the tokens are quantised in channel space); else K_l per stored layer with
    `mean` (L, C) and `basis` (sum K_l, C), each layer's components as rows. `channel_scales` (sum D_l,) float32,
    D_l = K_l or C, and `channel_groups` (sum D_l,) uint8 (0 ordinary, 1 huge dynamic range: storage/quantize.py)
    when the codes are int8; both None for fp16 codes."""

    width: int
    num_layers: int
    components: tuple[int, ...] | None
    mean: np.ndarray | None = None
    basis: np.ndarray | None = None
    channel_scales: np.ndarray | None = None
    channel_groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        L, C = self.num_layers, self.width
        if self.components is not None:
            if len(self.components) != L or not all(1 <= k <= C for k in self.components):
                raise EncodingError(f"components {self.components} for {L} layers of width {C}")
            _check_array(self.mean, (L, C), "mean")
            _check_array(self.basis, (sum(self.components), C), "basis")
        elif self.mean is not None or self.basis is not None:
            raise EncodingError("mean and basis belong to a projection")
        if self.channel_scales is not None:
            _check_array(self.channel_scales, (sum(self.dims),), "channel_scales")
            if not (self.channel_scales > 0).all():
                raise EncodingError("channel_scales must be positive")
            groups = self.channel_groups
            if not (isinstance(groups, np.ndarray) and groups.shape == self.channel_scales.shape
                    and np.isin(groups, (0, 1)).all()):
                raise EncodingError("channel_groups must hold a group, 0 or 1, per channel scale")
        elif self.channel_groups is not None:
            raise EncodingError("channel_groups belong to int8 codes")
        elif self.components is None:
            raise EncodingError("an encoding without projection must quantise (channel_scales)")

    @property
    def projected(self) -> bool:
        return self.components is not None

    @property
    def quantized(self) -> bool:
        return self.channel_scales is not None

    @property
    def dims(self) -> list[int]:
        """D_l: what each layer's codes have per token (K_l with projection, else C)."""
        return list(self.components) if self.components is not None else [self.width] * self.num_layers

    @property
    def offsets(self) -> list[int]:
        """Where each layer's D_l start in the concatenation of all layers' (basis rows, channel scales)."""
        return [0, *np.cumsum(self.dims).tolist()]

    @property
    def grain(self) -> int:
        """Components per inner chunk of the codes array: every layer is a whole number of chunks."""
        return math.gcd(*self.dims)

    def layer_basis(self, pos: int) -> np.ndarray:
        a, b = self.offsets[pos], self.offsets[pos + 1]
        return self.basis[a:b]  # type: ignore[index]

    def layer_scales(self, pos: int) -> np.ndarray:
        a, b = self.offsets[pos], self.offsets[pos + 1]
        return self.channel_scales[a:b]  # type: ignore[index]

    def layer_groups(self, pos: int) -> np.ndarray:
        a, b = self.offsets[pos], self.offsets[pos + 1]
        return self.channel_groups[a:b]  # type: ignore[index]

    # ---------------------------------------------------------------- per layer
    def encode_layer(self, pos: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(..., C) tokens of stored layer `pos` -> (codes (..., D_l) fp16 or int8, token scales (..., 2) or None)."""
        x = np.asarray(x, dtype=np.float32)
        if self.projected:
            x = (x - self.mean[pos]) @ self.layer_basis(pos).T  # type: ignore[index]
        if self.quantized:
            return quantize_scaled(x, self.layer_scales(pos), self.layer_groups(pos))
        with np.errstate(over="ignore"):  # inf shows up in the writer's finiteness check
            return x.astype(np.float16), None

    def decode_layer(self, pos: int, codes: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
        """Inverse of encode_layer, float32 (..., C): the tokens as the store reconstructs them."""
        z = dequantize_scaled(codes, scales, self.layer_scales(pos), self.layer_groups(pos)) if self.quantized \
            else np.asarray(codes, dtype=np.float32)
        if not self.projected:
            return z
        return z @ self.layer_basis(pos) + self.mean[pos]  # type: ignore[index]

    # ---------------------------------------------------------------- whole samples
    def encode(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(..., L, T, N+1, C) -> (codes, token scales (..., L, T, N+1, 2) or None): codes (..., L, T, N+1, C) int8
        without projection, else the flat rows (..., T*(N+1)*sum K_l) of layout.CODES."""
        features = np.asarray(features)
        lead, L, C = features.shape[:-4], features.shape[-4], features.shape[-1]
        if L != self.num_layers or C != self.width:
            raise EncodingError(f"features of {L} layers x {C} channels for an encoding of {self.num_layers} x "
                                f"{self.width}")
        per_layer = [self.encode_layer(pos, features[..., pos, :, :, :]) for pos in range(L)]
        scales = None if not self.quantized else np.stack([s for _, s in per_layer], axis=-4)
        if not self.projected:
            return np.stack([c for c, _ in per_layer], axis=-4), scales
        flat = [c.reshape(*lead, -1) for c, _ in per_layer]
        return np.concatenate(flat, axis=-1), scales

    def decode(self, codes: np.ndarray, scales: np.ndarray | None, positions: Sequence[int], frames: int,
               tokens: int) -> np.ndarray:
        """One sample's stored values for the stored layers `positions` (in that order) -> (L', T, N+1, C) float32.

        `codes` is what the reader returns: (L', T, N+1, C) without projection, else the requested layers' flat
        codes back to back; `scales` (L', T, N+1, 2) for int8 codes."""
        out = np.empty((len(positions), frames, tokens, self.width), np.float32)
        at = 0
        for n, pos in enumerate(positions):
            if self.projected:
                size = frames * tokens * self.dims[pos]
                layer = codes[at:at + size].reshape(frames, tokens, self.dims[pos])
                at += size
            else:
                layer = codes[n]
            out[n] = self.decode_layer(pos, layer, None if scales is None else scales[n])
        return out

    def code_size(self, positions: Sequence[int], frames: int, tokens: int) -> int:
        """Elements of the flat codes of stored layers `positions` (projected encodings)."""
        return frames * tokens * sum(self.dims[p] for p in positions)

    def subset(self, positions: Sequence[int]) -> Encoding:
        """The parameters of stored layers `positions` alone (a copy that keeps some layers keeps their codes)."""
        def rows(values: np.ndarray | None) -> np.ndarray | None:
            if values is None:
                return None
            return np.concatenate([values[self.offsets[p]:self.offsets[p + 1]] for p in positions])

        return Encoding(self.width, len(positions),
                        None if self.components is None else tuple(self.components[p] for p in positions),
                        None if self.mean is None else self.mean[list(positions)], rows(self.basis),
                        rows(self.channel_scales), rows(self.channel_groups))

    # ---------------------------------------------------------------- storage
    def arrays(self) -> dict[str, np.ndarray]:
        """The parameter arrays a store keeps under encoding/ (float32)."""
        out = {}
        if self.projected:
            out[MEAN], out[COMPONENTS] = self.mean, self.basis
        if self.quantized:
            out[CHANNEL_SCALES] = self.channel_scales
        arrays = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in out.items()}  # type: ignore[arg-type]
        if self.quantized:
            arrays[CHANNEL_GROUPS] = np.ascontiguousarray(self.channel_groups, dtype=np.uint8)
        return arrays

    def digest(self) -> str:
        """sha256 of the parameters (component counts and every array's little-endian bytes): the schema records
        it, so a reader knows the arrays are the ones the codes were made with."""
        h = hashlib.sha256(repr((self.width, self.num_layers, self.components)).encode())
        for name, values in sorted(self.arrays().items()):
            h.update(name.encode())
            h.update(values.tobytes())
        return h.hexdigest()

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, width: int, num_layers: int,
                    components: Sequence[int] | None) -> Encoding:
        groups = arrays.get(CHANNEL_GROUPS)
        return cls(width, num_layers, None if components is None else tuple(int(k) for k in components),
                   _f32(arrays.get(MEAN)), _f32(arrays.get(COMPONENTS)), _f32(arrays.get(CHANNEL_SCALES)),
                   None if groups is None else np.asarray(groups, dtype=np.uint8))


def _f32(values: np.ndarray | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float32)


def _check_array(values: Any, shape: tuple[int, ...], name: str) -> None:
    if not isinstance(values, np.ndarray) or values.shape != shape or not np.isfinite(values).all():
        got = getattr(values, "shape", None)
        raise EncodingError(f"{name} must be a finite array of shape {shape}, got {got}")


@dataclasses.dataclass(frozen=True)
class Encoded:
    """A video's features already encoded (on the GPU during extraction), in the dtypes and layout the store keeps:
    `codes` (K, T*(N+1)*sum K_l) fp16 or int8 with projection, else (K, L, T, N+1, C) int8; `scales` (K, L, T, N+1)
    x 2 float16 for int8 codes, else None."""

    codes: np.ndarray
    scales: np.ndarray | None = None
