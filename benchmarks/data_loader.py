"""Stage-two input rate: clips/s the real loader (pipelines.data.StoreClips + make_loader, spawned workers)
delivers (features + dense frames) vs (a) a plain sequential read of the same feature bytes (the store's
shard files read with open().read(), page cache warm) and (b) decoding + rendering the dense frames alone
(StoreClips.render in this process). ViT-B/16 store --store (default /tmp/b16/b16.zarr), gamma 2.

    python benchmarks/data_loader.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import parse, report  # noqa: E402

STORE = os.environ.get("DIST_BENCH_STORE", "/tmp/b16/b16.zarr")
VIDEO_ROOT = os.environ.get("DIST_BENCH_VIDEOS", "/tmp/b16/videos")


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    device = torch.device(args.device)
    from pipelines.data import EpochSampler, StoreClips, make_loader
    from storage import FeatureStore

    store = FeatureStore.open(STORE)
    n = len(store)
    epochs = 1 if args.quick else 2
    B, workers, gamma = 2, 2, 2
    ds = StoreClips(store, VIDEO_ROOT, gamma, list(store.schema.layers), frames=True)

    # (a) raw sequential read of the feature bytes (every file of the features array)
    files = sorted(f for f in (Path(STORE) / "features").rglob("*") if f.is_file())
    def raw_read() -> tuple[float, int]:
        t0, total = time.perf_counter(), 0
        for f in files:
            with open(f, "rb") as fh:
                total += len(fh.read())
        return time.perf_counter() - t0, total
    raw_read()  # warm the page cache
    t_raw, nbytes = raw_read()
    raw_cps = n / t_raw
    # (a') the same features through FeatureStore.features (zarr), one process
    t0 = time.perf_counter()
    for i in range(n):
        store.features(i)
    zarr_cps = n / (time.perf_counter() - t0)
    # (b) decode + render alone, one process
    t0 = time.perf_counter()
    for i in range(n):
        ds.render(store.sample(i))
    dec_cps = n / (time.perf_counter() - t0)

    # the loader
    sampler = EpochSampler(np.arange(n), store.schema.views_per_video, B, seed=0, train=False)
    loader = make_loader(ds, sampler, workers=workers, device=device)
    sampler.set_epoch(0)
    t_first = time.perf_counter()
    it = iter(loader); next(it)  # worker start-up + first batch, excluded from the rate
    startup = time.perf_counter() - t_first
    clips, t0 = 0, time.perf_counter()
    for b in it:
        clips += len(b["label"])
    for e in range(1, epochs + 1):
        sampler.set_epoch(e)
        for b in loader:
            clips += len(b["label"])
    loader_cps = clips / (time.perf_counter() - t0)
    slower = min(raw_cps, dec_cps)
    ratio = loader_cps / slower
    bottleneck = "decode+render of the dense frames" if dec_cps < raw_cps else "feature read"
    report(
        parameters={"store": STORE, "samples": n, "bytes_per_clip": nbytes // n, "batch": B, "workers": workers,
                    "gamma": gamma, "dense_frames": gamma * store.schema.num_frames, "epochs_timed": epochs + 1,
                    "device": str(device)},
        results={"loader_clips_per_s": round(loader_cps, 3), "loader_startup_s": round(startup, 2),
                 "raw_feature_read_clips_per_s": round(raw_cps, 2),
                 "raw_feature_read_MBps": round(nbytes / t_raw / 1e6, 1),
                 "zarr_feature_read_clips_per_s": round(zarr_cps, 2),
                 "decode_render_alone_clips_per_s_1proc": round(dec_cps, 3),
                 "bottleneck": bottleneck},
        ratio=round(ratio, 3),
        goal=">= 80% of the slower raw rate (min of raw feature read, decode alone)",
        verdict="met" if ratio >= 0.8 else "missed",
    )


if __name__ == "__main__":
    main()
