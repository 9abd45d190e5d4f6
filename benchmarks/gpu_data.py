"""Data for the one-shot GPU measurement (benchmarks/gpu.sh): K400-like clips, a manifest, a ViT checkpoint.

The clips are `benchmarks.decode_pool.k400_like` (340x256, 25 fps H.264, a textured panning scene: decoding costs
what a real clip's does), generated in parallel on every core. The manifest lists each file `--repeat` times, under
distinct names (hard links: a manifest lists each video once), so extraction and training see `videos * repeat` clips
(each row is its own video index, with its own sampled frames and crop) while generation stays short. The
checkpoint is the model's random weights saved as a state dict, the way a user passes `--pretrained PATH`: loading it
is timed like loading real weights.

    python -m benchmarks.gpu_data --out DIR [--videos 64] [--repeat 6] [--seconds 10] [--model ViT-B-16] [--quick]

--quick: 4 clips of 2 s, each listed twice, and the tiny CLIP's checkpoint (what gpu.sh's QUICK=1 passes).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import csv
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

CLASSES = ("abseiling", "bowling", "juggling", "surfing")
# The defaults of --videos, --repeat, --seconds and --model, without and with --quick.
FULL = {"videos": 64, "repeat": 6, "seconds": 10.0, "model": "ViT-B-16"}
QUICK = {"videos": 4, "repeat": 2, "seconds": 2.0, "model": "dist-tiny"}


def _make_clip(path: str, seconds: float, seed: int) -> str:
    from benchmarks.decode_pool import k400_like

    k400_like(Path(path), seconds, np.random.default_rng(seed))
    return path


def make_clips(videos_dir: Path, count: int, seconds: float) -> list[str]:
    """`count` clips named <i>.mp4 under videos_dir, one process per core; returns their names."""
    videos_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:04d}.mp4" for i in range(count)]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        list(pool.map(_make_clip, [str(videos_dir / n) for n in names], [seconds] * count, range(count)))
    return names


def write_manifest(path: Path, videos_dir: Path, names: list[str], repeat: int) -> int:
    """path,label rows: every file `repeat` times (repeats as hard links NAME-r.mp4), labels cycling over CLASSES."""
    rows = []
    for r in range(repeat):
        for i, name in enumerate(names):
            row = name if r == 0 else name.replace(".mp4", f"-{r}.mp4")
            if r:
                (videos_dir / row).unlink(missing_ok=True)
                os.link(videos_dir / name, videos_dir / row)
            rows.append((row, CLASSES[(r * len(names) + i) % len(CLASSES)]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return len(rows)


def save_random_checkpoint(model: str, path: Path) -> None:
    import torch

    from dist_cache.backbone import load_backbone

    torch.manual_seed(0)
    backbone = load_backbone(model, "none", allow_random_weights=True)
    torch.save(backbone.model.state_dict(), path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--videos", type=int, help=f"distinct clips to generate (default {FULL['videos']})")
    p.add_argument("--repeat", type=int, help=f"manifest rows per clip (default {FULL['repeat']})")
    p.add_argument("--seconds", type=float, help=f"seconds per clip (default {FULL['seconds']})")
    p.add_argument("--model", help=f"the checkpoint's model (default {FULL['model']})")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: defaults {QUICK}")
    args = p.parse_args()
    for key, default in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:  # a flag given explicitly wins over either set of defaults
            setattr(args, key, default)
    start = time.perf_counter()
    names = make_clips(args.out / "videos", args.videos, args.seconds)
    generated = time.perf_counter() - start
    rows = write_manifest(args.out / "train.csv", args.out / "videos", names, args.repeat)
    checkpoint = args.out / f"{args.model}-random.pt"
    save_random_checkpoint(args.model, checkpoint)
    print(json.dumps({"videos_dir": str(args.out / "videos"), "manifest": str(args.out / "train.csv"),
                      "rows": rows, "distinct_clips": len(names), "seconds_per_clip": args.seconds,
                      "generate_s": round(generated, 1), "checkpoint": str(checkpoint),
                      "bytes": sum((args.out / "videos" / n).stat().st_size for n in names)}))


if __name__ == "__main__":
    main()
