"""Stage-two input rate: the training loader (`BatchLoader`) against a plain read of the same bytes,
reader threads against DataLoader worker processes, and stored dense frames against decoding them.

A ViT-B/16-shaped store (12 layers x 8 frames x 197 tokens x 768 fp16: 29 MB per clip, plus 16 dense 224 px
frames, 2.4 MB) is written into --workdir from K400-like clips (benchmarks.decode_pool.k400_like): features are
random, plans, facts and dense frames are real (decoded and rendered as training decodes them). Then, every
pass over the whole store with a warm page cache, side by side in one run:
  * plain read: every shard file of the features and frames arrays, sequentially, open().read();
  * loader, reader threads, stored frames (what `train` does when the store has frames);
  * DataLoader worker processes doing the same per-sample reads (the design it replaces);
  * loader, reader threads, frames decoded by the decode pool (a store without frames);
  * a compact copy of the store (`copy --pca 128 --dtype int8`: int8 PCA codes, 3.3 MB per clip of features)
    read by the loader, against a plain read of its own bytes (codes, scales, frames).

    python -m benchmarks.data_loader [--quick] [--workdir DIR] [--threads N] [--workers N]     (--quick: 2 clips x 2
    views, one round; a smoke run)
"""
from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks._common import parse, report

B16 = dict(image_size=224, patch_size=16, width=768, embed_dim=512, num_layers=12, tokens=197, num_frames=8)
GAMMA = 2


def b16_schema(num_videos: int, views: int, gamma: int | None, jpeg_quality: int | None = None):
    """A ViT-B/16-shaped schema; dense frames at `gamma`, raw, or JPEG at `jpeg_quality`."""
    from storage import StoreSchema
    from storage.testing import make_schema

    spec = make_schema(num_videos=num_videos, views=views, dense_gamma=gamma, jpeg_quality=jpeg_quality).to_json()
    spec.pop("compat", None)
    spec["backbone"].update(model="ViT-B-16", image_size=B16["image_size"], patch_size=B16["patch_size"],
                            width=B16["width"], embed_dim=B16["embed_dim"], num_layers=B16["num_layers"])
    spec.update(layers=list(range(B16["num_layers"])), num_frames=B16["num_frames"], tokens=B16["tokens"],
                width=B16["width"], split="test")
    return StoreSchema.from_json(spec)


def build_store(workdir: Path, videos: int, views: int, seconds: float, gamma: int | None = GAMMA) -> tuple[str, Path]:
    """(store URL, video root): `videos` K400-like clips and a store of their views (frames stored when gamma)."""
    from benchmarks.decode_pool import k400_like
    from dist_cache.decoders import get_decoder
    from dist_cache.paths import file_facts
    from dist_cache.sampling import plan_views
    from pipelines.train.data.dense_frames import decode_view
    from storage import StoreWriter

    root = workdir / "videos"
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{i:03d}.mp4" for i in range(videos)]
    for i, name in enumerate(names):
        if not (root / name).exists():
            k400_like(root / name, seconds, np.random.default_rng(i))
    schema = b16_schema(videos, views, gamma)
    url = str(workdir / f"b16-{videos}x{views}-{seconds:g}s-gamma{gamma or 0}.zarr")
    text = np.random.default_rng(0).standard_normal((schema.num_classes, schema.embed_dim)).astype(np.float32)
    writer = StoreWriter.open(url, schema, names, [i % schema.num_classes for i in range(videos)], text)
    rng = np.random.default_rng(1)
    T, L = schema.num_frames, len(schema.layers)
    for v in writer.pending():
        path = str(root / names[v])
        facts = get_decoder().probe(path)
        plans = plan_views(facts.num_frames, facts.width, facts.height, frames=T, views=views, split="test", seed=0,
                           video_index=v)
        dense = None
        if gamma:
            dense = np.stack([
                decode_view(path, p.to_dict(), gamma, facts.num_frames, schema.image_size, "decord", None, "")
                for p in plans
            ])
        features = rng.standard_normal((views, L, T, schema.tokens, schema.width), dtype=np.float32).astype(np.float16)
        clip = rng.standard_normal((views, T, schema.embed_dim), dtype=np.float32).astype(np.float16)
        writer.write_video(v, {**facts.to_dict(), **file_facts(path, False)}, [p.to_dict() for p in plans], features,
                           clip, frames=dense)
    writer.finalize()
    return url, root


def plain_read(url: str) -> tuple[float, int]:
    """Seconds and bytes to read every shard file of the features (or a compact store's codes and token scales)
    and frames arrays, in one call each, into one reused buffer (as the loader reads into reused slabs: a fresh
    buffer per file would time the kernel's page faults on large shards, not the read)."""
    names = ("features", "codes", "feature_scales", "frames")
    files = sorted(f for name in names if (Path(url) / name).is_dir() for f in (Path(url) / name).rglob("*")
                   if f.is_file())
    buffer = memoryview(bytearray(max((f.stat().st_size for f in files), default=0)))
    start, total = time.perf_counter(), 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            total += fh.readinto(buffer[:f.stat().st_size])
    return time.perf_counter() - start, total


class SampleDataset(Dataset):
    """The per-sample read of the loader, as a Dataset for DataLoader worker processes (spawned: each reopens the
    store from its URL), items collated and sent back through shared memory."""

    def __init__(self, store, gamma: int):
        self.store, self.gamma = store, gamma

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        raw = self.store.read_sample(i)
        return {"features": torch.from_numpy(raw.features),
                "frames": torch.from_numpy(self.store.frames(i, self.gamma)),
                "label": self.store.label(i)}


def _pass_rate(batches, samples: int) -> float:
    start = time.perf_counter()
    for _ in batches():
        pass
    return samples / (time.perf_counter() - start)


def main() -> None:
    args = parse(__doc__.splitlines()[0], lambda p: (
        p.add_argument("--workdir", type=Path, default=Path("/tmp/dist-bench-loader")),
        p.add_argument("--threads", type=int, default=4),
        p.add_argument("--workers", type=int, default=2),
        p.add_argument("--batch", type=int, default=4)))
    from pipelines.train.data.loader import BatchLoader, DecodedFrames, EpochSampler, StoredFrames
    from storage import FeatureStore

    videos, views, seconds = (2, 2, 2.0) if args.quick else (8, 3, 6.0)
    url, video_root = build_store(args.workdir, videos, views, seconds)
    store = FeatureStore.open(url)
    compact_url = build_compact(url)
    compact = FeatureStore.open(compact_url)
    n, device = len(store), torch.device("cpu")
    rounds = 1 if args.quick else 3
    sampler = EpochSampler(np.arange(n), views, args.batch, train=False)

    def loader(frames) -> BatchLoader:
        return BatchLoader(store, sampler, layers=list(store.schema.layers), frames=frames, device=device,
                           read_threads=args.threads)

    threads = loader(StoredFrames(store, GAMMA))
    compact_threads = BatchLoader(compact, sampler, layers=list(compact.schema.layers),
                                  frames=StoredFrames(compact, GAMMA), device=device, read_threads=args.threads)
    decoding = loader(DecodedFrames(store, video_root, GAMMA, workers="auto"))
    processes = DataLoader(SampleDataset(store, GAMMA), batch_size=args.batch, num_workers=args.workers,
                           multiprocessing_context="spawn", persistent_workers=True, prefetch_factor=2)
    for warm in (lambda: plain_read(url), lambda: list(threads), lambda: list(processes), lambda: list(decoding),
                 lambda: plain_read(compact_url), lambda: list(compact_threads)):
        warm()  # page cache, worker start-up, first decodes: not timed
    rates: dict[str, list[float]] = {"plain": [], "threads": [], "processes": [], "decode": [], "compact_plain": [],
                                     "compact_threads": []}
    nbytes = compact_bytes = 0
    for _ in range(rounds):  # interleaved, so machine load hits each alike
        seconds_plain, nbytes = plain_read(url)
        rates["plain"].append(n / seconds_plain)
        rates["threads"].append(_pass_rate(lambda: threads, n))
        rates["processes"].append(_pass_rate(lambda: processes, n))
        rates["decode"].append(_pass_rate(lambda: decoding, n))
        seconds_compact, compact_bytes = plain_read(compact_url)
        rates["compact_plain"].append(n / seconds_compact)
        rates["compact_threads"].append(_pass_rate(lambda: compact_threads, n))
    threads.close()
    decoding.close()
    compact_threads.close()
    median = {k: statistics.median(v) for k, v in rates.items()}
    ratio = median["threads"] / median["plain"]
    compact_ratio = median["compact_threads"] / median["compact_plain"]
    report(
        parameters={"store": url, "samples": n, "bytes_per_clip": nbytes // n, "batch": args.batch,
                    "read_threads": args.threads, "dataloader_workers": args.workers,
                    "decode_workers": decoding.frames.pool.workers if decoding.frames.pool else 0, "gamma": GAMMA,
                    "dense_frames": GAMMA * store.schema.num_frames, "rounds": rounds, "cores": os.cpu_count()},
        results={"clips_per_s": {k: round(v, 2) for k, v in median.items()},
                 "all_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
                 "plain_MBps": round(median["plain"] * nbytes / n / 1e6, 1),
                 "threads_over_processes": round(median["threads"] / median["processes"], 3),
                 "stored_over_decode": round(median["threads"] / median["decode"], 3),
                 "compact_bytes_per_clip": compact_bytes // n,
                 "compact_loader_over_plain": round(compact_ratio, 3),
                 "compact_over_fp16_loader": round(median["compact_threads"] / median["threads"], 3)},
        ratio=round(ratio, 3),
        goal="loader (reader threads, stored frames) >= 80% of a plain read of the same bytes, fp16 and compact",
        verdict="met" if min(ratio, compact_ratio) >= 0.8 else "missed",
    )


def build_compact(url: str) -> str:
    """`dist-cache copy URL URL-pca128-int8 --pca 128 --dtype int8`, fitted on 2 of its videos (one held out)."""
    from pipelines.copy import copy_store

    out = url.removesuffix(".zarr") + "-pca128-int8.zarr"
    copy_store(url, out, pca=128, dtype="int8", pca_sample=2, progress=False)
    return out


if __name__ == "__main__":
    main()
