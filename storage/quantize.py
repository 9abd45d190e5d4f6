"""int8 per-token absmax quantisation of token features (about 2x smaller than fp16, ~0.8 % error).

Each token's C channels share one scale = max|x| / 127 (storage/README.md, "int8": relative Frobenius error
0.76 % on random-init ViT-B/16 activations, more expected with pretrained weights' outlier tokens). The scale is
stored as fp16, and quantisation divides by the fp16-rounded scale, so the reader's q * scale uses exactly the scale
the writer used.
"""

from __future__ import annotations

import numpy as np

QMAX = 127
# Smallest positive fp16 (subnormal). A token whose absmax rounds to a zero scale would divide by zero;
# flooring the scale keeps codes finite, and such a token is ~0 either way.
_MIN_SCALE = np.float16(np.finfo(np.float16).smallest_subnormal)


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., C) floats -> (codes int8 (..., C), scales float16 (...)), per-token over the last axis."""
    x32 = np.asarray(x, dtype=np.float32)
    absmax = np.abs(x32).max(axis=-1)
    scale = np.maximum((absmax / QMAX).astype(np.float16), _MIN_SCALE)
    q = np.rint(x32 / scale.astype(np.float32)[..., None])
    # fp16 rounding of the scale can push |x|/scale just past 127.
    codes = np.clip(q, -QMAX, QMAX).astype(np.int8)
    return codes, scale


def dequantize_int8(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Inverse of quantize_int8, as float16 like an fp16 store returns."""
    out = np.empty(codes.shape, dtype=np.float16)
    # Multiply in float32 and round once into the float16 output: no float32 temporary of the result.
    np.multiply(codes, scales.astype(np.float32)[..., None], out=out, dtype=np.float32, casting="unsafe")
    return out


# ---------------------------------------------------------------- int8 with per-channel and per-token scales
# Compact stores (storage/README.md, "Compact stores"): x = s_t[g_c] * r_c * q. r (per channel, or per PCA component,
# per layer) is fitted once on a sample of the store's own features and stored with it; each token has one scale per
# channel group g (two groups), chosen so that the group's largest |x_c / r_c| maps to 127. A channel one or two
# orders above the others on every token (systematic outlier features) has a matching r_c. A channel that is
# ordinary on most tokens and hundreds of times larger on a few (the massive activations of trained ViTs, in their
# high-norm tokens) is put in group 1 at the fit: on a massive token it no longer sets the step of every other
# channel, and on an ordinary token it keeps its own resolution.
GROUPS = 2


def quantize_scaled(x: np.ndarray, channel_scales: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., D) floats, r (D,) float32 > 0 and each channel's group (D,) in {0, 1} -> (codes int8 (..., D), token
    scales float16 (..., 2)).

    q = clip(round(x / (s[g] * r)), -127, 127) with s[g] = fp16(max over group g of |x_c / r_c| / 127), floored like
    quantize_int8's (an empty group's scale is the floor): dividing by the fp16-rounded s makes the reader's
    q * s[g] * r use exactly the scale the writer used."""
    y = np.asarray(x, dtype=np.float32) / np.asarray(channel_scales, dtype=np.float32)
    groups = np.asarray(groups, dtype=np.intp)
    absmax = np.stack([np.abs(y[..., groups == g]).max(axis=-1, initial=0.0) for g in range(GROUPS)], axis=-1)
    scale = np.maximum((absmax / QMAX).astype(np.float16), _MIN_SCALE)
    q = np.rint(y / scale.astype(np.float32)[..., groups])
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scale


def dequantize_scaled(codes: np.ndarray, scales: np.ndarray, channel_scales: np.ndarray,
                      groups: np.ndarray) -> np.ndarray:
    """Inverse of quantize_scaled, float32: codes * scales[..., groups] * channel_scales, in that order."""
    out = codes.astype(np.float32)
    out *= scales.astype(np.float32)[..., np.asarray(groups, dtype=np.intp)]
    out *= np.asarray(channel_scales, dtype=np.float32)
    return out
