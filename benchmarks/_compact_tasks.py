"""The compact-store study's two accuracy tasks and the runs that compare formats on them (benchmarks.compact).

* motion: the demo's four directions of motion, in the augmentation study's setting (benchmarks.augmentation_cost:
  8 training videos per class, test clips framed and timed unlike any training view, 3 clips per test video), with
  the bundled tiny CLIP (random weights). The dense frames solve it (the temporal encoder), so it shows what JPEG
  frames cost and whether compact features hurt a model that does not depend on them.
* appearance: six hue classes whose hue ranges overlap (a shape over a random textured background), trained with
  the temporal branch off: only the cached CLIP features can solve it, so feature damage shows. The overlap sets the
  ceiling (about 75 %), not the optimiser, and the data are large enough (80 videos x 2 views per class) for the
  runs to agree across seeds. CLIP is a random-weight ViT of ViT-B/16's width (768, patch 16) made cheap (4 blocks,
  96 px frames: 37 tokens), so a PCA of K components out of 768 means what it means for ViT-B/16.

Formats are compared as `copy` makes them: the fp16 train and test stores are copied to each format (each copy
fitted on its own store, as `copy --pca` and `extract --pca` fit), the same runs (seeds, schedule, branch) are
trained on each, and each is scored on its format's test store. Seed s seeds the training and the extraction of
the training views, so a format's paired difference against fp16 (same seed) isolates what the format changed.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import augmentation_cost as aug
from benchmarks._compact_formats import format_store
from dist_cache.synthetic import write_video

# ---------------------------------------------------------------- the appearance task
# The class is the hue of a shape: six classes centred 60 degrees apart, each drawn from +-40 degrees of its centre,
# so neighbours overlap by 20 degrees on each side and about a quarter of the clips cannot be told apart by anyone
# (the task's ceiling is ~75 %: its difficulty is in the data, far from chance and from 100 %, where a loss shows).
# Saturation, brightness, shape (square or disc), size (60-90 % of the frame across), place and drift, and the
# background's colour and texture are drawn per clip. One word per class: with a random-weight text tower, names
# sharing tokens get near-identical text embeddings (cosine ~0.97), which the cosine logits can hardly tell apart;
# these six stay below 0.8.
# The first take of this task (32 training videos x 1 view per class, hues +-20 degrees, small textured shapes, 20 %
# greyscale training views, lr 3e-3 at batch 16) over-fitted: train accuracy ~100 %, test 46-77 % over six seeds, and
# a seed moved 5-16 points when the same values were stored another way (benchmarks/RESULTS.md, "compact").
APPEARANCE_CLASSES = ("red", "yellow", "green", "cyan", "blue", "magenta")
APPEARANCE_SIZE = 96  # pixels of every clip and of the model's input
APPEARANCE_FRAMES = 4  # CLIP frames per view
HUE_JITTER = 40.0  # degrees either side of a class's centre (the centres are 60 apart)

# A random-weight ViT of ViT-B/16's width and patch, made cheap: 4 blocks at 96 px (36 patches + class token); a
# text tower as small as dist-tiny's (only its class embeddings are stored). Written next to the data and passed to
# extract as `--model PATH.json` (open_clip model config).
B16_WIDTH_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": APPEARANCE_SIZE, "layers": 4, "width": 768, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
B16_WIDTH_NAME = "vit-b16-width-4x96"


def _blocky(rng: np.random.Generator, size: int, cells: int, colour: np.ndarray, amplitude: float) -> np.ndarray:
    noise = rng.uniform(-amplitude, amplitude, size=(cells, cells, 1))
    reps = -(-size // cells)
    return np.kron(noise, np.ones((reps, reps, 1)))[:size, :size] + colour


def _hsv(hue: float, saturation: float, value: float) -> np.ndarray:
    """RGB in 0-255 of a hue in degrees, saturation and value in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + hue / 60.0) % 6
    return 255 * value * (1 - saturation * np.clip(np.minimum(k, 4 - k), 0, 1))


def appearance_clip(rng: np.random.Generator, label: int, size: int = APPEARANCE_SIZE, frames: int = 16,
                    hue_jitter: float = HUE_JITTER, saturation: tuple[float, float] = (0.4, 0.8),
                    radius: tuple[float, float] = (0.3, 0.45)) -> np.ndarray:
    """uint8 frames (frames, size, size, 3): a shape (square or disc) whose hue is its class's centre +- hue_jitter
    degrees, drifting slowly over a random textured background. Its saturation, brightness, size (`radius` times
    the frame: its half-width), place and drift are drawn per clip, the background's colour is any colour, and
    every frame has fresh sensor noise (more on the shape: its colour is not one flat value)."""
    hue = 60.0 * label + rng.uniform(-hue_jitter, hue_jitter)
    base = _hsv(hue, rng.uniform(*saturation), rng.uniform(0.45, 0.9))
    background = _blocky(rng, size, 6, rng.uniform(40, 215, 3), 45) + _blocky(rng, size, 24, 0.0, 20)
    r = rng.uniform(*radius) * size
    square = bool(rng.random() < 0.5)
    start = rng.uniform(r + 1, size - r - 1, 2)
    drift = rng.uniform(-0.25, 0.25, 2) * r
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cx, cy = np.clip(start + drift * (t / max(1, frames - 1) - 0.5), r + 1, size - r - 1)
        dx, dy = xx - cx, yy - cy
        mask = (np.maximum(abs(dx), abs(dy)) <= r) if square else (dx ** 2 + dy ** 2 <= r ** 2)
        frame = background + rng.normal(0, 4, background.shape)
        frame[mask] = base + rng.normal(0, 6, (int(mask.sum()), 3))
        out[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def make_appearance_dataset(root: Path, train_per_class: int, test_per_class: int) -> dict[str, Path]:
    """root/videos/{train,test}/<class>/<i>.mp4, train.csv and test.csv (kept if already there), the model config
    and its random weights (seeded)."""
    videos = root / "videos"
    manifests = {}
    for split, count, stream in (("train", train_per_class, 0), ("test", test_per_class, 1)):
        rows = []
        for ci, name in enumerate(APPEARANCE_CLASSES):
            (videos / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rel = f"{split}/{name}/{i}.mp4"
                if not (videos / rel).exists():
                    clip = appearance_clip(np.random.default_rng([stream, ci, i]), ci)
                    write_video(videos / rel, clip, 16)
                rows.append((rel, name))
        manifests[split] = root / f"{split}.csv"
        with manifests[split].open("w", newline="") as f:
            csv.writer(f).writerows([("path", "label"), *rows])
    return {**manifests, "videos": videos}


def random_backbone(root: Path, model: str) -> tuple[str, Path]:
    """(the model as extract takes it, a checkpoint of its random weights, seeded): dist-tiny, or the ViT-B/16-width
    config written to root."""
    from dist_cache.backbone import load_backbone

    if model == B16_WIDTH_NAME:
        config = root / f"{B16_WIDTH_NAME}.json"
        config.write_text(json.dumps(B16_WIDTH_CONFIG))
        model = str(config)
    checkpoint = root / f"{Path(model).stem}-random.pt"
    if not checkpoint.exists():
        torch.manual_seed(0)
        torch.save(load_backbone(model, "none", allow_random_weights=True).model.state_dict(), checkpoint)
    return model, checkpoint


# ---------------------------------------------------------------- runs
@dataclass(frozen=True)
class Task:
    """One accuracy task: its fp16 training store per seed, its fp16 test store, and how its runs train."""

    name: str
    train_stores: dict[int, Path]  # seed -> fp16 store (its views drawn with that seed)
    test_store: Path
    video_root: str
    pretrained: str
    switches: object  # DiSTSwitches
    epochs: int
    batch_size: int
    lr: float = 1e-3


def appearance_task(workdir: Path, seeds: list[int], train_per_class: int, test_per_class: int, epochs: int,
                    views: int = 2, alpha_dim: int = 64, lr: float = 2e-3, batch_size: int = 32) -> Task:
    """The appearance task's stores (`views` views per training video, drawn per seed; 1 centre clip per test
    video), temporal off. No greyscale training views: a grey view of a hue class carries no label (the first
    take's 20 % were label noise)."""
    from dist_cache.model import DiSTSwitches
    from pipelines.extract.extractor import ExtractOptions, extract

    data = make_appearance_dataset(workdir / "data", train_per_class, test_per_class)
    model, checkpoint = random_backbone(workdir, B16_WIDTH_NAME)
    common = dict(video_root=str(data["videos"]), model=model, pretrained=str(checkpoint),
                  frames=APPEARANCE_FRAMES, decode_workers=1)
    train_stores = {}
    for seed in seeds:
        train_stores[seed] = workdir / f"appearance-train-k{views}-s{seed}.zarr"
        extract(ExtractOptions(manifest=str(data["train"]), out=str(train_stores[seed]), views=views, split="train",
                               scale=(0.6, 1.0), grayscale_p=0.0, seed=seed, **common), progress=False)
    test_store = workdir / "appearance-test.zarr"
    extract(ExtractOptions(manifest=str(data["test"]), out=str(test_store), views=1, split="test", seed=0, **common),
            progress=False)
    return Task("appearance", train_stores, test_store, str(data["videos"]), str(checkpoint),
                DiSTSwitches(gamma=2, alpha_dim=alpha_dim, beta_dim=32, temporal=False), epochs, batch_size, lr)


def motion_task(workdir: Path, seeds: list[int], test_per_class: int, epochs: int, views: int = 2) -> Task:
    """The augmentation study's motion task (its data, views and branch), `views` cached views per training video,
    3 clips per test video, with dense frames stored (gamma 2) so that `+jpeg` formats apply."""
    from pipelines.extract.extractor import ExtractOptions, extract

    scale = aug.Scale(train_per_class=8, test_per_class=test_per_class, epochs=epochs, batch_size=8,
                      seeds=tuple(seeds))
    data = aug.make_data(workdir / "data", scale, frames=8 * aug.FRAMES)
    model, checkpoint = random_backbone(workdir, "dist-tiny")
    common = dict(video_root=str(data["videos"]), model=model, pretrained=str(checkpoint), frames=aug.FRAMES,
                  decode_workers=1, dense_frames=True, dense_gamma=aug.GAMMA)
    train_stores = {}
    for seed in seeds:
        train_stores[seed] = workdir / f"motion-train-k{views}-s{seed}.zarr"
        extract(ExtractOptions(manifest=str(data["train"]), out=str(train_stores[seed]), views=views, split="train",
                               scale=(0.5, 1.0), flip_label_map=(("left", "right"),), seed=seed, **common),
                progress=False)
    test_store = workdir / "motion-test.zarr"
    extract(ExtractOptions(manifest=str(data["test"]), out=str(test_store), views=aug.TEST_CLIPS, split="test",
                           seed=0, **common), progress=False)
    return Task("motion", train_stores, test_store, str(data["videos"]), str(checkpoint), aug.SWITCHES, epochs,
                batch_size=8)


def compare_formats(task: Task, formats: list[str], workdir: Path, say: Callable[[str], None] = print) -> dict:
    """Train and score every format on every seed; per format: top-1 per seed, mean, the paired differences to
    fp16 (per seed, mean, range, seeds behind), bytes per clip view of its training store as stored, and the fit's
    recorded held-out error per layer.

    Beside it, `fp16_model`: each seed's fp16-trained model scored on the format's test store, paired with its
    score on the fp16 test store. The same weights read both, so this isolates what the format does to the features
    a model reads; training on a format also changes the run's path, and a run that is sensitive to small changes
    of its inputs (as a small task's often is) spreads the trained models' paired differences far wider."""
    from pipelines.compact import jpeg_frame_bytes, sample_bytes
    from pipelines.train.evaluation import EvalOptions, evaluate
    from pipelines.train.run import TrainOptions, train
    from storage import FeatureStore, frames_codec, layout

    def score(checkpoint: Path, test: Path) -> float:
        return evaluate(EvalOptions(checkpoint=str(checkpoint), cache=str(test), video_root=task.video_root,
                                    decode_workers=0))["top1"]

    results: dict[str, dict] = {}
    fp16_models: dict[int, Path] = {}
    for name in ["fp16", *[f for f in formats if f != "fp16"]]:
        test = format_store(task.test_store, name, workdir)
        top1, fp16_model = [], []
        for seed, fp16_train in task.train_stores.items():
            store = format_store(fp16_train, name, workdir)
            run = workdir / "runs" / f"{task.name}-{name.replace('+', '-')}-s{seed}"
            done = train(TrainOptions(cache=str(store), video_root=task.video_root, out=str(run), epochs=task.epochs,
                                      batch_size=task.batch_size, lr=task.lr, warmup_epochs=1, seed=seed,
                                      decode_workers=0, pretrained=task.pretrained, switches=task.switches,
                                      resume=(run / "last.pt").exists()), progress=False)
            top1.append(score(done.last, test))
            if name == "fp16":
                fp16_models[seed] = done.last
            else:
                fp16_model.append(score(fp16_models[seed], test))
            say(f"{task.name} {name} seed {seed}: top-1 {top1[-1]:.2%}"
                + (f" (the fp16 model on it: {fp16_model[-1]:.2%})" if fp16_model else ""))
        opened = FeatureStore.open(store)
        fit = (opened.schema.encoding or {}).get("fit") or {}
        per_view = sample_bytes(opened.schema)
        frames = opened.schema.frames_format
        if frames is not None and frames[0] == frames_codec.JPEG:
            per_view[layout.FRAMES] = jpeg_frame_bytes(opened, frames[1])  # as stored: it varies with the content
        results[name] = {"top1": top1, "mean": statistics.fmean(top1), "bytes_per_view": per_view,
                         "components": fit.get("components"), "variance_kept": fit.get("variance_kept"),
                         "holdout": fit.get("holdout")}
        if fp16_model:
            results[name]["fp16_model"] = {"top1": fp16_model, "mean": statistics.fmean(fp16_model)}
    for r in results.values():
        r["paired_vs_fp16"] = aug.paired(r["top1"], results["fp16"]["top1"])
        if "fp16_model" in r:
            r["fp16_model"]["paired_vs_fp16"] = aug.paired(r["fp16_model"]["top1"], results["fp16"]["top1"])
    return results

