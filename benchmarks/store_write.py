"""StoreWriter.write_video against plain sequential file writes of the same bytes, side by side.

Every video's features and CLIP embeddings are written twice on the same disk from one process: through
the writer (shards with crc32c on every chunk and index, temp file + rename, fp16 finiteness check,
record) and as plain files (open, write, close: one file per array per video). Each video is one timed
pair, back to back, the order alternating, so a busy machine or the kernel's writeback slows both halves
of a pair alike; dirty pages are flushed (os.sync, untimed) every few pairs. Reported: the median over
pairs of plain time / writer time (goal >= 0.8), and each side's throughput over all pairs.

    python -m benchmarks.store_write [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import parse, report
from storage import StoreSchema, StoreWriter
from storage.testing import make_schema, manifest

# ViT-B/16 at T=8, one view: 29 MB of fp16 tokens per video, as extract writes them.
FULL = {"layers": 12, "frames": 8, "tokens": 197, "width": 768, "embed_dim": 512, "videos": 48}
# Pairs between flushes: 8 x 2 x 29 MB stays far below the kernel's dirty-page limits.
SYNC_EVERY = 8
QUICK = {"layers": 2, "frames": 4, "tokens": 17, "width": 64, "embed_dim": 32, "videos": 4}


def schema_for(p: dict, num_videos: int) -> dict:
    base = make_schema(num_videos=num_videos, views=1, layers=list(range(p["layers"])), num_frames=p["frames"]).to_json()
    base["backbone"].update(width=p["width"], embed_dim=p["embed_dim"], num_layers=p["layers"])
    base.update(tokens=p["tokens"], width=p["width"])
    return base


def plain_write(directory: Path, name: str, arrays: list[np.ndarray]) -> None:
    for j, arr in enumerate(arrays):
        with open(directory / f"{name}.{j}", "wb") as f:
            f.write(arr.data)


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    p = QUICK if args.quick else FULL
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, p["layers"], p["frames"], p["tokens"], p["width"])).astype(np.float16)
    clip = rng.standard_normal((1, p["frames"], p["embed_dim"])).astype(np.float16)
    plans = [{"sparse_indices": list(range(p["frames"])), "window": 1.0, "crop": [0, 0, 64, 64], "flip": False,
              "grayscale": False}]
    facts = {"num_frames": p["frames"], "fps": 25.0, "width": 64, "height": 64}
    nbytes = features.nbytes + clip.nbytes
    load_before = os.getloadavg()[0]

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-store-write-", dir=os.environ.get("DIST_BENCH_TMP")))
    try:
        schema = StoreSchema.from_json(schema_for(p, p["videos"]))
        writer = StoreWriter.open(str(tmp / "s.zarr"), schema, *manifest(schema))
        (tmp / "plain").mkdir()
        times: dict[str, list[float]] = {"writer": [], "plain": []}
        for v in range(p["videos"]):
            if v % SYNC_EVERY == 0:  # untimed: start each group with no dirty pages, and a bounded scratch
                os.sync()
                for f in (tmp / "plain").iterdir():
                    f.unlink()
            sides = [("writer", lambda: writer.write_video(v, facts, plans, features, clip)),
                     ("plain", lambda: plain_write(tmp / "plain", f"v{v}", [features, clip]))]
            for name, fn in (sides if v % 2 else sides[::-1]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        assert writer.finalize()["complete"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = [p_ / w for p_, w in zip(times["plain"], times["writer"])]
    ratio = round(statistics.median(ratios), 3)
    report(
        parameters={"shape_per_video": list(features.shape[1:]), "bytes_per_video": nbytes, "videos": p["videos"],
                    "tmp_dir": str(tmp.parent), "quick": bool(args.quick),
                    # Other processes competing for the cores slow the writer's overlap of checks and writes.
                    "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        results={"writer_MBps": round(nbytes * len(ratios) / sum(times["writer"]) / 1e6, 1),
                 "plain_MBps": round(nbytes * len(ratios) / sum(times["plain"]) / 1e6, 1),
                 "pair_ratio_quartiles": [round(q, 3) for q in statistics.quantiles(ratios, n=4)]},
        ratio=ratio,
        goal="writer >= 0.8 of plain sequential file writes of the same bytes (median over per-video pairs)",
        verdict="met" if ratio >= 0.8 else "not met",
    )


if __name__ == "__main__":
    main()
