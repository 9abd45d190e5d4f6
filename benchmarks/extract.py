"""Stage one on this machine: clips/s of the extractor (`Extractor.run`: decode workers, CLIP
forward, cast and copy into the host ring, writer threads, the store) against CLIP alone on the same batches,
and the start-up of `dist-cache extract` (command start to the first stored video) with a ViT-B/16-sized local
checkpoint.

Settings: the bundled tiny CLIP (dist-tiny) on generated 64 px clips; a ViT-B/16 (random weights saved as a
local checkpoint) on generated K400-like clips (340x256, 25 fps H.264), skipped with --quick. Timed forward /
extract / forward, the forward rate being the mean of the two passes. Decoding and rendering are also timed
serially: without an accelerator they share the cores with the forward, so forward / (forward + prepare) is the
best ratio a CPU-only run can reach. The GPU version of this measurement is `benchmarks.gpu_extract`.

    python -m benchmarks.extract [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import parse, report, sync
from benchmarks.gpu_extract import timed_cli_extract


def bench(opts, device: torch.device) -> dict:
    from dist_cache.transforms import normalize_frames
    from pipelines.extract.extractor import Extractor, render_spec
    from pipelines.extract.prepare import prepare_video

    ex = Extractor.open(opts)
    try:
        pending = ex.writer.pending()
        spec = render_spec(ex.opts, ex.backbone)
        root = Path(opts.video_root)
        # Decode + render, timed serially: on a CPU-only machine this work shares the cores with the forward pass.
        t0 = time.perf_counter()
        prepared = [prepare_video(str(root / ex.manifest.videos[v]), v, spec) for v in pending]
        t_prepare = time.perf_counter() - t0
        per_batch = ex.videos_per_batch  # the same grouping as Extractor.run
        batches = [np.concatenate([p.images for p in prepared[i:i + per_batch]])
                   for i in range(0, len(prepared), per_batch)]
        encoder = ex.forward.encoder

        def forward_only() -> float:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for b in batches:
                    encoder(normalize_frames(torch.from_numpy(b).to(device), ex.backbone.mean, ex.backbone.std))
            sync(device)
            return time.perf_counter() - t0

        forward_only()  # warm-up
        f1 = forward_only()
        t0 = time.perf_counter()
        summary = ex.run(pending)
        t_extract = time.perf_counter() - t0
        f2 = forward_only()
    finally:
        ex.close()
    clips = summary.stored * ex.opts.views
    t_fwd = (f1 + f2) / 2
    bound = t_fwd / (t_fwd + t_prepare)
    return {"clips": clips, "failed": summary.failed, "precision": ex.opts.precision, "extract_s": round(t_extract, 3),
            "forward_s": [round(f1, 3), round(f2, 3)],
            "extract_clips_per_s": round(clips / t_extract, 3), "forward_clips_per_s": round(clips / t_fwd, 3),
            "ratio": round(t_fwd / t_extract, 3), "mb_written": round(summary.bytes_written / 1e6, 1),
            "prepare_s": round(t_prepare, 3),
            # With no accelerator, decode and CLIP compete for the same cores: this is the best ratio possible.
            "cpu_shared_bound": round(bound, 3), "ratio_vs_cpu_shared_bound": round((t_fwd / t_extract) / bound, 3)}


def startup(data: Path, checkpoint: Path, device: torch.device, tmp: Path) -> dict:
    """`dist-cache extract` as a user runs it, from the command's start to its first stored video: interpreter
    and imports, decode workers, the checkpoint, the store, the first batch (one video, to time the start-up and
    not the CPU's forward pass)."""
    from dist_cache.backbone import load_backbone

    start = time.perf_counter()
    load_backbone("ViT-B-16", str(checkpoint), device=device)
    load_s = time.perf_counter() - start
    argv = ["--manifest", str(data / "train.csv"), "--video-root", str(data / "videos"),
            "--out", str(tmp / "startup.zarr"), "--model", "ViT-B-16", "--pretrained", str(checkpoint),
            "--frames", "8", "--views", "1", "--batch-frames", "8", "--device", str(device)]
    timed = timed_cli_extract(argv, tmp / "startup.zarr", timeout=600, videos_per_batch=1)
    return {"first_video_s": timed["first_video_s"], "wall_s": timed["wall_s"], "videos": timed["videos"],
            "returncode": timed["returncode"], "load_backbone_s_in_this_process": round(load_s, 2),
            "command": "dist-cache extract " + " ".join(argv)}


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    device = torch.device(args.device)
    from benchmarks.gpu_data import make_clips, save_random_checkpoint, write_manifest
    from dist_cache.synthetic import make_motion_dataset
    from pipelines.extract.extractor import ExtractOptions

    tmp = Path(tempfile.mkdtemp(prefix="dist-bench-extract-"))
    results = {}
    load_before = os.getloadavg()[0]  # other jobs on the machine make every timing here slower
    try:
        vpc = 4 if args.quick else 16
        data = make_motion_dataset(tmp / "data", videos_per_class=vpc, num_frames=32)
        results["tiny"] = bench(ExtractOptions(
            manifest=str(data / "train.csv"), video_root=str(data / "videos"), out=str(tmp / "tiny.zarr"),
            model="dist-tiny", pretrained="none", allow_random_weights=True, views=2, split="train",
            device=str(device)), device)
        if not args.quick:
            k400 = tmp / "k400"
            write_manifest(k400 / "train.csv", make_clips(k400 / "videos", 6, 4.0), repeat=2)
            checkpoint = k400 / "ViT-B-16-random.pt"
            save_random_checkpoint("ViT-B-16", checkpoint)
            results["vit_b16"] = bench(ExtractOptions(
                manifest=str(k400 / "train.csv"), video_root=str(k400 / "videos"), out=str(tmp / "b16.zarr"),
                model="ViT-B-16", pretrained=str(checkpoint), views=2, split="train", batch_frames=16,
                device=str(device)), device)
            results["startup_vit_b16"] = startup(k400, checkpoint, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {k: v["ratio"] for k, v in results.items() if "ratio" in v}
    report(
        parameters={"device": str(device), "frames": 8,
                    "tiny": f"dist-tiny, {vpc * 4} generated videos x 2 views (train split)",
                    "vit_b16": "ViT-B-16 random weights (local checkpoint), 6 K400-like 4 s clips x 2 rows x 2 views "
                               "= 24 clips (train split), batch_frames 16",
                    "decode_workers": "auto",
                    "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)]},
        results=results, ratio=ratios,
        goal="extractor clips/s >= 90% of CLIP-forward-alone clips/s where decoding has its own cores; "
             "first video within 25 s of the command (ViT-B/16, local checkpoint)",
        verdict=", ".join(f"{k}: {'met' if r >= 0.9 else 'missed'} ({r:.2f}; CPU-shared bound "
                          f"{results[k]['cpu_shared_bound']:.2f})" for k, r in ratios.items())
                + ("" if "startup_vit_b16" not in results else
                   f", first video at {results['startup_vit_b16']['first_video_s']} s"),
    )


if __name__ == "__main__":
    main()
