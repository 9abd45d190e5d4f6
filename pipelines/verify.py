"""`dist-cache verify`: prove a store is complete and that its features are what its record says.

Beyond "the file opens", it checks each claim a store makes: every video is accounted for, no write
was left half-done, the recorded sampling plan is what the recorded seed gives, the videos on this
machine are the ones that were extracted, and a random subset of samples recomputed from the videos
with the recorded weights and preprocessing matches what is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dist_cache.backbone import load_recorded_backbone
from dist_cache.decoders import get_decoder
from dist_cache.errors import DecodeError, UserError
from dist_cache.sampling import ViewPlan, plan_views
from dist_cache.transforms import normalize_frames, render_frames
from pipelines.prepare import file_sha256
from storage import FeatureStore

# fp16 storage rounds to ~1e-3 relative; int8 per-token absmax to ~1 %.
TOLERANCE = {"fp16": 0.005, "int8": 0.03}


@dataclass
class VerifyReport:
    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_samples: list[dict] = field(default_factory=list)
    mismatched_videos: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _replanned(store: FeatureStore, sample: dict) -> ViewPlan:
    """The plan the recorded sampling parameters give for this sample's video."""
    schema = store.schema
    sampling = schema.sampling
    plans = plan_views(
        int(sample["num_frames"]), int(sample["width"]), int(sample["height"]),
        frames=schema.num_frames, views=schema.views_per_video, split=schema.split, seed=sampling["seed"],
        video_index=int(sample["video_index"]), scale=tuple(sampling["scale"]), ratio=tuple(sampling["ratio"]),
        flip_p=sampling["flip_p"], grayscale_p=sampling["grayscale_p"],
    )
    return plans[int(sample["view"])]


def video_mismatch(sample: dict, path: Path, decoder: str = "decord") -> str | None:
    """Why the file at `path` is not the video this sample was extracted from, or None if it is."""
    try:
        facts = get_decoder(decoder).probe(path)
    except DecodeError as err:
        return str(err)
    recorded = (int(sample["num_frames"]), int(sample["width"]), int(sample["height"]))
    if (facts.num_frames, facts.width, facts.height) != recorded:
        return (f"{sample['video']}: this copy has {facts.num_frames} frames of {facts.width}x{facts.height}, "
                f"the store recorded {recorded[0]} of {recorded[1]}x{recorded[2]}")
    if sample.get("size_bytes") is not None and path.stat().st_size != sample["size_bytes"]:
        return f"{sample['video']}: this copy has {path.stat().st_size} bytes, the store recorded {sample['size_bytes']}"
    if sample.get("sha256") and file_sha256(str(path)) != sample["sha256"]:
        return f"{sample['video']}: this copy's sha256 differs from the recorded one"
    return None


def _relative_error(stored: np.ndarray, recomputed: np.ndarray) -> float:
    return float(np.linalg.norm(stored - recomputed) / max(np.linalg.norm(recomputed), 1e-12))


def verify_store(
    url: str,
    *,
    video_root: str | None,
    samples: int = 3,
    pretrained: str | None = None,
    seed: int = 0,
    all_videos: bool = False,
    storage_options: dict | None = None,
    decoder: str = "decord",
) -> VerifyReport:
    """`decoder`: the `dist_cache.decoders` backend that reads the videos (the one the store was extracted with)."""
    store = FeatureStore.open(url, storage_options=storage_options)
    report = VerifyReport(store=url)
    counts = {name: n * store.schema.views_per_video for name, n in store.progress().items()}
    pending, failed = counts["pending"], counts["failed"]
    if pending:
        report.problems.append(f"{pending} of {len(store)} samples are not extracted yet: rerun the same extract command")
    elif not store.complete:
        report.problems.append("every sample is recorded but the store was never finalised: rerun the extract command")
    if failed:
        report.notes.append(f"{failed} samples belong to videos that failed to decode (see `dist-cache info --failed`)")
    if Path(url).is_dir():
        stray = sorted(str(p.relative_to(url)) for p in Path(url).rglob("*.partial*"))
        if stray:
            # Never part of the data: a killed write's temporary file, or a live writer's. Writers
            # remove them once they are old enough not to belong to anyone still writing.
            report.notes.append(f"{len(stray)} temporary *.partial file(s) from an interrupted or running write "
                                f"(e.g. {stray[0]}); harmless, removed by a later extract once stale")

    done = store.done_indices()
    if video_root is None:
        report.notes.append("no --video-root given: videos and features were not recomputed")
        return report
    if not len(done):
        return report
    if all_videos:
        # One sample per extracted video carries its facts: compare every file on this machine with them.
        first_views = done[done % store.schema.views_per_video == 0]
        for i in first_views:
            sample = store.sample(int(i))
            why = video_mismatch(sample, Path(video_root) / sample["video"], decoder)
            if why:
                report.mismatched_videos.append(why)
        report.notes.append(f"checked {len(first_views)} videos against their recorded facts")
        if report.mismatched_videos:
            report.problems.append(f"{len(report.mismatched_videos)} video(s) under --video-root are not the ones extracted")
    try:
        backbone = load_recorded_backbone(store.schema.backbone, pretrained=pretrained)
    except UserError as err:
        report.problems.append(f"cannot rebuild the recorded backbone: {err}")
        return report
    encoder = backbone.spatial_encoder(list(store.schema.layers))
    tolerance = TOLERANCE[store.schema.dtype]
    chosen = np.random.default_rng(seed).choice(done, size=min(samples, len(done)), replace=False)
    for i in sorted(int(i) for i in chosen):
        sample = store.sample(i)
        path = Path(video_root) / sample["video"]
        why = video_mismatch(sample, path, decoder)
        if why:
            report.problems.append(f"sample {i} not recomputed: {why}")
            continue
        plan = ViewPlan.from_dict(sample)
        if _replanned(store, sample) != plan:
            report.problems.append(f"sample {i}: the recorded plan is not what the recorded seed gives")
        frames = render_frames(get_decoder(decoder).read(path, plan.sparse_indices), plan, backbone.image_size)
        with torch.inference_mode():
            tokens, _ = encoder(normalize_frames(frames, backbone.mean, backbone.std))
        error = _relative_error(store.features(i).astype(np.float32), tokens.numpy())
        report.checked_samples.append({"sample": i, "video": sample["video"], "relative_error": error})
        if not error <= tolerance:
            report.problems.append(f"sample {i} ({sample['video']}): stored features differ from a recompute by {error:.2%}")
    return report


def format_report(report: VerifyReport) -> str:
    lines = [f"verify {report.store}"]
    for checked in report.checked_samples:
        lines.append(f"  recomputed sample {checked['sample']} ({checked['video']}): relative error {checked['relative_error']:.2e}")
    lines += [f"  mismatch: {m}" for m in report.mismatched_videos]
    lines += [f"  note: {n}" for n in report.notes]
    lines += [f"  problem: {p}" for p in report.problems]
    lines.append("ok" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)
