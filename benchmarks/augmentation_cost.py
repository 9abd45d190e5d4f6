"""What caching costs in accuracy: cached K = 1, 2, 4 views, cached K = 2 with feature mixing, and the reference's
re-augmented online training (with and without its pixel mixing), side by side on a generated task where
augmentation matters.

The task (docs/DESIGN.md, "Augmentation and mixing"): the demo's four directions of motion of a square (left,
right, up, down; left is right played backwards, so no single frame shows the class), few training videos, and
held-out test clips unlike any training view: rendered on a larger canvas and cut to an off-centre window (the
square is bigger and elsewhere than in any training crop) and cut in time to part of the motion (training views
span the whole clip). Views are flipped with p 0.5 and a flipped left/right view is labelled with its partner
(`--flip-label-map`), so flips are real augmentation, not label noise.

Everything runs through the real pipeline (`extract`, `train`, `evaluate`) with the bundled tiny CLIP (random
weights: what is learnt is learnt by DiST's temporal encoder and integration branch). Every mode trains the same
epochs and steps (one view per video per epoch), over the same seeds.

    python -m benchmarks.augmentation_cost --out benchmarks/results/augmentation_cost.json   # ~5 min on 2 quiet cores
    python -m benchmarks.augmentation_cost --epochs 120 --modes 4,5 --out /tmp/aug-long.json  # mixing, longer
    python -m benchmarks.augmentation_cost --quick --out /tmp/aug.json                       # smoke run
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks._common import machine
from dist_cache.backbone import load_backbone
from dist_cache.model import DiSTSwitches
from dist_cache.synthetic import DIRECTIONS, make_motion_dataset, motion_clip, write_video
from pipelines.evaluate import EvalOptions, evaluate
from pipelines.extract import ExtractOptions, extract
from pipelines.train import TrainOptions, train

SIZE = 64  # pixels of every clip, as the demo's


@dataclass(frozen=True)
class Mode:
    name: str
    views: int  # cached views per video (the store trained from)
    extra: dict = field(default_factory=dict)  # TrainOptions for this mode


MODES = (
    Mode("cached K=1", 1),
    Mode("cached K=2", 2),
    Mode("cached K=4", 4),
    Mode("cached K=2 + feature mixup/cutmix", 2, {"feature_mixup": 0.8, "feature_cutmix": 1.0}),
    Mode("online --reaugment, no mixing", 1, {"online": True, "reaugment": True, "mixup": 0.0, "cutmix": 0.0}),
    Mode("online --reaugment (mixup 0.8, cutmix 1.0)", 1, {"online": True, "reaugment": True}),
)


@dataclass(frozen=True)
class Scale:
    train_per_class: int
    test_per_class: int
    epochs: int
    batch_size: int
    seeds: tuple[int, ...]


FULL = Scale(train_per_class=8, test_per_class=16, epochs=40, batch_size=8, seeds=(0, 1, 2))
QUICK = Scale(train_per_class=2, test_per_class=1, epochs=1, batch_size=4, seeds=(0,))


def shifted_clip(rng: np.random.Generator, direction: str, frames: int) -> np.ndarray:
    """A test clip unlike any training view: the motion on a 1.5x canvas, cut to an off-centre SIZE * 1.125
    window and resized to SIZE (the square ~1.3x the training size, anywhere), and cut in time to a random 60 %
    of the motion."""
    canvas, window = SIZE * 3 // 2, SIZE * 9 // 8
    long = round(frames / 0.6)
    clip, _ = motion_clip(rng, direction, canvas, long, high_contrast=True)
    t0 = int(rng.integers(0, long - frames + 1))
    x0, y0 = (int(v) for v in rng.integers(0, canvas - window + 1, size=2))
    cut = torch.from_numpy(clip[t0 : t0 + frames, y0 : y0 + window, x0 : x0 + window]).permute(0, 3, 1, 2)
    resized = F.interpolate(cut, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def make_data(root: Path, scale: Scale, frames: int) -> dict[str, Path]:
    """Training videos (the demo's generator), held-out shifted test clips, their manifests, the flip map."""
    # make_motion_dataset keeps a quarter of each class (at least one) for val: ask for enough to train on as many.
    per_class = next(n for n in range(2, 4 * scale.train_per_class)
                     if n - max(1, round(n / 4)) == scale.train_per_class)
    make_motion_dataset(root, videos_per_class=per_class, num_frames=frames, seed=0, high_contrast=True)
    rows = []
    for ci, name in enumerate(DIRECTIONS):
        (root / "videos" / "test" / name).mkdir(parents=True, exist_ok=True)
        for i in range(scale.test_per_class):
            rel = f"test/{name}/{i}.mp4"
            write_video(root / "videos" / rel, shifted_clip(np.random.default_rng([7, ci, i]), name, frames), 16)
            rows.append((rel, name))
    test = root / "test.csv"
    with test.open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    flips = root / "flips.json"
    flips.write_text(json.dumps([["left", "right"]]))
    return {"train": root / "train.csv", "test": test, "videos": root / "videos", "flips": flips}


def run(scale: Scale, modes: tuple[Mode, ...], workdir: Path, say=print) -> dict:
    frames, gamma = 4, 2
    data = make_data(workdir / "data", scale, frames=8 * frames)
    checkpoint = workdir / "dist-tiny-random.pt"
    torch.manual_seed(0)
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), checkpoint)
    common = dict(video_root=str(data["videos"]), model="dist-tiny", pretrained=str(checkpoint), frames=frames,
                  seed=0, decode_workers=1)
    timings: dict[str, float] = {}
    stores = {}
    for k in sorted({m.views for m in modes}):
        tick = time.monotonic()
        stores[k] = workdir / f"train-k{k}.zarr"
        # Crops keep 50-100 % of the area: at 64 px smaller ones often cut the 12 px square out (the demo's reason).
        extract(ExtractOptions(manifest=str(data["train"]), out=str(stores[k]), views=k, split="train",
                               scale=(0.5, 1.0), flip_label_map=(("left", "right"),), dense_frames=True,
                               dense_gamma=gamma, **common))
        timings[f"extract K={k}"] = time.monotonic() - tick
    test_store = workdir / "test.zarr"
    extract(ExtractOptions(manifest=str(data["test"]), out=str(test_store), views=2, split="test", dense_frames=True,
                           dense_gamma=gamma, **common))
    results = {}
    for mode in modes:
        top1s, seconds = [], []
        for seed in scale.seeds:
            tick = time.monotonic()
            out = workdir / "runs" / f"{mode.name.split(' (')[0].replace(' ', '_').replace('/', '-')}-s{seed}"
            result = train(TrainOptions(
                cache=str(stores[mode.views]), video_root=str(data["videos"]), out=str(out), epochs=scale.epochs,
                batch_size=scale.batch_size, lr=1e-3, warmup_epochs=1, seed=seed, decode_workers=0,
                pretrained=str(checkpoint), switches=DiSTSwitches(gamma=gamma, alpha_dim=64, beta_dim=32),
                **mode.extra), progress=False)
            report = evaluate(EvalOptions(checkpoint=str(result.last), cache=str(test_store), decode_workers=0))
            top1s.append(report["top1"])
            seconds.append(time.monotonic() - tick)
            say(f"{mode.name} seed {seed}: top-1 {report['top1']:.1%} ({seconds[-1]:.0f} s, {result.steps} steps)")
        results[mode.name] = {
            "top1": top1s, "mean": statistics.fmean(top1s),
            "spread": (max(top1s) - min(top1s)) / 2, "std": statistics.pstdev(top1s),
            "steps": result.steps, "seconds_per_run": statistics.fmean(seconds),
        }
    return {"results": results, "extract_seconds": timings}


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="a few videos, one epoch, one seed (smoke run)")
    p.add_argument("--out", required=True, help="JSON file to write the results to")
    p.add_argument("--workdir", default=None, help="where videos, stores and runs go (default: a temporary dir)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: 40; --quick: 1)")
    p.add_argument("--modes", default=None,
                   help="comma list of the modes to run, by position in the table (0-5; default: all)")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    if args.epochs is not None:
        scale = dataclasses.replace(scale, epochs=args.epochs)
    modes = MODES if args.modes is None else tuple(MODES[int(i)] for i in args.modes.split(","))
    tick = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="augmentation-cost-") as tmp:
        measured = run(scale, modes, Path(args.workdir or tmp))
    report = {
        "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": {**scale.__dict__, "frames": 4, "gamma": 2, "modes": [m.__dict__ for m in modes]},
        **measured, "total_seconds": time.monotonic() - tick,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({name: f"{r['mean']:.1%} ± {r['spread']:.1%}" for name, r in measured["results"].items()},
                     indent=1))


if __name__ == "__main__":
    main()
