"""Peak RSS of stage-two training over stores of 50, 200 and 800 tiny clips (dist-tiny CLIP, generated
64 px H.264 videos, one view each). Each training run (1 epoch, batch 16, 2 decode workers) runs in its own
subprocess, which reports ru_maxrss of itself and of its (waited-for) children, i.e. the decode workers.
Flat = the largest store's peak within 10 % of the smallest's.

    python -m benchmarks.memory [--device cpu|cuda] [--quick]     (--quick: 8 and 16 clips, batch 4; a smoke run)
"""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks._common import parse, report

CHILD = r"""
import json, resource, sys
from pipelines.train.run import TrainOptions, train
r = train(TrainOptions(cache=sys.argv[1], video_root=sys.argv[2], out=sys.argv[3], epochs=1,
                       batch_size=int(sys.argv[5]), decode_workers=2, device=sys.argv[4], warmup_epochs=0),
          progress=False)
import gc; gc.collect()
print(json.dumps({"self_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "steps": r.steps}))
"""


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    from dist_cache.synthetic import make_motion_dataset
    from pipelines.extract.extractor import ExtractOptions, extract

    sizes, batch = ([8, 16], 4) if args.quick else ([50, 200, 800], 16)
    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-memory-"))
    repo = str(Path(__file__).resolve().parents[1])
    rows = {}
    try:
        data = make_motion_dataset(tmp / "data", videos_per_class=max(sizes) // 4, num_frames=32)
        all_rows = []
        for split in ("train", "val"):
            with open(data / f"{split}.csv") as f:
                all_rows += list(csv.reader(f))[1:]
        all_rows.sort(key=lambda r: (int(r[0].split("/")[1].split(".")[0]), r[0]))  # interleave classes
        for n in sizes:
            man = tmp / f"m{n}.csv"
            with open(man, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["path", "label"])
                w.writerows(all_rows[:n])
            store = tmp / f"s{n}.zarr"
            extract(ExtractOptions(manifest=str(man), video_root=str(data / "videos"), out=str(store),
                                   model="dist-tiny",
                                   pretrained="none", allow_random_weights=True, views=1, split="train",
                                   device=args.device), progress=False)
            # run from the repository's root, whose packages `python -c` then imports
            out = subprocess.run([sys.executable, "-c", CHILD, str(store), str(data / "videos"), str(tmp / f"run{n}"),
                                  args.device, str(batch)], capture_output=True, text=True, check=True, cwd=repo)
            rows[str(n)] = json.loads(out.stdout.strip().splitlines()[-1])
            rows[str(n)]["store_mb"] = round(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e6, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first, last = rows[str(sizes[0])], rows[str(sizes[-1])]
    ratio = {"main": round(last["self_maxrss_mb"] / first["self_maxrss_mb"], 3),
             "workers": round(last["children_maxrss_mb"] / first["children_maxrss_mb"], 3)}
    report(parameters={"clips": sizes, "model": "dist-tiny", "epochs": 1, "batch": batch, "workers": 2,
                       "device": args.device},
           results=rows, ratio=ratio, goal="peak RSS flat in store size (largest / smallest <= 1.10)",
           verdict="met" if max(ratio.values()) <= 1.10 else "missed")


if __name__ == "__main__":
    main()
