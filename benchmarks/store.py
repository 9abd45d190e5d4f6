"""Feature-store size and speed per dtype x codec, written through storage.StoreWriter and read through
storage.FeatureStore, on real ViT-B/16 tokens (the samples of --store, default /tmp/b16/b16.zarr).

Reports bytes per clip on disk, write MB/s (logical fp16 MB, without and with os.sync) and read MB/s
(whole samples, page cache warm: not a cold disk read), and the int8 reconstruction error.

    python -m benchmarks.store [--device cpu|cuda] [--quick]

--quick rewrites one video of a small generated store (tiny CLIP shapes, random tokens) instead: a smoke run.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import parse, report

STORE = os.environ.get("DIST_BENCH_STORE", "/tmp/b16/b16.zarr")


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def source_store(quick: bool, tmp: Path) -> str:
    """The store whose samples are rewritten: DIST_BENCH_STORE, or with --quick a small generated one in `tmp`."""
    if not quick:
        return STORE
    from storage.testing import make_schema, write_videos

    url = str(tmp / "source.zarr")
    write_videos(url, make_schema(num_videos=1, views=2), [0], finalize=True)
    return url


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    from storage import FeatureStore, StoreWriter

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-store-", dir=os.environ.get("DIST_BENCH_TMP")))
    source = source_store(args.quick, tmp)
    src = FeatureStore.open(source)
    K = src.schema.views_per_video
    nvid = 1 if args.quick else src.schema.num_videos
    videos = [src.videos[v] for v in range(nvid)]
    labels = [int(src.labels[v]) for v in range(nvid)]
    feats = [np.stack([src.features(v * K + k) for k in range(K)]) for v in range(nvid)]  # (K, L, T, N+1, C) fp16
    embeds = [np.stack([src.clip_embeddings(v * K + k) for k in range(K)]) for v in range(nvid)]
    recs = [src.record(v) for v in range(nvid)]
    clips = nvid * K
    logical = sum(f.nbytes for f in feats)  # fp16 bytes
    base = dataclasses.replace(src.schema, num_videos=nvid, videos_sha256=None)

    rows = {}
    try:
        for dtype in ("fp16", "int8"):
            for codec in ("none", "zstd", "blosc-zstd", "blosc-lz4"):
                name = f"{dtype}/{codec}"
                path = tmp / f"{dtype}-{codec}.zarr"
                schema = dataclasses.replace(base, dtype=dtype, codec=codec)
                w = StoreWriter.open(str(path), schema=schema, videos=videos, labels=labels,
                                     text_features=np.asarray(src.text_features))
                t0 = time.perf_counter()
                for v in range(nvid):
                    w.write_video(v, facts=recs[v].facts, plans=[view.plan() for view in recs[v].views],
                                  features=feats[v], clip_embeds=embeds[v])
                t_write = time.perf_counter() - t0
                os.sync()
                t_sync = time.perf_counter() - t0
                w.finalize()
                scales = path / "feature_scales"
                feat_bytes = du(path / "features") + (du(scales) if scales.exists() else 0)
                r = FeatureStore.open(str(path))
                reads = []
                err_num = err_den = 0.0
                for rep in range(2):  # first pass right after write (+sync), second warm
                    t0 = time.perf_counter()
                    for i in range(clips):
                        x = r.features(i)
                        if rep == 0 and dtype == "int8":
                            ref = feats[i // K][i % K].astype(np.float32)
                            err_num += float(((x.astype(np.float32) - ref) ** 2).sum())
                            err_den += float((ref ** 2).sum())
                    reads.append(time.perf_counter() - t0)
                rows[name] = {
                    "feature_bytes_per_clip": feat_bytes // clips,
                    "mb_per_clip": round(feat_bytes / clips / 1e6, 2),
                    "ratio_vs_fp16_raw": round(logical / feat_bytes, 3),
                    "write_MBps": round(logical / t_write / 1e6, 1),
                    "write_sync_MBps": round(logical / t_sync / 1e6, 1),
                    "read_first_MBps": round(logical / reads[0] / 1e6, 1),
                    "read_warm_MBps": round(logical / reads[1] / 1e6, 1),
                    "read_ms_per_clip": round(reads[1] / clips * 1e3, 1),
                }
                if dtype == "int8":
                    rows[name]["int8_rel_frobenius_error"] = round((err_num / err_den) ** 0.5, 5)
                shutil.rmtree(path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    smallest = min(rows, key=lambda k: rows[k]["feature_bytes_per_clip"])
    report(
        parameters={"source": source, "clips": clips, "shape_per_clip": list(feats[0].shape[1:]),
                    "logical_fp16_bytes_per_clip": logical // clips, "tmp_dir": str(tmp.parent)},
        results=rows,
        ratio={k: v["ratio_vs_fp16_raw"] for k, v in rows.items()},
        goal="informational: bytes per clip, MB/s and int8 error per dtype x codec",
        verdict=f"smallest: {smallest} ({rows[smallest]['mb_per_clip']} MB/clip); "
                f"fastest warm read: {max(rows, key=lambda k: rows[k]['read_warm_MBps'])}",
    )


if __name__ == "__main__":
    main()
