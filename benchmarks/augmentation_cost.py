"""What caching costs in accuracy: cached K = 1, 2, 4 views, cached K = 2 with feature mixing, and the reference's
re-augmented online training (with and without its pixel mixing), side by side on a generated task where
augmentation matters, compared as a reviewer would: paired per seed, and at equal compute as well as equal steps.

The task (docs/DESIGN.md, "Augmentation and mixing"): the demo's four directions of motion of a square (left,
right, up, down; left is right played backwards, so no single frame shows the class), few training videos, and
held-out test clips unlike any training view: rendered on a larger canvas and cut to an off-centre window (the
square is bigger and elsewhere than in any training crop) and cut in time to part of the motion (training views
span the whole clip), scored on 3 clips per video as a test split is. Views are flipped with p 0.5 and a flipped
left/right view is labelled with its partner (`--flip-label-map`), so flips are real augmentation, not label noise.

Everything runs through the real pipeline (`extract`, `train`, `evaluate`) with the bundled tiny CLIP (random
weights: what is learnt is learnt by DiST's temporal encoder and integration branch). Every mode trains the same
epochs and steps (one view per video per epoch), over the same seeds; seed s seeds both the training and the
extraction of the cached views (so the cached views vary across seeds as the online views do, and the spreads are
comparable). Reported per mode:
- top-1 per seed, mean and half the range;
- paired differences against online --reaugment without mixing (the baseline, always run): per seed, mode minus
  baseline, their mean and range, and on how many seeds the mode was behind;
- compute, counted with the profile's functions (`dist_cache.flops.profile_dist`, 1 multiply-add = 1 FLOP): a
  training step costs 3 x the branch's forward per clip (forward and backward), plus CLIP's forward per clip when
  online; a cached run also paid K CLIP passes over every training video at extraction. Evaluation is the same
  for all and left out;
- equal compute: the baseline retrained with the epochs whose FLOPs match each cached mode's total (extraction
  included), and the paired differences of the cached mode against it.

    python -m benchmarks.augmentation_cost --out benchmarks/results/augmentation_cost.json   # ~10 min, 2 quiet cores
    python -m benchmarks.augmentation_cost --epochs 120 --modes 3,5 --out /tmp/aug-long.json  # mixing, longer
    python -m benchmarks.augmentation_cost --seeds 0,1,2,3,4,5 --out /tmp/aug-6.json         # more seeds
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
from benchmarks._compact_formats import format_store
from dist_cache.backbone import load_backbone
from dist_cache.flops import profile_dist
from dist_cache.model import DiSTSwitches
from dist_cache.synthetic import DIRECTIONS, make_motion_dataset, motion_clip, write_video
from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.train.evaluation import EvalOptions, evaluate
from pipelines.train.run import TrainOptions, train

SIZE = 64  # pixels of every clip, as the demo's
FRAMES, GAMMA = 4, 2  # CLIP frames per view, dense frames per CLIP frame
TEST_CLIPS = 3  # views per test video, as a test split caches them
SWITCHES = DiSTSwitches(gamma=GAMMA, alpha_dim=64, beta_dim=32)


@dataclass(frozen=True)
class Mode:
    name: str
    views: int  # cached views per video (the store trained from)
    extra: dict = field(default_factory=dict)  # TrainOptions for this mode
    # A compact format (benchmarks._compact_formats): the cached store, and the test store, copied to it from fp16
    compact: str | None = None


BASELINE = "online --reaugment, no mixing"  # what the paired differences and equal compute compare against
MODES = (
    Mode("cached K=1", 1),
    Mode("cached K=2", 2),
    Mode("cached K=4", 4),
    Mode("cached K=2 + feature mixup/cutmix", 2, {"feature_mixup": 0.8, "feature_cutmix": 1.0}),
    Mode(BASELINE, 1, {"online": True, "reaugment": True, "mixup": 0.0, "cutmix": 0.0}),
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
    """Training videos (the demo's generator), held-out shifted test clips, their manifests, the flip map; kept
    where a previous run wrote them (the encoder's bytes may differ between runs, and the stores and the online
    runs' checks hold the first run's file sizes)."""
    paths = {"train": root / "train.csv", "test": root / "test.csv", "videos": root / "videos",
             "flips": root / "flips.json"}
    made = root / "made.json"  # what the data was made for, written last: present means complete
    wanted = {"train_per_class": scale.train_per_class, "test_per_class": scale.test_per_class, "frames": frames}
    if made.exists() and json.loads(made.read_text()) == wanted:
        return paths
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
    with paths["test"].open("w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    paths["flips"].write_text(json.dumps([["left", "right"]]))
    made.write_text(json.dumps(wanted))
    return paths


@dataclass(frozen=True)
class Costs:
    """GFLOPs per clip of one view (dist_cache.flops.profile_dist, the study's shapes)."""

    clip: float  # CLIP's forward on the view's sparse frames
    branch: float  # the DiST branch and head, forward

    @classmethod
    def profile(cls) -> Costs:
        parts = profile_dist("dist-tiny", frames=FRAMES, switches=SWITCHES)["gflops_by_part"]
        return cls(clip=parts["clip"], branch=sum(v for k, v in parts.items() if k != "clip"))

    def step(self, online: bool) -> float:
        """One clip of a training step: the branch's forward and backward (3x its forward), and CLIP's forward when
        it runs live (frozen: no backward through it)."""
        return 3 * self.branch + (self.clip if online else 0.0)

    def run(self, mode: Mode, clips_trained: int, train_videos: int) -> dict[str, float]:
        """GFLOPs of a run: its training steps, and for a cached run the K CLIP passes of extraction."""
        online = bool(mode.extra.get("online"))
        extraction = 0.0 if online else mode.views * train_videos * self.clip
        training = clips_trained * self.step(online)
        return {"extraction": extraction, "training": training, "total": extraction + training}


def paired(top1: list[float], baseline: list[float]) -> dict:
    """Per seed, mode minus baseline (same seed: same data, initial weights, batch order)."""
    diffs = [a - b for a, b in zip(top1, baseline)]
    return {"per_seed": diffs, "mean": statistics.fmean(diffs), "min": min(diffs), "max": max(diffs),
            "seeds_behind": sum(d < 0 for d in diffs), "seeds": len(diffs)}


def summary(top1s: list[float]) -> dict:
    return {"top1": top1s, "mean": statistics.fmean(top1s), "spread": (max(top1s) - min(top1s)) / 2,
            "std": statistics.pstdev(top1s)}


def run(scale: Scale, modes: tuple[Mode, ...], workdir: Path, say=print) -> dict:
    data = make_data(workdir / "data", scale, frames=8 * FRAMES)
    train_videos = 4 * scale.train_per_class
    checkpoint = workdir / "dist-tiny-random.pt"
    torch.manual_seed(0)
    torch.save(load_backbone("dist-tiny", "none", allow_random_weights=True).model.state_dict(), checkpoint)
    common = dict(video_root=str(data["videos"]), model="dist-tiny", pretrained=str(checkpoint), frames=FRAMES,
                  decode_workers=1)
    costs = Costs.profile()
    timings: dict[str, float] = {}
    stores = {}
    for seed in scale.seeds:  # the cached views drawn anew for every seed, as the online views are
        for k in sorted({m.views for m in modes}):
            tick = time.monotonic()
            stores[k, seed] = workdir / f"train-k{k}-s{seed}.zarr"
            # Crops keep 50-100 % of the area: at 64 px smaller ones often cut the 12 px square out (the demo's
            # reason).
            extract(ExtractOptions(manifest=str(data["train"]), out=str(stores[k, seed]), views=k, split="train",
                                   scale=(0.5, 1.0), flip_label_map=(("left", "right"),), dense_frames=True,
                                   dense_gamma=GAMMA, seed=seed, **common))
            timings[f"extract K={k} seed {seed}"] = time.monotonic() - tick
    test_store = workdir / "test.zarr"
    extract(ExtractOptions(manifest=str(data["test"]), out=str(test_store), views=TEST_CLIPS, split="test",
                           dense_frames=True, dense_gamma=GAMMA, seed=0, **common))

    def train_and_score(mode: Mode, seed: int, epochs: int, label: str) -> tuple[float, int]:
        tick = time.monotonic()
        out = workdir / "runs" / f"{label.split(' (')[0].replace(' ', '_').replace('/', '-')}-e{epochs}-s{seed}"
        store, test = stores[mode.views, seed], test_store
        if mode.compact:  # the fp16 stores copied to the format, as `copy` makes them (each fitted on its own)
            store, test = format_store(store, mode.compact, workdir), format_store(test_store, mode.compact, workdir)
        result = train(TrainOptions(
            cache=str(store), video_root=str(data["videos"]), out=str(out), epochs=epochs,
            batch_size=scale.batch_size, lr=1e-3, warmup_epochs=1, seed=seed, decode_workers=0,
            pretrained=str(checkpoint), switches=SWITCHES, resume=(out / "last.pt").exists(), **mode.extra),
            progress=False)  # a rerun in the same workdir resumes (a finished run: scored again)
        report = evaluate(EvalOptions(checkpoint=str(result.last), cache=str(test), decode_workers=0))
        say(f"{label} seed {seed}: top-1 {report['top1']:.1%} ({time.monotonic() - tick:.0f} s, {result.steps} steps)")
        return report["top1"], result.steps

    results = {}
    for mode in modes:
        runs = [train_and_score(mode, seed, scale.epochs, mode.name) for seed in scale.seeds]
        steps = runs[-1][1]
        results[mode.name] = {**summary([top1 for top1, _ in runs]), "steps": steps,
                              "gflops": costs.run(mode, steps * scale.batch_size, train_videos)}
    baseline_mode = next(m for m in modes if m.name == BASELINE)
    baseline = results[BASELINE]
    for name, r in results.items():
        if name != BASELINE:
            r["paired_vs_online"] = paired(r["top1"], baseline["top1"])

    # Equal compute: the baseline at the epochs whose FLOPs match each cached mode's total (extraction included).
    steps_per_epoch = baseline["steps"] // scale.epochs
    online_epoch = steps_per_epoch * scale.batch_size * costs.step(online=True)
    at_epochs: dict[int, list[float]] = {}
    equal = {}
    for mode in modes:
        if mode.extra.get("online"):
            continue
        r = results[mode.name]
        epochs = max(1, round(r["gflops"]["total"] / online_epoch))
        if epochs not in at_epochs:
            at_epochs[epochs] = [train_and_score(baseline_mode, seed, epochs, f"{BASELINE} at {epochs} epochs")[0]
                                 for seed in scale.seeds]
        equal[mode.name] = {
            "online_epochs": epochs, "online_steps": epochs * steps_per_epoch,
            "online_gflops": costs.run(baseline_mode, epochs * steps_per_epoch * scale.batch_size,
                                       train_videos)["total"],
            "cached_gflops": r["gflops"]["total"], "online": summary(at_epochs[epochs]),
            "paired_cached_minus_online": paired(r["top1"], at_epochs[epochs]),
        }
    return {"results": results, "equal_compute": equal, "gflops_per_clip": dataclasses.asdict(costs),
            "extract_seconds": timings}


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="a few videos, one epoch, one seed (smoke run)")
    p.add_argument("--out", required=True, help="JSON file to write the results to")
    p.add_argument("--workdir", default=None, help="where videos, stores and runs go (default: a temporary dir)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of every run (default: 40; --quick: 1)")
    p.add_argument("--seeds", default=None, help="comma list of seeds (default: 0,1,2; --quick: 0)")
    p.add_argument("--modes", default=None,
                   help=f"comma list of the modes to run, by position in the table (0-5; default: all); the "
                        f"baseline ({MODES.index(next(m for m in MODES if m.name == BASELINE))}) always runs")
    args = p.parse_args()
    scale = QUICK if args.quick else FULL
    if args.epochs is not None:
        scale = dataclasses.replace(scale, epochs=args.epochs)
    if args.seeds is not None:
        scale = dataclasses.replace(scale, seeds=tuple(int(s) for s in args.seeds.split(",")))
    chosen = set(range(len(MODES))) if args.modes is None else {int(i) for i in args.modes.split(",")}
    modes = tuple(m for i, m in enumerate(MODES) if i in chosen or m.name == BASELINE)
    tick = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="augmentation-cost-") as tmp:
        measured = run(scale, modes, Path(args.workdir or tmp))
    report = {
        "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "parameters": {**scale.__dict__, "frames": FRAMES, "gamma": GAMMA, "test_clips": TEST_CLIPS,
                       "baseline": BASELINE, "extraction_seed": "the training seed",
                       "modes": [m.__dict__ for m in modes]},
        **measured, "total_seconds": time.monotonic() - tick,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    lines = {}
    for name, r in measured["results"].items():
        line = f"{r['mean']:.1%} ± {r['spread']:.1%}, {r['gflops']['total']:.3g} GFLOPs"
        if "paired_vs_online" in r:
            line += f", minus online {r['paired_vs_online']['mean']:+.1%} (per seed {r['paired_vs_online']['min']:+.1%}"
            line += f" to {r['paired_vs_online']['max']:+.1%})"
        if name in measured["equal_compute"]:
            eq = measured["equal_compute"][name]
            line += (f"; at equal FLOPs online {eq['online']['mean']:.1%} ({eq['online_epochs']} epochs), cached minus "
                     f"online {eq['paired_cached_minus_online']['mean']:+.1%}")
        lines[name] = line
    print(json.dumps(lines, indent=1))


if __name__ == "__main__":
    main()
