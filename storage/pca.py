"""Fitting a compact store's encoding on a sample of its own features, and measuring it on held-out videos.

The sample is a seeded draw over the whole manifest (Kinetics manifests are sorted by class: their first N rows are
one or two classes), split into fit videos and held-out videos. The fit videos' tokens are reduced, per layer, to
their count, sum and Gram matrix in float64 (the caller may accumulate them on a GPU), plus a strided subset of
tokens (`reservoir`) from which the per-channel (or per-component) int8 scales are taken. The held-out videos are
then encoded and decoded with the fitted parameters, and their error is what the store records and `verify`
allows for (storage/README.md, "Compact stores").
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from storage.encoding import FRACTION_K_MULTIPLE, Encoding

# Tokens per layer the fit aims for, per channel: a C x C covariance from n tokens has a sampling error of about
# sqrt(C / n) in its spectrum; 64 C tokens (about 49k for ViT-B/16, 32 clips of 8 frames) puts the leading
# eigenvectors' error well under the reconstruction error being measured.
TOKENS_PER_CHANNEL = 64
MIN_FIT_VIDEOS = 8
MAX_SAMPLE_VIDEOS = 512
HOLDOUT_SHARE = 0.2
# Tokens per layer kept (strided) from the fit videos for the int8 scales: their maximum magnitude per channel.
RESERVOIR_TOKENS = 4096
# A channel whose largest magnitude in the reservoir exceeds this many times its own median magnitude has a huge
# dynamic range (ordinary on most tokens, massive on a few): its int8 codes get the token's second scale
# (storage/quantize.py). Gaussian channels sit near 6 at 4096 tokens; systematic outlier channels, large on every
# token, near that too (their per-channel scale handles them).
DYNAMIC_RANGE_FACTOR = 30.0
# A channel whose largest magnitude in the fit sample exceeds this many times the median channel's is reported as
# an outlier channel (massive activations are one to two orders above the rest), and the error is also reported
# without such channels: over a tensor with huge channels, the relative error hides crushed small channels.
OUTLIER_FACTOR = 10.0
_STREAM = 0x70636166  # separates the sample's draw from every other stream seeded with the store's seed


@dataclasses.dataclass(frozen=True)
class Sample:
    """The videos a fit reads: `fit` to fit on, `holdout` to measure on (ascending video indices)."""

    fit: list[int]
    holdout: list[int]


def auto_sample_videos(width: int, tokens_per_video: int) -> int:
    """Videos to sample (fit + held out) so that the fit sees TOKENS_PER_CHANNEL * C tokens per layer."""
    fit = max(MIN_FIT_VIDEOS, math.ceil(TOKENS_PER_CHANNEL * width / max(1, tokens_per_video)))
    return min(MAX_SAMPLE_VIDEOS, math.ceil(fit / (1 - HOLDOUT_SHARE)))


def draw_sample(candidates: Sequence[int], count: int, seed: int) -> Sample:
    """`count` videos drawn without replacement from `candidates` (seeded), a HOLDOUT_SHARE of them held out
    (at least one when there are two or more)."""
    pool = np.asarray(sorted(int(v) for v in candidates), dtype=np.int64)
    chosen = np.random.default_rng([int(seed), _STREAM]).permutation(pool)[:min(count, len(pool))]
    held = 0 if len(chosen) < 2 else max(1, round(len(chosen) * HOLDOUT_SHARE))
    return Sample(sorted(int(v) for v in chosen[held:]), sorted(int(v) for v in chosen[:held]))


class FitAccumulator:
    """Per layer: token count, sum and Gram matrix in float64, and a strided reservoir of tokens (float32)."""

    def __init__(self, num_layers: int, width: int, reservoir_stride: int = 1):
        self.num_layers, self.width = num_layers, width
        self.count = 0
        self.sums = np.zeros((num_layers, width), np.float64)
        self.grams = np.zeros((num_layers, width, width), np.float64)
        self.stride = max(1, int(reservoir_stride))
        self._reservoir: list[np.ndarray] = []

    @staticmethod
    def stride_for(total_tokens: int) -> int:
        """The reservoir stride that keeps about RESERVOIR_TOKENS of `total_tokens` per layer."""
        return max(1, math.ceil(total_tokens / RESERVOIR_TOKENS))

    def add(self, tokens: np.ndarray) -> None:
        """(L, n, C) tokens of one or more views (any float dtype): accumulated in float64 here, on the CPU."""
        x = np.asarray(tokens)
        x64 = x.astype(np.float64)
        sums = x64.sum(axis=1)
        grams = np.einsum("lnc,lnd->lcd", x64, x64, optimize=True)
        self.add_moments(x.shape[1], sums, grams, x[:, ::self.stride])

    def add_moments(self, count: int, sums: np.ndarray, grams: np.ndarray, reservoir: np.ndarray) -> None:
        """Moments accumulated elsewhere (a GPU, in float64) and that batch's strided tokens (L, m, C)."""
        self.count += int(count)
        self.sums += sums
        self.grams += grams
        self._reservoir.append(np.asarray(reservoir, dtype=np.float32))

    @property
    def reservoir(self) -> np.ndarray:
        return np.concatenate(self._reservoir, axis=1) if self._reservoir else \
            np.zeros((self.num_layers, 0, self.width), np.float32)


@dataclasses.dataclass
class Fit:
    """A fitted encoding and what the fit saw."""

    encoding: Encoding
    variance_kept: list[float] | None  # per layer, with projection
    outlier_channels: list[list[int]]  # per layer
    tokens: int  # fit tokens per layer


def fit(acc: FitAccumulator, pca: int | float | None, quantize: bool) -> Fit:
    """Fit the encoding: per layer, the mean and top components (`pca` a count, or a share of the centred
    variance), and with `quantize` the per-channel (or per-component) int8 scales r = the largest magnitude in the
    reservoir."""
    if acc.count < 2:
        raise ValueError("the fit needs at least two tokens per layer")
    L, C = acc.num_layers, acc.width
    reservoir = acc.reservoir
    means, bases, kept, scales, groups = [], [], [], [], []
    for pos in range(L):
        mean = acc.sums[pos] / acc.count
        if pca is not None:
            cov = acc.grams[pos] / acc.count - np.outer(mean, mean)
            values, vectors = np.linalg.eigh((cov + cov.T) / 2)
            values, vectors = np.clip(values[::-1], 0.0, None), vectors[:, ::-1]
            k = choose_k(values, pca, C)
            basis = _signed(vectors[:, :k].T)
            means.append(mean)
            bases.append(basis)
            kept.append(float(values[:k].sum() / max(values.sum(), 1e-300)))
        if quantize:
            x = reservoir[pos].astype(np.float64)
            z = (x - means[pos]) @ bases[pos].T if pca is not None else x
            magnitude = np.abs(z)
            peak = magnitude.max(axis=0) if len(z) else np.ones(z.shape[1])
            typical = np.median(magnitude, axis=0) if len(z) else np.ones(z.shape[1])
            scales.append(_floored(peak))
            groups.append((peak > DYNAMIC_RANGE_FACTOR * np.maximum(typical, 1e-30)).astype(np.uint8))
    encoding = Encoding(
        C, L, None if pca is None else tuple(len(b) for b in bases),
        None if pca is None else np.stack(means).astype(np.float32),
        None if pca is None else np.concatenate(bases).astype(np.float32),
        np.concatenate(scales).astype(np.float32) if quantize else None,
        np.concatenate(groups) if quantize else None)
    return Fit(encoding, kept if pca is not None else None, outlier_channels(reservoir), acc.count)


def choose_k(eigenvalues: np.ndarray, pca: int | float, width: int) -> int:
    """K for one layer: the count asked for (at most C), or the smallest K whose components keep the share `pca`
    of the centred variance, rounded up to a multiple of FRACTION_K_MULTIPLE."""
    if isinstance(pca, int):
        return min(pca, width)
    total = float(eigenvalues.sum())
    if total <= 0:
        return min(width, FRACTION_K_MULTIPLE)
    k = int(np.searchsorted(np.cumsum(eigenvalues) / total, pca) + 1)
    return min(width, math.ceil(k / FRACTION_K_MULTIPLE) * FRACTION_K_MULTIPLE)


def _signed(basis: np.ndarray) -> np.ndarray:
    """Each component with its largest-magnitude entry positive: eigenvectors' signs are arbitrary, and a fixed
    convention makes a refit on the same data give the same codes."""
    idx = np.abs(basis).argmax(axis=1)
    signs = np.sign(basis[np.arange(len(basis)), idx])
    return basis * np.where(signs == 0, 1.0, signs)[:, None]


def _floored(scales: np.ndarray) -> np.ndarray:
    """A channel never seen away from zero still needs a positive scale (it is then ~0 anyway)."""
    return np.maximum(scales, max(float(scales.max(initial=0.0)) * 1e-6, 1e-12))


def outlier_channels(reservoir: np.ndarray) -> list[list[int]]:
    """Per layer, the channels whose largest magnitude exceeds OUTLIER_FACTOR x the median channel's."""
    out = []
    for tokens in reservoir:
        if not len(tokens):
            out.append([])
            continue
        peak = np.abs(tokens).max(axis=0)
        out.append([int(c) for c in np.flatnonzero(peak > OUTLIER_FACTOR * max(float(np.median(peak)), 1e-30))])
    return out


class ErrorStats:
    """Reconstruction error per layer over held-out tokens: relative Frobenius error over all channels and over the
    channels that are not outliers, and the mean and least cosine between a token and its reconstruction."""

    def __init__(self, num_layers: int, outliers: Sequence[Sequence[int]] = ()):
        self.num_layers = num_layers
        self.outliers = [list(c) for c in outliers] or [[] for _ in range(num_layers)]
        self.err = np.zeros((num_layers, 2))  # squared error: all channels, inlier channels
        self.ref = np.zeros((num_layers, 2))
        self.cos_sum = np.zeros(num_layers)
        self.cos_min = np.full(num_layers, np.inf)
        self.tokens = 0

    def add(self, pos: int, x: np.ndarray, xhat: np.ndarray) -> None:
        """(n, C) tokens of layer `pos` and their reconstruction."""
        x, xhat = np.asarray(x, np.float64), np.asarray(xhat, np.float64)
        d2 = (x - xhat) ** 2
        inliers = np.ones(x.shape[1], bool)
        inliers[self.outliers[pos]] = False
        self.err[pos] += (d2.sum(), d2[:, inliers].sum())
        self.ref[pos] += ((x ** 2).sum(), (x[:, inliers] ** 2).sum())
        cos = (x * xhat).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(xhat, axis=1), 1e-30)
        self.cos_sum[pos] += cos.sum()
        self.cos_min[pos] = min(self.cos_min[pos], float(cos.min(initial=np.inf)))
        if pos == 0:
            self.tokens += len(x)

    def add_sample(self, encoding: Encoding, features: np.ndarray) -> None:
        """Encode and decode (K, L, T, N+1, C) features as the store would, and count their error."""
        for pos in range(self.num_layers):
            x = np.asarray(features[:, pos], np.float32).reshape(-1, encoding.width)
            codes, scales = encoding.encode_layer(pos, x)
            self.add(pos, x, encoding.decode_layer(pos, codes, scales))

    def summary(self) -> dict[str, Any] | None:
        """JSON: per-layer lists, or None when nothing was measured."""
        if not self.tokens:
            return None
        rel = np.sqrt(self.err / np.maximum(self.ref, 1e-300))
        return {"tokens": int(self.tokens), "relative": _rounded(rel[:, 0]),
                "relative_inliers": _rounded(rel[:, 1]),
                "cosine_mean": _rounded(self.cos_sum / self.tokens), "cosine_min": _rounded(self.cos_min)}


def _rounded(values: np.ndarray) -> list[float]:
    return [float(f"{v:.6g}") for v in values]


def fit_record(result: Fit, sample: Sample, holdout: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """The schema's `encoding.fit`: what was fitted, on what, and how well it does on the held-out videos."""
    enc = result.encoding
    return {
        "components": None if enc.components is None else list(enc.components),
        "grain": enc.grain if enc.projected else None,
        "variance_kept": None if result.variance_kept is None else _rounded(np.asarray(result.variance_kept)),
        "fit_videos": sample.fit, "holdout_videos": sample.holdout, "fit_tokens": result.tokens,
        "outlier_channels": result.outlier_channels, "holdout": holdout, "source": source, "sha256": enc.digest(),
    }


def fit_videos(read: Callable[[int], np.ndarray], sample: Sample, *, pca: int | float | None, quantize: bool,
               source: str) -> tuple[dict[str, Any], Encoding]:
    """Fit on the CPU from `read(v)` -> (K, L, T, N+1, C) float features of video v (a store's reconstruction in
    `copy`, generated features in tests): the fit videos accumulated, then the held-out ones measured.
    Returns the schema's `encoding.fit` record and the parameters."""
    acc: FitAccumulator | None = None
    for v in sample.fit:
        x = np.asarray(read(v))
        K, L, T, N1, C = x.shape
        if acc is None:
            acc = FitAccumulator(L, C, FitAccumulator.stride_for(len(sample.fit) * K * T * N1))
        acc.add(x.transpose(1, 0, 2, 3, 4).reshape(L, -1, C))
    if acc is None:
        raise ValueError("the fit sample holds no video")
    result = fit(acc, pca, quantize)
    stats = ErrorStats(acc.num_layers, result.outlier_channels)
    for v in sample.holdout:
        stats.add_sample(result.encoding, np.asarray(read(v)))
    return fit_record(result, sample, stats.summary(), source), result.encoding


def subset_record(record: dict[str, Any], positions: Sequence[int], encoding: Encoding) -> dict[str, Any]:
    """A fit record restricted to stored layers `positions` (per-layer lists kept for those), for `encoding`, the
    fitted parameters restricted the same way (Encoding.subset)."""
    def pick(values: Any) -> Any:
        return None if values is None else [values[p] for p in positions]

    out = dict(record, components=pick(record.get("components")), variance_kept=pick(record.get("variance_kept")),
               outlier_channels=pick(record.get("outlier_channels")), sha256=encoding.digest(),
               grain=encoding.grain if encoding.projected else None)
    holdout = record.get("holdout")
    if holdout:
        out["holdout"] = {k: (pick(v) if isinstance(v, list) else v) for k, v in holdout.items()}
    return out
