"""Storage read bandwidth below which the feature cache stops paying, for ViT-B/16 and ViT-L/14.

Per clip, online training costs t_clip + t_branch (CLIP forward, then branch fwd/bwd); cached training costs
t_branch plus reading `bytes` features. The cache stops paying when reading takes as long as what it saves:
  * reads overlapped with compute (loader workers prefetch): bytes / BW >= t_clip + t_branch
        -> BW_min_overlapped = bytes / (t_clip + t_branch)
  * reads not overlapped (worst case):                         bytes / BW >= t_clip
        -> BW_min_serial = bytes / t_clip
t_clip and t_branch for ViT-B/16 are measured on this machine (the CLIP forward and the cached branch step of
benchmarks/train_step.py, re-measured here unless --from-json gives its output); ViT-L/14 scales them by
the FLOP ratios from `dist_cache.flops.profile_dist` on the meta device. Bytes per clip: L x T x (N+1) x C fp16.

    python -m benchmarks.break_even [--device cpu|cuda] [--quick] [--from-json benchmarks/results/train_step.json]

--quick times the tiny CLIP in place of ViT-B/16 and leaves ViT-L/14 out (a smoke run: its bandwidths mean
nothing).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks._common import report, sync


def measure(device: torch.device, reps: int, model: str = "ViT-B-16") -> tuple[float, float]:
    """Seconds per clip of the CLIP forward (8 frames) and of the cached branch step (batch 2)."""
    from dist_cache.backbone import load_backbone
    from dist_cache.model import DiST, DiSTConfig, DiSTSwitches

    bb = load_backbone(model, "none", allow_random_weights=True, device=device)
    layers, size = list(range(bb.num_layers)), bb.image_size
    enc = bb.spatial_encoder(layers).to(device)
    cfg = DiSTConfig(width=bb.width, patch_size=bb.patch_size, image_size=size, num_frames=8, embed_dim=bb.embed_dim,
                     layers=layers, switches=DiSTSwitches(gamma=2))
    net = DiST(cfg).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
    frames = torch.randn(2, 16, 3, size, size, device=device)
    feats = torch.randn(len(layers), 2, 8, bb.num_tokens, bb.width, device=device).half()

    def clip():
        with torch.no_grad():
            enc(frames[:, ::2].reshape(-1, 3, size, size))
        sync(device)

    def branch():
        loss = F.cross_entropy(net(feats, frames), torch.tensor([0, 1], device=device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync(device)

    clip()
    branch()
    tc, tb = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        clip()
        tc.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        branch()
        tb.append(time.perf_counter() - t0)
    return statistics.median(tc) / 2, statistics.median(tb) / 2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="time the tiny CLIP instead of ViT-B/16 (a smoke run)")
    p.add_argument("--from-json", help="train_step.py output to take t_clip and t_branch from instead of measuring")
    args = p.parse_args()
    device = torch.device(args.device)
    from dist_cache.flops import profile_dist

    if args.from_json:
        r = json.loads(Path(args.from_json).read_text())
        mem = r["results"]["model_step_in_memory"]
        b = r["parameters"]["batch"]
        t_clip_b, t_branch_b = mem["clip_forward_s_per_batch"] / b, 1 / mem["cached_clips_per_s"]
        source = f"{args.from_json} ({r['date']})"
    else:
        t_clip_b, t_branch_b = measure(device, 1, "dist-tiny") if args.quick else measure(device, 3)
        source = "dist-tiny, measured in this run (--quick)" if args.quick else "measured in this run"

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
        parameters={"source_of_timings": source, "device": str(device), "frames": 8, "gamma": 2,
                    "disk_reference_MBps": "this machine: O_DIRECT dd 562-956 MB/s; page cache 1.3-1.9 GB/s (zarr)"},
        results=out,
        ratio={m: round(v["break_even_MBps_serial"] / 562, 4) for m, v in out.items()},
        goal="informational: a disk slower than break_even_MBps makes online CLIP faster than the cache",
        verdict="cache pays on this machine's disk (562 MB/s O_DIRECT) for both models"
        if all(v["break_even_MBps_serial"] < 562 for v in out.values()) else "cache does NOT pay on this disk",
    )


if __name__ == "__main__":
    main()
