"""Cached vs online DiST training throughput (clips/s) with a ViT-B/16-sized CLIP (random weights).

Same DiST branch, batch, frames (8 sparse + 16 dense, gamma 2), optimiser step as `pipelines.train.run`:
  * model step, in-memory inputs: cached = branch fwd/bwd/AdamW on (L,B,T,N+1,C) fp16 features;
    online = CLIP visual forward (no_grad) on the sparse frames + the same branch step. Interleaved.
  * end to end through the real loader (`BatchLoader`: reader threads, the dense frames decoded
    by the decode pool) over the ViT-B/16 store given by DIST_BENCH_STORE (default /tmp/b16/b16.zarr), if it exists.
  * compute-bound ratio from FLOPs (`dist_cache.flops.profile_dist`): (CLIP fwd + 3 x branch fwd) / (3 x branch fwd),
    backward taken as 2 x forward.

    python -m benchmarks.train_step [--device cpu|cuda] [--quick]     (--quick: the tiny CLIP, no store; a smoke run)
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import parse, report

STORE = os.environ.get("DIST_BENCH_STORE", "/tmp/b16/b16.zarr")
VIDEO_ROOT = os.environ.get("DIST_BENCH_VIDEOS", "/tmp/b16/videos")
WEIGHTS = os.environ.get("DIST_BENCH_WEIGHTS", "/tmp/b16/vit-b-16-random.pt")


def make_step(net, text, device, mean, std):
    """The training step of `pipelines.train.run` (`train_step`) for `net`, on batches of any origin."""
    from pipelines.train.branch import amp_dtype, branch_of
    from pipelines.train.distributed import Ranks
    from pipelines.train.optim import make_optimizer, make_scaler
    from pipelines.train.step import StepModel, train_step

    branch = branch_of(net)
    optimizer, scheduler = make_optimizer(branch, lr=1e-5, weight_decay=1e-4, total=10**6, warmup=0,
                                          warmup_start_lr=1e-5)
    amp = amp_dtype(device)
    model = StepModel(net, net, branch, optimizer, scheduler, make_scaler(amp), text, mean, std, amp, 0.1, 1.0)
    ranks = Ranks(0, 1, device)
    return lambda batch, store=None: train_step(model, batch, ranks, store, 0)


def main() -> None:
    args = parse(__doc__.splitlines()[0])
    device = torch.device(args.device)
    from dist_cache.backbone import load_backbone
    from dist_cache.flops import profile_dist
    from dist_cache.model import DiST, DiSTConfig, DiSTSwitches, OnlineDiST
    from dist_cache.transforms import normalize_frames

    B, T, gamma = 2, 8, 2
    reps = 2 if args.quick else 4
    model = "dist-tiny" if args.quick else "ViT-B-16"
    have_store = not args.quick and Path(STORE).exists() and Path(WEIGHTS).exists()

    # ---- FLOPs: compute-bound ratio ----
    prof = profile_dist(model, frames=T, gamma=gamma)
    parts = prof["gflops_by_part"]
    clip_g = parts["clip"]
    branch_fwd = parts["temporal_encoder"] + parts["integration_branch"] + parts["head"]
    bound = (clip_g + 3 * branch_fwd) / (3 * branch_fwd)

    # ---- models: the same branch weights for both paths ----
    backbone = load_backbone(model, WEIGHTS if have_store else "none", allow_random_weights=True, device=device)
    layers = list(range(backbone.num_layers))
    config = DiSTConfig(width=backbone.width, patch_size=backbone.patch_size, image_size=backbone.image_size,
                        num_frames=T, embed_dim=backbone.embed_dim, layers=layers,
                        switches=DiSTSwitches(gamma=gamma))
    torch.manual_seed(0)
    cached = DiST(config).to(device).train()
    torch.manual_seed(0)
    online = OnlineDiST(backbone.spatial_encoder(layers), DiST(config)).to(device).train()
    text = torch.randn(4, config.embed_dim, device=device)
    step_cached = make_step(cached, text, device, backbone.mean, backbone.std)
    step_online = make_step(online, text, device, backbone.mean, backbone.std)

    # ---- in-memory inputs: real CLIP tokens of random uint8 frames (so value ranges are realistic) ----
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (B, config.dense_frames, config.image_size, config.image_size, 3), generator=g,
                           dtype=torch.uint8)
    normalised = normalize_frames(frames.to(device), backbone.mean, backbone.std)
    with torch.no_grad():
        feats = online.features(normalised).cpu().half()  # (L, B, T, N+1, C)
    from pipelines.train.data.loader import Batch

    label = torch.tensor([0, 1][:B] * (B // 2 + 1))[:B].to(device)
    index = np.arange(B)
    batch_cached = Batch(index, index, label, feats.to(device), frames.to(device))
    batch_online = Batch(index, index, label, None, frames.to(device))

    step_cached(batch_cached)  # warm-up
    step_online(batch_online)
    t_cached, t_online = [], []
    for _ in range(reps):  # interleaved, so machine load hits both alike
        t0 = time.perf_counter()
        step_cached(batch_cached)
        t_cached.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step_online(batch_online)
        t_online.append(time.perf_counter() - t0)
    # CLIP forward alone on the same frames, to split the online step
    t_clip = []
    for _ in range(max(2, reps // 2)):
        t0 = time.perf_counter()
        with torch.no_grad():
            online.features(normalize_frames(frames.to(device), backbone.mean, backbone.std))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_clip.append(time.perf_counter() - t0)
    mem = {
        "cached_clips_per_s": B / statistics.median(t_cached),
        "online_clips_per_s": B / statistics.median(t_online),
        "cached_step_s": [round(t, 3) for t in t_cached],
        "online_step_s": [round(t, 3) for t in t_online],
        "clip_forward_s_per_batch": statistics.median(t_clip),
    }
    mem["speedup"] = mem["cached_clips_per_s"] / mem["online_clips_per_s"]

    # ---- end to end through the real loader ----
    e2e = None
    if have_store:
        from pipelines.train.data.loader import BatchLoader, DecodedFrames, EpochSampler
        from storage import FeatureStore

        store = FeatureStore.open(STORE)
        steps = 3 if args.quick else 6
        e2e = {"decode_workers": "auto", "steps_timed": steps}
        for name, step, feat_layers in (("cached", step_cached, layers), ("online", step_online, None)):
            # test-split store: every sample in index order, epochs cycled; labels folded onto the 4 text classes
            sampler = EpochSampler(np.arange(len(store)), store.schema.views_per_video, B, train=False)
            loader = BatchLoader(store, sampler, layers=feat_layers, frames=DecodedFrames(store, VIDEO_ROOT, gamma),
                                 device=device, read_threads=2)
            times, done, epoch, t0 = [], 0, 0, None
            while done < steps + 1:
                sampler.set_epoch(epoch)
                epoch += 1
                for batch in loader:
                    if len(batch) != B:
                        continue
                    batch.label = batch.label % 4
                    step(batch, store)
                    now = time.perf_counter()
                    if t0 is not None:
                        times.append(now - t0)
                    t0 = now
                    done += 1
                    if done >= steps + 1:
                        break
            loader.close()
            e2e[f"{name}_clips_per_s"] = B / statistics.median(times)
            e2e[f"{name}_step_s"] = [round(t, 3) for t in times]
        e2e["speedup"] = e2e["cached_clips_per_s"] / e2e["online_clips_per_s"]

    measured = e2e["speedup"] if e2e else mem["speedup"]
    frac_mem = mem["speedup"] / bound
    frac_e2e = e2e["speedup"] / bound if e2e else None
    ok = frac_mem >= 0.8 and (frac_e2e is None or frac_e2e >= 0.8)
    report(
        parameters={"clip": f"{model} (random weights)", "batch": B, "sparse_frames": T, "dense_frames": T * gamma,
                    "gamma": gamma, "layers": len(layers), "reps": reps, "device": str(device),
                    "threads": torch.get_num_threads(), "store": STORE if have_store else None},
        results={
            "flops_gmacs_per_clip": {"clip_fwd": round(clip_g, 2), "branch_fwd": round(branch_fwd, 2),
                                     "branch_fwd_bwd": round(3 * branch_fwd, 2)},
            "compute_bound_speedup": round(bound, 2),
            "model_step_in_memory": mem,
            "end_to_end_loader": e2e,
        },
        ratio={"in_memory_speedup_over_bound": round(frac_mem, 3),
               "end_to_end_speedup_over_bound": None if frac_e2e is None else round(frac_e2e, 3),
               "measured_speedup": round(measured, 2)},
        goal="measured cached/online speedup >= 80% of the compute-bound speedup",
        verdict="met" if ok else "missed",
    )


if __name__ == "__main__":
    main()
