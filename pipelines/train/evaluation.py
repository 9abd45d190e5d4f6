"""Evaluation: softmax scores summed over every cached view of a video (3 clips x 1 crop by default).

Class embeddings come from the store (what extraction computed with the text tower), or, for zero-shot
evaluation on another label set (`classes`), from the backbone's text tower, rebuilt from the store's
record and checked against its weight hash. Zero-shot scores each view the way the tower's own model scores an
image against a text (the store's `backbone.scoring`): CLIP a softmax over the cosines, SigLIP a sigmoid of each
(scale * cosine + bias), its log summed over the views (a product of probabilities: sums of sigmoids saturated at 1
would tie). A tower without a text side (DINOv2) has no zero-shot: refused in one line. Samples that failed at
extraction are skipped and counted.

Per-video predictions (`--predictions FILE`) go to their own file, one JSON object per line, rather than into the
report: a report stays readable and small at any size, and 100k lines stream to `jq`, `pandas.read_json(lines=True)`
or a spreadsheet without loading a whole document (mmaction2's `--dump` is likewise its own file).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from dist_cache.backbone import load_recorded_backbone
from dist_cache.devices import resolve_device
from dist_cache.errors import UserError, first_line
from dist_cache.manifests import load_class_names
from dist_cache.model import DiSTConfig, OnlineDiST
from pipelines.files import replace_atomically
from pipelines.train.branch import Network, autocast, branch_of, build_network, embed, online_precision
from pipelines.train.checkpoint import load_checkpoint
from pipelines.train.checks import (
    check_backbone,
    check_evaluation_store,
    check_frames,
    check_store_fits,
    online_jpeg_warning,
    open_store,
    usable_samples,
)
from pipelines.train.data.loader import BatchLoader, EpochSampler, frame_source
from pipelines.train.plots import plot_confusion
from pipelines.train.selection import chosen_on_this_set
from storage import FeatureStore


@dataclass
class EvalOptions:
    checkpoint: str
    cache: str
    video_root: str | None = None  # not needed when the store holds the dense frames
    classes: str | None = None  # class-names file: zero-shot on this label set
    pretrained: str | None = None  # local copy of the backbone weights (zero-shot text tower, --online)
    json: str | None = None  # the report (`eval --report`)
    confusion: str | None = None  # PNG; defaults to <json stem>.confusion.png beside --report
    predictions: str | None = None  # JSONL, a line per scored video (`eval --predictions`)
    online: bool = False
    batch_size: int = 16
    read_threads: int = 8
    decode_workers: int | Literal["auto"] = "auto"
    decode_timeout: float = 120.0
    decoder: str | None = None  # decode the dense frames with this decoder, not the store's (decoder_check.py)
    device: str = "auto"
    storage_options: dict = field(default_factory=dict)


def eval_loader(
    net: Network, store: FeatureStore, usable: np.ndarray, *, video_root: str | None, batch_size: int,
    read_threads: int, decode_workers: int | Literal["auto"], decode_timeout: float, device: torch.device,
    decoder: str | None = None,
) -> BatchLoader:
    """Every usable view of the store, in index order; reusable across validations (its threads persist)."""
    config = branch_of(net).config
    online = isinstance(net, OnlineDiST)
    frames = None
    if online or config.switches.temporal:
        frames = frame_source(store, config.switches.gamma, video_root, decode_workers=decode_workers,
                              decode_timeout=decode_timeout, decoder=decoder)
    sampler = EpochSampler(usable, store.schema.views_per_video, batch_size, train=False)
    return BatchLoader(store, sampler, layers=None if online else config.layers, frames=frames, device=device,
                       read_threads=read_threads)


def view_scores(logits: torch.Tensor, logit_scale: float, scoring: dict[str, Any] | None) -> torch.Tensor:
    """(B, K) scores of one view each, from the branch's logits (logit_scale * cosine): softmax probabilities by
    default and for CLIP; for a sigmoid scorer (SigLIP), log sigmoid(scale * cosine + bias), summed over views."""
    if scoring is None or scoring.get("kind") == "softmax":
        return logits.float().softmax(dim=-1)
    cosine = logits.float() / logit_scale
    return F.logsigmoid(float(scoring["scale"]) * cosine + float(scoring["bias"])).double()


def scoring_line(scoring: dict[str, Any] | None) -> str:
    if scoring is None or scoring.get("kind") == "softmax":
        return "softmax probabilities, summed over views"
    return (f"sigmoid(scale {scoring['scale']:.4g} * cosine + bias {scoring['bias']:.4g}), the tower's own; "
            "log-probabilities summed over views")


@torch.no_grad()
def score_videos(
    net: Network, loader: BatchLoader, text: torch.Tensor, *, progress: bool, scoring: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(V, K) view scores (`view_scores`: softmax probabilities unless `scoring` says otherwise) summed over each
    video's views in `loader`, and (V,) how many views were summed."""
    store = loader.store
    scores = np.zeros((store.schema.num_videos, text.shape[0]), dtype=np.float64)
    views = np.zeros(store.schema.num_videos, dtype=np.int64)
    mean, std = store.schema.backbone["mean"], store.schema.backbone["std"]
    was_training = net.training
    net.eval()
    try:
        loader.sampler.set_epoch(0)
        with tqdm(total=loader.sampler.samples_per_epoch, unit="clip", desc="eval", disable=not progress,
                  dynamic_ncols=True) as bar:
            for batch in loader:
                with autocast(loader.device):
                    embeddings = embed(net, batch, mean, std)
                probs = view_scores(net.logits(embeddings, text), branch_of(net).config.switches.logit_scale,
                                    scoring).cpu().numpy()
                np.add.at(scores, batch.video_index, probs)
                np.add.at(views, batch.video_index, 1)
                bar.update(len(batch))
    finally:
        net.train(was_training)
    return scores, views


@dataclass
class Validation:
    """A validation store with its loader and class embeddings, scored at epoch ends (rank 0)."""

    store: FeatureStore
    loader: BatchLoader
    text: torch.Tensor

    @classmethod
    def open(cls, net: Network, store: FeatureStore, usable: np.ndarray, *, device: torch.device,
             **loader_options: Any) -> Validation:
        loader = eval_loader(net, store, usable, device=device, **loader_options)
        return cls(store, loader, torch.as_tensor(store.text_features, device=device))

    def evaluate(self, net: Network) -> dict[str, Any]:
        scores, views = score_videos(net, self.loader, self.text, progress=False)
        return summarize(scores, views, self.store.labels, list(self.store.schema.class_names))

    def close(self) -> None:
        self.loader.close()


def summarize(scores: np.ndarray, views: np.ndarray, labels: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Top-1, top-5, mean class accuracy, per-class accuracy and confusion matrix over videos with a view."""
    seen = views > 0
    scores, labels = scores[seen], np.asarray(labels)[seen]
    k = len(class_names)
    if not len(labels):
        raise UserError("no video of the store has features (every sample failed); nothing to evaluate")
    top = np.argsort(-scores, axis=1, kind="stable")[:, : min(5, k)]
    correct1 = top[:, 0] == labels
    correct5 = (top == labels[:, None]).any(axis=1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels, top[:, 0]), 1)
    per_class_videos = confusion.sum(axis=1)
    per_class = {
        name: (float(confusion[c, c] / per_class_videos[c]) if per_class_videos[c] else None)
        for c, name in enumerate(class_names)
    }
    present = [acc for acc in per_class.values() if acc is not None]
    return {
        "videos": int(len(labels)),
        "views": int(views.sum()),
        "top1": float(correct1.mean()),
        "top5": float(correct5.mean()),
        "top5_k": min(5, k),
        "mean_class_accuracy": float(np.mean(present)),
        "per_class_accuracy": per_class,
        "per_class_videos": {name: int(n) for name, n in zip(class_names, per_class_videos)},
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }


def zero_shot_labels(store: FeatureStore, classes_file: str) -> tuple[list[str], np.ndarray]:
    """The new class list, and the store's labels mapped into it by class name."""
    names = load_class_names(classes_file)
    position = {name: i for i, name in enumerate(names)}
    missing = [name for name in list(store.schema.class_names) if name not in position]
    if missing:
        raise UserError(
            f"--zero-shot-classes {classes_file} lacks {len(missing)} of the store's classes (first: "
            f"{missing[0]!r}); "
            "every class of the evaluated store must be named in the list"
        )
    mapping = np.array([position[name] for name in list(store.schema.class_names)], dtype=np.int64)
    return names, mapping[np.asarray(store.labels, dtype=np.int64)]


def text_embeddings(store: FeatureStore, names: list[str], pretrained: str | None, device: torch.device) -> np.ndarray:
    """Embed new class names with the store's own text tower and prompt templates."""
    try:
        backbone = load_recorded_backbone(store.schema.backbone, pretrained, device=device)
    except UserError:
        raise
    except Exception as err:  # e.g. an open_clip tag whose weights cannot be downloaded here
        first = first_line(err, 160)
        raise UserError(
            f"cannot load the backbone's weights ({store.schema.backbone['pretrained']}) for the text tower: {first}; "
            "pass --pretrained PATH to a local copy"
        ) from None
    return backbone.encode_text(names, list(store.schema.text["templates"]))


def selection_warning(ckpt: dict[str, Any], store: FeatureStore, checkpoint: str) -> str | None:
    """A warning when `checkpoint` was chosen as its run's best by validating on this evaluation set (this store or
    any copy of it: pipelines.train.selection): its score here was the maximum over the run's validations, so it is
    optimistic (test-set selection)."""
    chosen = ckpt.get("chosen_on")
    if not chosen_on_this_set(chosen, store):
        return None
    where = chosen.get("url", "its --val-cache")
    same = "this very store" if where == store.url else (
        f"{where}, the same videos, classes, split and sampling as {store.url}")
    return (f"{checkpoint} was chosen as its run's best on {same} (its --val-cache), so this score is optimistic; "
            "evaluate on a store the run never validated on (or its last.pt)")


def evaluate(opts: EvalOptions, progress: bool = True) -> dict[str, Any]:
    """Evaluate a checkpoint on a store; write the JSON report and the confusion PNG when asked."""
    for flag, path in (("--report", opts.json), ("--predictions", opts.predictions)):
        check_output_file(path, flag)
    if opts.json and opts.predictions and Path(opts.json).resolve() == Path(opts.predictions).resolve():
        raise UserError(f"--report and --predictions name the same file, {opts.predictions}: the report would "
                        f"overwrite the predictions; give each its own file")
    device = resolve_device(opts.device)
    ckpt = load_checkpoint(opts.checkpoint)
    config = DiSTConfig.from_dict(ckpt["dist_config"])
    store = open_store(opts.cache, "--cache", opts.storage_options)
    check_evaluation_store(store, "--cache")
    check_backbone(store, ckpt["store"]["backbone"], "--cache", f"checkpoint {opts.checkpoint}")
    check_store_fits(store, config, "--cache", online=opts.online)
    usable, failed = usable_samples(store, "--cache")
    frames, decoder_note = check_frames(store, usable, config, opts.video_root, "--video-root", online=opts.online,
                                        decoder=opts.decoder)

    scoring = None
    if opts.classes:
        recorded = store.schema.backbone
        if not recorded.get("text_tower", True):
            raise UserError(f"--classes: the store's tower {recorded['model']} has no text side, so it cannot embed "
                            "new class names; zero-shot needs an image-text model (CLIP, SigLIP, EVA02-CLIP): evaluate "
                            "on the store's own classes (no --classes)")
        class_names, labels = zero_shot_labels(store, opts.classes)
        text = text_embeddings(store, class_names, opts.pretrained, device)
        scoring = recorded.get("scoring")
    else:
        class_names, labels, text = list(store.schema.class_names), np.asarray(store.labels), store.text_features

    net = build_network(config, online=opts.online, backbone_record=store.schema.backbone, pretrained=opts.pretrained,
                        device=device, seed=0, precision=online_precision(store.schema.precision, device))
    branch_of(net).load_state_dict(ckpt["model"])
    loader = eval_loader(net, store, usable, video_root=opts.video_root, batch_size=opts.batch_size,
                         read_threads=opts.read_threads, decode_workers=opts.decode_workers,
                         decode_timeout=opts.decode_timeout, device=device, decoder=opts.decoder)
    try:
        scores, views = score_videos(net, loader, torch.as_tensor(text, device=device), progress=progress,
                                     scoring=scoring)
    finally:
        loader.close()
    warning = selection_warning(ckpt, store, opts.checkpoint)
    report = {
        "checkpoint": str(opts.checkpoint),
        "cache": store.url,
        "store_fingerprint": store.fingerprint,
        "classes": opts.classes or "store",
        "scoring": scoring_line(scoring),
        "online": opts.online,
        "views_per_video": store.schema.views_per_video,
        "skipped_failed_samples": failed,
        "skipped_failed_videos": failed // store.schema.views_per_video,
        "warnings": [w for w in (warning, online_jpeg_warning(store, opts.online, frames)) if w],
        "decoder_check": decoder_note,  # what was checked when --decoder is not the store's decoder
        **summarize(scores, views, labels, class_names),
    }
    confusion = opts.confusion or (str(Path(opts.json).with_suffix(".confusion.png")) if opts.json else None)
    if confusion:
        report["confusion_png"] = str(plot_confusion(np.array(report["confusion_matrix"]), class_names, confusion))
    if opts.predictions:
        lines = prediction_lines(scores, views, labels, class_names, store.videos,
                                 log_scores=scoring is not None and scoring.get("kind") != "softmax")
        replace_atomically(opts.predictions, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in lines)))
        report["predictions"] = str(opts.predictions)
    if opts.json:
        replace_atomically(opts.json, lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    return report


def prediction_lines(scores: np.ndarray, views: np.ndarray, labels: np.ndarray, class_names: list[str],
                     videos: list[str], k: int = 5, log_scores: bool = False) -> list[str]:
    """One JSON line per video with a scored view, in video order: its path (relative to the video root), its
    label, how many views were scored, and its top-k classes with their scores: each the softmax averaged over
    the video's views (a video's scores sum to at most 1), or with `log_scores` (sigmoid scoring, whose view scores
    are log-probabilities) the geometric mean over its views of the class's sigmoid probability."""
    k = min(k, len(class_names))
    out = []
    for v in np.flatnonzero(views > 0):
        mean = scores[v] / views[v]
        if log_scores:
            mean = np.exp(mean)
        top = np.argsort(-mean, kind="stable")[:k]
        out.append(json.dumps({
            "video": videos[v], "label": class_names[int(labels[v])], "label_index": int(labels[v]),
            "views": int(views[v]), "top": [class_names[c] for c in top], "top_index": [int(c) for c in top],
            "scores": [round(float(mean[c]), 6) for c in top],
        }))
    return out


def check_output_file(path: str | None, flag: str) -> None:
    """A file eval writes at the end must be writable before the scoring starts, not found unwritable after."""
    if path is None:
        return
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise UserError(f"{flag} {path}: there is no directory {folder}; create it, or write elsewhere")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{flag} {path}: the directory {folder} is not writable; write elsewhere")


def format_report(report: dict[str, Any]) -> str:
    """The lines the CLI prints: headline numbers, skipped samples, the weakest classes."""
    lines = [
        f"top-1 {100 * report['top1']:.2f}%  top-{report['top5_k']} {100 * report['top5']:.2f}%  "
        f"mean class {100 * report['mean_class_accuracy']:.2f}%  "
        f"({report['videos']} videos, {report['views']} views, classes: {report['classes']})"
    ]
    if report["classes"] != "store":
        lines.append(f"zero-shot scoring: {report['scoring']}")
    if report["skipped_failed_samples"]:
        lines.append(
            f"skipped {report['skipped_failed_samples']} failed samples "
            f"({report['skipped_failed_videos']} videos that failed at extraction)"
        )
    scored = [(acc, name) for name, acc in report["per_class_accuracy"].items() if acc is not None]
    worst = sorted(scored)[:5]
    if worst and worst[0][0] < 1.0:
        lines.append("weakest classes: " + ", ".join(f"{name} {100 * acc:.0f}%" for acc, name in worst))
    if report.get("decoder_check"):
        lines.append(report["decoder_check"])
    if report.get("confusion_png"):
        lines.append(f"confusion matrix -> {report['confusion_png']}")
    if report.get("predictions"):
        lines.append(f"per-video predictions -> {report['predictions']}")
    return "\n".join(lines)
