"""Choosing and fitting a compact store from the command line: `--pca` and `--dtype int8` of `extract` and `copy`,
the fit from an existing store (`copy`), and `copy --dry-run`, which fits on a sample and reports bytes and error
without writing anything (storage/README.md, "Compact stores")."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dist_cache.errors import UserError
from storage import FeatureStore, StoreSchema, frames_codec, layout
from storage.encoding import ENCODED_FORMAT_VERSION, Encoded, Encoding, request_of
from storage.pca import auto_sample_videos, draw_sample, fit_videos, subset_record

# A Kinetics-400-sized store, for the sizes `copy --dry-run` prints: its training videos.
K400_VIDEOS = 240_000


def parse_pca(text: str | None) -> int | float | None:
    """`--pca K` (a component count, at least 1) or `--pca F` (a share of the centred variance, 0 < F < 1)."""
    if text is None or str(text).strip().lower() in ("", "none", "off"):
        return None
    text = str(text).strip()
    try:
        value: int | float = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
    if isinstance(value, int) and value >= 1 or isinstance(value, float) and 0.0 < value < 1.0:
        return value
    raise UserError(f"--pca {text}: give a number of components (e.g. 128) or a share of the variance to keep "
                    f"(e.g. 0.99)")


def encoding_section(pca: int | float | None, dtype: str, sample_videos: int | None, seed: int) -> dict | None:
    """The schema's `encoding` request for these flags, or None for a plain store (fp16 without --pca)."""
    if pca is None and dtype != "int8":
        return None
    if sample_videos is not None and sample_videos < 2:
        raise UserError(f"--pca-sample {sample_videos}: the fit needs at least 2 videos (one is held out)")
    return request_of(pca, dtype, sample_videos, seed)


def with_encoding(schema: StoreSchema, section: dict | None) -> StoreSchema:
    """`schema` as a plain (format 2) or compact (format 3, unfitted) store's."""
    import dataclasses

    from storage import FORMAT_VERSION

    return dataclasses.replace(schema, encoding=section,
                               format_version=FORMAT_VERSION if section is None else ENCODED_FORMAT_VERSION)


def sample_size(section: dict, schema: StoreSchema) -> int:
    """How many videos the fit draws: `--pca-sample`, else enough for a stable covariance (storage/pca.py)."""
    count = section["sample"]["videos"]
    if count != "auto":
        return int(count)
    return auto_sample_videos(schema.width, schema.views_per_video * schema.num_frames * schema.tokens)


# ---------------------------------------------------------------- copy
def same_encoding(source: FeatureStore, section: dict | None) -> bool:
    """Whether a copy keeps the source's own encoding: its codes are then copied as stored, never re-encoded."""
    return section is not None and source.schema.encoding is not None and \
        all(section[k] == source.schema.encoding[k] for k in ("pca", "quantization", "sample"))


def source_fit(source: FeatureStore, layers: list[int], section: dict) -> Any:
    """The fit StoreWriter.open calls for a copy: the source's parameters for the kept layers when the copy keeps
    the source's encoding; else a fit on a sample of the source's done videos (their reconstruction, float32)."""
    positions = source.schema.layer_positions(layers)
    if same_encoding(source, section):
        encoding = source.encoding.subset(positions)  # type: ignore[union-attr]

        def kept() -> tuple[dict, Encoding]:
            return subset_record(source.schema.encoding["fit"], positions, encoding), encoding  # type: ignore[index]
        return kept

    def refit() -> tuple[dict, Encoding]:
        return fit_store(source, layers, section)
    return refit


def fit_store(source: FeatureStore, layers: list[int], section: dict) -> tuple[dict, Encoding]:
    """Fit `section`'s request on a seeded sample of `source`'s done videos (storage/pca.py, on this CPU)."""
    K = source.schema.views_per_video
    done = sorted({int(i) // K for i in source.done_indices()})
    if len(done) < 2:
        raise UserError(f"store {source.url} has {len(done)} done video(s): a fit needs at least 2 (one held out)")
    sample = draw_sample(done, sample_size(section, source.schema), section["sample"]["seed"])

    def read(v: int) -> np.ndarray:
        return np.stack([source.features(i, layers, dtype=np.float32) for i in range(v * K, (v + 1) * K)])

    pca = None if section["pca"] is None else section["pca"]["request"]
    return fit_videos(read, sample, pca=pca, quantize=section["quantization"] is not None, source="copy")


def stored_codes(source: FeatureStore, v: int, layers: list[int]) -> Encoded:
    """Video v's codes as the source stores them, for the kept layers: what a copy that keeps the encoding writes."""
    K = source.schema.views_per_video
    raws = [source.read_sample(i, layers) for i in range(v * K, (v + 1) * K)]
    scales = None if raws[0].scales is None else np.stack([r.scales for r in raws])
    return Encoded(np.stack([r.features for r in raws]), scales)


# ---------------------------------------------------------------- bytes and the dry run
def sample_bytes(schema: StoreSchema) -> dict[str, int]:
    """Stored bytes of one sample (clip view) per sharded array, chunk checksums and shard-index entries included
    (uncompressed; a fitted compact schema)."""
    out = {}
    for spec in layout.sharded_arrays(schema):
        per_sample = math.prod(spec.shape[1:]) * np.dtype(spec.dtype).itemsize
        chunks = math.prod(s // c for s, c in zip(spec.shape[1:], spec.chunks[1:]))
        out[spec.name] = per_sample + chunks * 20  # a 4-byte crc32c and a 16-byte index entry per chunk
    return out


# Views whose frames `copy --dry-run` measures as JPEG: their bytes vary with the content, unlike every other array's.
JPEG_SAMPLE_VIEWS = 8


def jpeg_frame_bytes(source: FeatureStore, quality: int) -> int:
    """Bytes per clip view of the source's dense frames stored as JPEG of `quality` (checksums and index entries
    included): as the source stores them where it holds JPEGs of that quality, else encoded now from up to
    JPEG_SAMPLE_VIEWS views spread over the source's done samples."""
    done = source.done_indices()
    if not len(done):
        raise UserError(f"store {source.url} has no extracted video yet: there are no frames to measure")
    spread = np.linspace(0, len(done) - 1, min(JPEG_SAMPLE_VIEWS, len(done))).round().astype(int)
    picked = sorted({int(done[j]) for j in spread})
    if source.schema.frames_format == (frames_codec.JPEG, quality):
        K = source.schema.views_per_video
        videos = sorted({i // K for i in picked})
        return round(sum(source.stored_bytes(layout.FRAMES, v) for v in videos) / (len(videos) * K))
    total = 0
    for i in picked:
        frames = source.frames(i)
        total += sum(len(frames_codec.encode(frame, quality)) + 20 for frame in frames)
    return round(total / len(picked))


def dry_run(source: FeatureStore, schema: StoreSchema, layers: list[int], section: dict | None) -> dict[str, Any]:
    """What `copy` with these options would give, measured on a sample of the source, nothing written: bytes per
    clip view (and for a Kinetics-400-sized store) and, for a compact target, the fit's per-layer error."""
    record = None
    if section is not None:
        record, _encoding = source_fit(source, layers, section)()
        schema = schema.with_fit(record)
    target = sample_bytes(schema)
    if layout.FRAMES in target and schema.frames_format is not None and schema.frames_format[0] == frames_codec.JPEG:
        target[layout.FRAMES] = jpeg_frame_bytes(source, schema.frames_format[1])  # type: ignore[arg-type]
    views = schema.views_per_video
    return {
        "source": source.url, "layers": list(schema.layers), "dtype": schema.dtype, "encoding": section,
        "fit": record, "bytes_per_view": target, "total_per_view": sum(target.values()),
        "source_per_view": sum(sample_bytes(source.schema).values()) if source.schema.fitted else None,
        "views": views, "k400_bytes": K400_VIDEOS * views * sum(target.values()),
    }


def format_dry_run(report: dict[str, Any]) -> str:
    def mb(n: float) -> str:
        return f"{n / 1e6:.2f} MB"

    names = {"features": "features", "codes": "codes", "feature_scales": "scales", "clip_embeddings": "CLIP embeddings",
             "frames": "dense frames"}
    parts = ", ".join(f"{names.get(k, k)} {mb(v)}" for k, v in report["bytes_per_view"].items())
    fit = report["fit"]
    lines = [f"dry run of copy from {report['source']}: nothing was written"]
    if fit:
        lines.append(f"  fit on {len(fit['fit_videos'])} videos ({fit['fit_tokens']} tokens per layer), measured on "
                     f"{len(fit['holdout_videos'])} held-out videos")
    source = f" (the source: {mb(report['source_per_view'])})" if report["source_per_view"] else ""
    lines += [f"  per clip view: {mb(report['total_per_view'])}{source}: {parts}",
              f"  a Kinetics-400-sized store ({K400_VIDEOS:,} videos x {report['views']} view(s)): "
              f"{report['k400_bytes'] / 1e12:.2f} TB"]
    holdout = (fit or {}).get("holdout")
    if holdout:
        lines.append("  layer    K  variance  rel. error  rel. error (no outlier ch.)  cosine mean  cosine min")
        comps, kept = fit.get("components"), fit.get("variance_kept")
        for n, layer in enumerate(report["layers"]):
            k = comps[n] if comps else "-"
            v = f"{kept[n]:.4f}" if kept else "-"
            lines.append(f"  {layer:>5} {k:>4} {v:>9} {holdout['relative'][n]:>10.2%} "
                         f"{holdout['relative_inliers'][n]:>28.2%} {holdout['cosine_mean'][n]:>12.5f} "
                         f"{holdout['cosine_min'][n]:>11.5f}")
    elif fit:
        lines.append("  error not measured: the sample held no video out (the store has too few done videos)")
    return "\n".join(lines)
