"""The compact-store study's two accuracy tasks and the runs that compare formats on them (benchmarks.compact).

* motion: the demo's four directions of motion, in the augmentation study's setting (benchmarks.augmentation_cost:
  8 training videos per class, test clips framed and timed unlike any training view, 3 clips per test video), with
  the bundled tiny CLIP (random weights). The dense frames solve it (the temporal encoder), so it shows what JPEG
  frames cost and whether compact features hurt a model that does not depend on them.
* appearance: classes a single frame tells (a shape and the texture on it, in a random colour over a random
  textured background), trained with the temporal branch off: only the cached CLIP features can solve it, so
  feature damage shows. CLIP is a random-weight ViT of ViT-B/16's width (768, patch 16) made cheap (4 blocks,
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
# The class is the hue of a shape (the colour circle in six 60-degree sectors); its saturation, brightness and
# texture, its shape, size and place, and the background are drawn per clip. One word per class: with a
# random-weight text tower, names sharing tokens get near-identical text embeddings (cosine ~0.97), which the cosine
# logits can hardly tell apart; these six stay below 0.8. (Texture classes were tried first: a random-weight ViT's
# pooled tokens do not tell stripes from checks, linearly or through the branch, at this scale.)
APPEARANCE_CLASSES = ("red", "yellow", "green", "cyan", "blue", "magenta")
TEXTURES = ("plain", "stripes", "checks", "dots")
APPEARANCE_SIZE = 96  # pixels of every clip and of the model's input
APPEARANCE_FRAMES = 4  # CLIP frames per view

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
                    saturation: tuple[float, float] = (0.25, 0.7)) -> np.ndarray:
    """uint8 frames (frames, size, size, 3): a shape (square or disc) whose hue is the class's (its sector's centre
    +- 20 degrees), drifting slowly over a random textured background. The shape's saturation (`saturation`: the
    task's difficulty, grey shapes are hard to tell apart), brightness, texture (plain, stripes, checks or dots in
    two shades of its colour), size (a quarter to two fifths of the frame), place and drift are drawn per clip, and
    the background's colour is any colour."""
    hue = 60.0 * label + rng.uniform(-20, 20)
    sat, value = rng.uniform(*saturation), rng.uniform(0.45, 0.9)
    base, other = _hsv(hue, sat, value), _hsv(hue, sat, value * rng.uniform(0.6, 0.8))
    texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
    square = bool(rng.random() < 0.5)
    background = _blocky(rng, size, 6, rng.uniform(40, 215, 3), 45) + _blocky(rng, size, 24, 0.0, 20)
    radius = rng.uniform(size / 8, size / 5)
    period = rng.uniform(4, 8)
    phase = rng.uniform(0, period, 2)
    start = rng.uniform(radius + 1, size - radius - 1, 2)
    drift = rng.uniform(-0.25, 0.25, 2) * radius
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        cx, cy = np.clip(start + drift * (t / max(1, frames - 1) - 0.5), radius + 1, size - radius - 1)
        dx, dy = xx - cx, yy - cy
        mask = (np.maximum(abs(dx), abs(dy)) <= radius) if square else (dx ** 2 + dy ** 2 <= radius ** 2)
        u, v = (dx + phase[0]) / period, (dy + phase[1]) / period
        if texture == "plain":
            on = np.zeros_like(u, dtype=bool)
        elif texture == "stripes":
            on = np.floor(v) % 2 == 0
        elif texture == "checks":
            on = (np.floor(u) + np.floor(v)) % 2 == 0
        else:  # dots: discs of a third of the period on a square lattice
            on = (u - np.floor(u) - 0.5) ** 2 + (v - np.floor(v) - 0.5) ** 2 <= (1 / 3) ** 2
        frame = background + rng.normal(0, 4, background.shape)  # sensor noise, fresh every frame
        frame[mask] = np.where(on[mask][:, None], other, base)
        out[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return out


def make_appearance_dataset(root: Path, train_per_class: int, test_per_class: int,
                            saturation: tuple[float, float] = (0.25, 0.7)) -> dict[str, Path]:
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
                    clip = appearance_clip(np.random.default_rng([stream, ci, i]), ci, saturation=saturation)
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
                    saturation: tuple[float, float] = (0.25, 0.7), alpha_dim: int = 64, lr: float = 1e-3,
                    batch_size: int = 16) -> Task:
    """The appearance task's stores (1 view per training video, 1 centre clip per test video), temporal off."""
    from dist_cache.model import DiSTSwitches
    from pipelines.extract.extractor import ExtractOptions, extract

    data = make_appearance_dataset(workdir / "data", train_per_class, test_per_class, saturation)
    model, checkpoint = random_backbone(workdir, B16_WIDTH_NAME)
    common = dict(video_root=str(data["videos"]), model=model, pretrained=str(checkpoint),
                  frames=APPEARANCE_FRAMES, decode_workers=1)
    train_stores = {}
    for seed in seeds:
        train_stores[seed] = workdir / f"appearance-train-s{seed}.zarr"
        extract(ExtractOptions(manifest=str(data["train"]), out=str(train_stores[seed]), views=1, split="train",
                               scale=(0.6, 1.0), seed=seed, **common), progress=False)
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

