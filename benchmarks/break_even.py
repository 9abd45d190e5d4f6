"""Storage read bandwidth below which the feature cache stops paying, for ViT-B/16 and ViT-L/14.

Per clip, online training costs t_clip + t_branch (CLIP forward, then branch fwd/bwd); cached training costs
t_branch plus reading `bytes` features. The cache stops paying when reading takes as long as what it saves:
  * reads overlapped with compute (loader workers prefetch): bytes / BW >= t_clip + t_branch
        -> BW_min_overlapped = bytes / (t_clip + t_branch)
  * reads not overlapped (worst case):                         bytes / BW >= t_clip
        -> BW_min_serial = bytes / t_clip
t_clip and t_branch for ViT-B/16 are measured by `benchmarks.gpu_train` on a ViT-B/16 store (--from-json its
report; by default the recorded quiet CPU run, results/train_step.json); ViT-L/14 scales them by the FLOP ratios
from `dist_cache.flops.profile_dist` on the meta device. Bytes per clip: L x T x (N+1) x C fp16.

    python -m benchmarks.break_even [--quick] [--from-json GPU_TRAIN.json]

--quick leaves ViT-L/14 out (a smoke run).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks._common import report

RECORDED = Path(__file__).resolve().parent / "results" / "train_step.json"


def step_seconds(path: Path) -> tuple[float, float, str]:
    """Seconds per clip of the CLIP forward and of the cached branch step, from a `benchmarks.gpu_train` report (the
    online step less the cached one), or from the recorded output of the train_step benchmark it replaced."""
    r = json.loads(path.read_text())
    if "phases" in r:
        seconds = r["seconds_per_clip"]
        return seconds["clip"], seconds["branch"], f"{path} ({r['parameters']['device']})"
    mem, batch = r["results"]["model_step_in_memory"], r["parameters"]["batch"]
    return mem["clip_forward_s_per_batch"] / batch, 1 / mem["cached_clips_per_s"], f"{path} ({r['date']})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="leave ViT-L/14 out (a smoke run)")
    p.add_argument("--from-json", type=Path, default=RECORDED,
                   help="a benchmarks.gpu_train report of a ViT-B/16 store (default: the recorded CPU run)")
    args = p.parse_args()
    from dist_cache.flops import profile_dist

    t_clip_b, t_branch_b, source = step_seconds(args.from_json)

    models = {"ViT-B-16": (12, 197, 768), "ViT-L-14": (24, 257, 1024)}
    if args.quick:  # profiling ViT-L/14, even on the meta device, takes most of a smoke run's time
        del models["ViT-L-14"]
    prof = {m: profile_dist(m, frames=8, gamma=2) for m in models}

    def branch_g(pr):
        parts = pr["gflops_by_part"]
        return parts["temporal_encoder"] + parts["integration_branch"] + parts["head"]

    out = {}
    for m, (L, N, C) in models.items():
        nbytes = L * 8 * N * C * 2
        clip_scale = prof[m]["gflops_by_part"]["clip"] / prof["ViT-B-16"]["gflops_by_part"]["clip"]
        branch_scale = branch_g(prof[m]) / branch_g(prof["ViT-B-16"])
        t_clip, t_branch = t_clip_b * clip_scale, t_branch_b * branch_scale
        out[m] = {
            "bytes_per_clip_fp16": nbytes, "mb_per_clip_fp16": round(nbytes / 1e6, 2),
            "clip_flop_scale_vs_b16": round(clip_scale, 2), "branch_flop_scale_vs_b16": round(branch_scale, 2),
            "t_clip_s_per_clip": round(t_clip, 3), "t_branch_s_per_clip": round(t_branch, 3),
            "online_clips_per_s": round(1 / (t_clip + t_branch), 4),
            "cached_clips_per_s_compute": round(1 / t_branch, 4),
            "break_even_MBps_overlapped": round(nbytes / (t_clip + t_branch) / 1e6, 2),
            "break_even_MBps_serial": round(nbytes / t_clip / 1e6, 2),
            "break_even_MBps_overlapped_int8": round(nbytes / 2 / (t_clip + t_branch) / 1e6, 2),
            # what a disk must deliver for reads never to be the bottleneck of cached training
            "MBps_to_keep_branch_fed": round(nbytes / t_branch / 1e6, 2),
        }
    report(
        parameters={"source_of_timings": source, "frames": 8, "gamma": 2,
                    "disk_reference_MBps": "this machine: O_DIRECT dd 562-956 MB/s; page cache 1.3-1.9 GB/s (zarr)"},
        results=out,
        ratio={m: round(v["break_even_MBps_serial"] / 562, 4) for m, v in out.items()},
        goal="informational: a disk slower than break_even_MBps makes online CLIP faster than the cache",
        verdict="cache pays on this machine's disk (562 MB/s O_DIRECT) for both models"
        if all(v["break_even_MBps_serial"] < 562 for v in out.values()) else "cache does NOT pay on this disk",
    )


if __name__ == "__main__":
    main()
