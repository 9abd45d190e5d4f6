"""StoreWriter.write_video against plain sequential file writes of the same bytes, side by side.

Each round writes N videos' features and CLIP embeddings twice on the same disk from one process: through
the writer (shards with crc32c on every chunk and index, temp file + rename, fp16 finiteness check,
record) and as plain files (open, write, close: one file per array per video). The page cache is flushed
(os.sync, untimed) before each timed block, and the order alternates per round, so neither side inherits
the other's dirty pages. Reported: the median over rounds of plain time / writer time (goal >= 0.8).

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
from storage import StoreWriter
from storage.testing import make_schema, manifest

# ViT-B/16 at T=8, one view: 29 MB of fp16 tokens per video, as extract writes them.
FULL = {"layers": 12, "frames": 8, "tokens": 197, "width": 768, "embed_dim": 512, "videos": 8, "rounds": 5}
QUICK = {"layers": 2, "frames": 4, "tokens": 17, "width": 64, "embed_dim": 32, "videos": 3, "rounds": 2}


def schema_for(p: dict, num_videos: int):
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
    N, rounds = p["videos"], p["rounds"]
    rng = np.random.default_rng(0)
    features = rng.standard_normal((1, p["layers"], p["frames"], p["tokens"], p["width"])).astype(np.float16)
    clip = rng.standard_normal((1, p["frames"], p["embed_dim"])).astype(np.float16)
    plans = [{"sparse_indices": list(range(p["frames"])), "window": 1.0, "crop": [0, 0, 64, 64], "flip": False,
              "grayscale": False}]
    facts = {"num_frames": p["frames"], "fps": 25.0, "width": 64, "height": 64}
    nbytes = N * (features.nbytes + clip.nbytes)

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-store-write-", dir=os.environ.get("DIST_BENCH_TMP")))
    try:
        from storage.schema import StoreSchema

        schema = StoreSchema.from_json(schema_for(p, N * rounds))
        videos, labels, text = manifest(schema)
        writer = StoreWriter.open(str(tmp / "s.zarr"), schema, videos, labels, text)
        (tmp / "plain").mkdir()
        rows = []
        for r in range(rounds):
            times = {}

            def timed_writer() -> None:
                for v in range(r * N, (r + 1) * N):
                    writer.write_video(v, facts, plans, features, clip)

            def timed_plain() -> None:
                for v in range(N):
                    plain_write(tmp / "plain", f"r{r}v{v}", [features, clip])

            order = [("writer", timed_writer), ("plain", timed_plain)]
            for name, fn in (order if r % 2 else order[::-1]):
                os.sync()
                t0 = time.perf_counter()
                fn()
                times[name] = time.perf_counter() - t0
            os.sync()
            for f in (tmp / "plain").iterdir():
                f.unlink()
            rows.append({"writer_MBps": round(nbytes / times["writer"] / 1e6, 1),
                         "plain_MBps": round(nbytes / times["plain"] / 1e6, 1),
                         "ratio": round(times["plain"] / times["writer"], 3)})
        assert writer.finalize()["complete"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratio = round(statistics.median(r["ratio"] for r in rows), 3)
    report(
        parameters={"shape_per_video": list(features.shape[1:]), "bytes_per_round": nbytes, "videos_per_round": N,
                    "rounds": rounds, "tmp_dir": str(tmp.parent), "quick": bool(args.quick)},
        results={"rounds": rows, "writer_MBps_median": statistics.median(r["writer_MBps"] for r in rows),
                 "plain_MBps_median": statistics.median(r["plain_MBps"] for r in rows)},
        ratio=ratio,
        goal="writer >= 0.8 of plain sequential file writes of the same bytes (median over rounds)",
        verdict="met" if ratio >= 0.8 else "not met",
    )


if __name__ == "__main__":
    main()
