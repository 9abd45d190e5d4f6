"""Extraction against its three bounds, side by side on the same clips in one run (the one-shot GPU measurement):

(a) decoding alone, as extraction decodes: clips/s of `prepare_video` with the run's render spec (16 dense frames
    decoded and rendered per clip at gamma 2: crop, resize, flip, grayscale) in a process pool of extraction's
    worker count (`--decode-workers auto`: the usable cores less 2). Beside it, the bare figure: decord readers
    alone, 8 frames per clip, no rendering, on all usable cores (an upper bound no extraction reaches);
(b) CLIP alone: clips/s of the visual tower (fp16 autocast on CUDA, fp32 on the CPU) on batches already on the device;
(c) writing alone: MB/s of plain sequential file writes, one file per clip of the bytes extraction stores per clip;
(d) `dist-cache extract` end to end through the CLI (a subprocess: wall time from its start, time to the first stored
    video, and the steady clips/s: the videos stored after the first batch over the time from the first record to
    the last), with --dense-frames (and --precision fp16 on CUDA), into --store (kept for the training benchmark).

It reports ratio = extract clips/s (steady) / min(a, b, c / MB per clip) against the target 0.8 (a as extraction
decodes; the bare decode figure is reported beside it, never in the bound; on a CPU also 1 / (1/a + 1/b), as
decoding and CLIP then share the cores), and the start-up
(command start to the first stored video) against 25 s. Every step has a deadline, shared out of --budget-s: a step
that overruns is reported as timed out (extraction: with what it stored by then), and the run goes on.

    python -m benchmarks.gpu_extract --videos DIR --manifest CSV --checkpoint PT --out JSON [--store ZARR]
        [--quick] [--model ViT-B-16] [--device auto|cpu|cuda] [--batch-frames 256] [--budget-s 180]

The clips, manifest and checkpoint come from `python -m benchmarks.gpu_data --out DIR`. `--quick` (a smoke run:
the first 32 rows, 16-frame batches, at most 120 s) with `--model dist-tiny` and its checkpoint runs in about a
minute on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import machine
from pipelines.extract.prepare import RenderSpec

ROOT = Path(__file__).resolve().parent.parent
FRAMES = 8
TARGET = 0.8
STARTUP_TARGET_S = 25.0
QUICK_ROWS = 32


class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise StepTimeout in this (main) thread once `seconds` have passed."""
    def expire(signum, frame):
        raise StepTimeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def bounded(name: str, seconds: float, step: Callable[[], dict], results: dict) -> None:
    """Run one step under its deadline; a failure or overrun is recorded, and the run goes on."""
    start = time.perf_counter()
    try:
        with deadline(seconds):
            results[name] = step()
    except Exception as err:  # the benchmark reports what went wrong instead of dying on it
        results[name] = {"error": f"{type(err).__name__}: {err}"[:500]}
    results[name]["step_s"] = round(time.perf_counter() - start, 2)


def read_rows(manifest: Path, limit: int | None) -> list[str]:
    with manifest.open(newline="") as f:
        rows = [row["path"] for row in csv.DictReader(f)]
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------- (a) decode alone
def bare_decode(path: str) -> int:
    """Open the clip, count its frames, decode the middle frame of each of 8 segments (one thread)."""
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    reader.get_batch([min(n - 1, int((k + 0.5) * n / FRAMES)) for k in range(FRAMES)]).asnumpy()
    return n


def _warm(_: int) -> None:
    import decord  # noqa: F401  (the import is part of starting a worker, not of decoding)

    import pipelines.extract.prepare  # noqa: F401


def as_extract_decodes(job: tuple[str, int, RenderSpec]) -> int:
    """Extraction's decode work for one clip: `prepare_video` (probe, decode every view's dense frames once,
    render them), in a worker as the decode pool runs it; the rendered bytes stay in the worker."""
    from pipelines.extract.prepare import prepare_video

    path, index, spec = job
    return int(prepare_video(path, index, spec).rendered.nbytes)


def decode_alone(jobs: list, work: Callable, workers: int, seconds: float) -> dict:
    """clips/s of `work` over `jobs` in a pool of `workers` fresh processes, warmed before the clock starts."""
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        pool.map(_warm, range(2 * workers))  # every worker started and warm before the clock starts
        start = time.perf_counter()
        pool.map_async(work, jobs, chunksize=1).get(timeout=seconds)
        elapsed = time.perf_counter() - start
    finally:
        pool.terminate()
        pool.join()
    return {"clips": len(jobs), "workers": workers, "seconds": round(elapsed, 3),
            "clips_per_s": round(len(jobs) / elapsed, 2)}


def extract_spec(args: argparse.Namespace, image_size: int) -> RenderSpec:
    """The render spec of the extraction `extract_argv` runs: extract's default sampling (a train split)."""
    from dist_cache.sampling import Sampling
    from pipelines.extract.extractor import ExtractOptions

    o = ExtractOptions(manifest="", video_root="", out="", frames=FRAMES, views=1)
    sampling = Sampling(o.frames, o.views, o.split, o.seed, o.scale, o.ratio, o.flip_p, o.grayscale_p)
    return RenderSpec(sampling, image_size, "decord", args.dense_gamma)


# ---------------------------------------------------------------- (b) CLIP alone
def clip_alone(model: str, checkpoint: str, device: str, batch_frames: int, iterations: int) -> dict:
    import torch

    from dist_cache.backbone import load_backbone
    from dist_cache.transforms import normalize_frames

    precision = "fp16" if device.startswith("cuda") else "fp32"
    backbone = load_backbone(model, checkpoint, device=device, precision=precision)
    encoder = backbone.spatial_encoder(list(range(backbone.num_layers))).to(device)
    R = backbone.image_size
    frames = torch.randint(0, 256, (batch_frames, R, R, 3), dtype=torch.uint8, device=device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        for _ in range(2):  # warm-up: kernels chosen, memory pooled
            encoder(normalize_frames(frames, backbone.mean, backbone.std))
        sync()
        start = time.perf_counter()
        for _ in range(iterations):
            tokens, _ = encoder(normalize_frames(frames, backbone.mean, backbone.std))
        sync()
        elapsed = time.perf_counter() - start
    clips = iterations * batch_frames / FRAMES
    shapes = {"layers": backbone.num_layers, "tokens": backbone.num_tokens, "width": backbone.width,
              "embed_dim": backbone.embed_dim, "image_size": R}
    del encoder, backbone, frames, tokens
    if device.startswith("cuda"):
        torch.cuda.empty_cache()  # the extraction subprocess gets the GPU's memory back
    return {"precision": precision, "batch_frames": batch_frames, "iterations": iterations,
            "seconds": round(elapsed, 3), "clips_per_s": round(clips / elapsed, 2), "shapes": shapes}


def mb_per_clip(shapes: dict, dense_gamma: int) -> float:
    """What extraction stores per clip (1 view of FRAMES frames): fp16 tokens of every layer, fp16 CLIP embeddings,
    uint8 dense frames."""
    features = shapes["layers"] * FRAMES * shapes["tokens"] * shapes["width"] * 2
    embeds = FRAMES * shapes["embed_dim"] * 2
    frames = dense_gamma * FRAMES * shapes["image_size"] ** 2 * 3
    return (features + embeds + frames) / 1e6


# ---------------------------------------------------------------- (c) writing alone
def write_alone(directory: Path, clips: int, nbytes: int, seconds: float) -> dict:
    """Sequential plain writes of `nbytes` per clip, one new file each (as the store writes whole shards)."""
    directory.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    start = time.perf_counter()
    written = 0
    for i in range(clips):
        with open(directory / f"{i}.bin", "wb") as f:
            f.write(memoryview(data))
        written += nbytes
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    shutil.rmtree(directory, ignore_errors=True)
    return {"clips": written // nbytes, "bytes": written, "seconds": round(elapsed, 3),
            "MBps": round(written / 1e6 / elapsed, 1)}


# ---------------------------------------------------------------- (d) extract end to end
def count_records(store: Path) -> int:
    try:
        return sum(1 for entry in os.scandir(store / "records") if entry.name.endswith(".json"))
    except FileNotFoundError:
        return 0


def timed_cli_extract(argv: list[str], store: Path, timeout: float, videos_per_batch: int, views: int = 1) -> dict:
    """Run `dist-cache extract` (argv after `extract`) as a subprocess, watching the store's records: seconds from
    the command's start to the first stored (or failed) video and to its exit, and the steady clips/s after the
    first batch (the start-up left out)."""
    command = [sys.executable, "-m", "cli", "extract", *argv]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryFile() as log:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        first = last = None
        seen = 0
        while proc.poll() is None and time.perf_counter() - start < timeout:
            count = count_records(store)
            now = time.perf_counter() - start
            if count and first is None:
                first = now
            if count > seen:
                seen, last = count, now
            time.sleep(0.02)
        timed_out = proc.poll() is None
        if timed_out:
            proc.kill()
        proc.wait()
        wall = time.perf_counter() - start
        count = count_records(store)
        if count > seen:
            seen, last = count, wall
        log.seek(0)
        tail = log.read().decode(errors="replace").replace("\r", "\n").strip().splitlines()[-3:]
    out = {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": round(wall, 2), "videos": seen,
           "clips": seen * views, "first_video_s": None if first is None else round(first, 2), "output_tail": tail}
    out["end_to_end_clips_per_s"] = round(seen * views / wall, 2)
    if first is not None and seen > videos_per_batch and last > first:
        # Videos are stored a batch at a time: the batches stored after the first one's, over the time from the
        # first record to the last.
        out["steady_clips_per_s"] = round((seen - videos_per_batch) * views / (last - first), 2)
    return out


def scratch_store(path: Path | None, work: Path) -> Path:
    """Where the extraction writes: --store (kept for the next benchmark; a dist-cache store already there, from an
    earlier run of this script, is replaced), or a temporary store."""
    if path is None:
        return work / "store.zarr"
    if path.exists():
        root = path / "zarr.json"
        if not (root.is_file() and '"dist_cache"' in root.read_text(errors="replace")):
            sys.exit(f"error: --store {path} exists and is not a dist-cache store: give a new path")
        shutil.rmtree(path)
    return path


def extract_argv(args: argparse.Namespace, manifest: Path, store: Path, device: str, batch_frames: int) -> list[str]:
    # decord, as the decoding bound (a) is measured with it: like for like (extract's default is now PyAV).
    return ["--manifest", str(manifest), "--video-root", str(args.videos), "--out", str(store), "--decoder", "decord",
            "--model", args.model, "--pretrained", args.checkpoint, "--frames", str(FRAMES), "--views", "1",
            "--batch-frames", str(batch_frames), "--device", device, "--dense-frames",
            "--dense-gamma", str(args.dense_gamma)] + (["--precision", "fp16"] if device == "cuda" else [])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", required=True, type=Path, help="the clips' root (--video-root)")
    p.add_argument("--manifest", required=True, type=Path, help="path,label CSV of the clips")
    p.add_argument("--checkpoint", required=True, help="local CLIP checkpoint (--pretrained)")
    p.add_argument("--out", required=True, type=Path, help="where the JSON report goes (also printed)")
    p.add_argument("--store", type=Path, default=None,
                   help="where extraction writes its store, kept (default: a temporary one)")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--batch-frames", type=int, default=None, help="frames per forward (default 256; 16 with --quick)")
    p.add_argument("--dense-gamma", type=int, default=2, choices=[1, 2, 4, 8])
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run, shared out among the steps (default 180; 120 with --quick)")
    p.add_argument("--quick", action="store_true", help=f"smoke run: the first {QUICK_ROWS} rows, short steps")
    args = p.parse_args()
    import torch

    from dist_cache.decode_pool import auto_workers, usable_cores

    started = time.perf_counter()
    budget = args.budget_s or (120.0 if args.quick else 180.0)
    batch_frames = args.batch_frames or (16 if args.quick else 256)  # --quick: its few clips in several batches
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    rows = read_rows(args.manifest, QUICK_ROWS if args.quick else None)
    paths = [str(args.videos / r) for r in rows]
    results: dict[str, Any] = {}
    per_clip = None
    load_before = os.getloadavg()[0]  # other jobs on the machine make every rate here lower
    work = Path(tempfile.mkdtemp(prefix="dist-gpu-extract-"))
    try:
        store = scratch_store(args.store, work)
        bounded("clip", 0.2 * budget, lambda: clip_alone(args.model, args.checkpoint, device, batch_frames,
                                                        3 if args.quick else 30), results)
        shapes = results["clip"].get("shapes")
        spec = extract_spec(args, shapes["image_size"] if shapes else 224)
        jobs = [(path, index, spec) for index, path in enumerate(paths)]
        bounded("decode", 0.15 * budget, lambda: decode_alone(jobs, as_extract_decodes, auto_workers(),
                                                              0.15 * budget), results)
        results["decode"]["render"] = {"frames_per_clip": spec.sampling.frames * (spec.dense_gamma or 1),
                                       "image_size": spec.image_size, "views": spec.sampling.views}
        bounded("decode_bare", 0.1 * budget, lambda: decode_alone(paths, bare_decode, usable_cores(), 0.1 * budget),
                results)
        per_clip = mb_per_clip(shapes, args.dense_gamma) if shapes else None
        if per_clip:
            bounded("write", 0.1 * budget,
                    lambda: write_alone(work / "plain", len(paths), int(per_clip * 1e6), 0.05 * budget), results)
        manifest = args.manifest
        if args.quick:  # the same rows as the other steps
            manifest = work / "rows.csv"
            with args.manifest.open(newline="") as f:
                manifest.write_text("\n".join(f.read().splitlines()[: QUICK_ROWS + 1]) + "\n")
        argv = extract_argv(args, manifest, store, device, batch_frames)
        left = max(10.0, budget - (time.perf_counter() - started) - 5)
        bounded("extract", left + 5, lambda: timed_cli_extract(argv, store, left, -(-batch_frames // FRAMES)), results)
        results["extract"]["argv"] = "dist-cache extract " + " ".join(argv)
        stored = sum(f.stat().st_size for f in store.rglob("c.*") if f.is_file()) if store.exists() else 0
        if results["extract"].get("videos"):
            results["extract"]["stored_MB_per_clip"] = round(stored / 1e6 / results["extract"]["videos"], 3)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    bounds = {"decode": results["decode"].get("clips_per_s"), "clip": results["clip"].get("clips_per_s"),
              "write": (results.get("write", {}).get("MBps") or 0) / per_clip if per_clip else None}
    if device == "cpu" and bounds["decode"] and bounds["clip"]:
        # Without an accelerator decoding and CLIP share the cores: each clip costs both.
        bounds["cpu_shared"] = 1 / (1 / bounds["decode"] + 1 / bounds["clip"])
    bare = results["decode_bare"].get("clips_per_s")
    extract_rate = results["extract"].get("steady_clips_per_s")
    ratio = round(extract_rate / min(bounds.values()), 3) if extract_rate and all(bounds.values()) else None
    first = results["extract"].get("first_video_s")
    report = {
        "machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(["python", "-m", "benchmarks.gpu_extract"] + sys.argv[1:]),
        "parameters": {"model": args.model, "device": device, "clips": len(paths), "frames": FRAMES, "views": 1,
                       "batch_frames": batch_frames, "dense_gamma": args.dense_gamma, "quick": args.quick,
                       "budget_s": budget, "MB_per_clip": None if per_clip is None else round(per_clip, 3),
                       "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        "results": results,
        "bounds_clips_per_s": {k: None if v is None else round(v, 2) for k, v in bounds.items()},
        # Bare decord readers (8 frames, no rendering, all cores): beside the bound, never in it.
        "decode_bare_clips_per_s": bare,
        "extract_clips_per_s": extract_rate,
        "ratio": ratio,
        "goal": f"extract clips/s (steady) >= {TARGET} x min(decode, CLIP, write) clips/s; "
                f"first video within {STARTUP_TARGET_S:g} s",
        "verdict": ("unmeasured" if ratio is None else "met" if ratio >= TARGET else "missed")
                   + ("" if first is None else f"; first video at {first:.1f} s "
                      f"({'met' if first <= STARTUP_TARGET_S else 'missed'})"),
    }
    text = json.dumps(report, indent=1, default=str)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
