"""Stage-two training throughput, the cache against CLIP run live, side by side in one run (a GPU, or a CPU).

Four phases, each the real training step (pipelines.train.step.train_step: bf16/fp16 autocast, fp32 logits and loss, the
non-finite guard, AdamW) at --batch clips per step, gamma 2, over the store --store (extract --dense-frames, fp16):
  (a) cached_step: the branch on one batch of cached features and frames already in GPU memory;
  (b) cached_e2e: the branch fed by the real loader (`BatchLoader`: reader threads, pinned slabs,
      stored or decoded dense frames, copies on a side stream);
  (c) online_step: CLIP (in the store's recorded precision) plus the branch, on one batch of frames in GPU memory;
  (d) online_e2e: the same, fed by the real loader (frames only).
Reported: cached_e2e/cached_step and online_e2e/online_step (the loader keeps up when >= 0.8), cached/online end
to end (what the cache buys) against the compute bound, what it would buy if the branch ran at CLIP's FLOP efficiency
((CLIP fwd + 3 x branch fwd) / (3 x branch fwd), backward taken as 2 x forward, from `dist_cache.flops.profile_dist`;
>= 0.8 of it), the seconds per clip of CLIP and of the branch step (what `benchmarks.break_even` reads), and on a
GPU each phase's own peak memory (the statistics are reset before each phase). Every phase stops at its time
budget; a watchdog writes what was measured and exits if a phase hangs. With --quick on a CPU and a dist-tiny store
it runs in seconds (a smoke test of the script). A store to measure on a CPU: `python -m benchmarks.gpu_data`, then
`dist-cache extract --dense-frames` (what benchmarks/gpu.sh runs).

With --cached-only only (a) and (b) run: gpu.sh measures a compact copy of the store this way (int8 PCA codes,
fed to the model as stored; the projection folded into its first linears), beside the fp16 store's run.

    python -m benchmarks.gpu_train --store ZARR --out JSON [--quick] [--device cuda|cpu] [--batch 32] [--cached-only]
        [--video-root DIR (a store without frames)]
        [--pretrained PATH (the store's CLIP weights: a local checkpoint is never opened on the store's word)]
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from benchmarks._common import machine

if TYPE_CHECKING:
    from pipelines.train.step import StepModel

TARGET = 0.8


class Phases:
    """Measured numbers, written to --out after every phase; a watchdog writes them and exits on a hang."""

    def __init__(self, out: Path, limit_s: float, parameters: dict[str, Any], device: torch.device):
        self.out, self.results = out, {"machine": machine(), "parameters": parameters, "phases": {}}
        self.device = device
        self.current = "setup"
        self._watchdog = threading.Timer(limit_s, self._hung)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _hung(self) -> None:
        self.results["timed_out"] = self.current
        self.write()
        os._exit(3)

    def write(self) -> None:
        self.out.write_text(json.dumps(self.results, indent=1, default=str))

    def run(self, name: str, steps: Callable[[], Iterator[int]], budget_s: float, warmup: int) -> float:
        """clips/s of `steps` (each yields the clips of one finished step) after `warmup` steps, until the budget."""
        self.current = name
        cuda = self.device.type == "cuda"
        if cuda:  # this phase's peak alone: the models and batches of earlier phases are gone or still held
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        it = steps()
        for _ in range(warmup):
            next(it)
        clips, count, start = 0, 0, time.perf_counter()
        for n in it:
            clips += n
            count += 1
            if time.perf_counter() - start >= budget_s:
                break
        seconds = time.perf_counter() - start
        rate = clips / seconds
        self.results["phases"][name] = {"clips_per_s": round(rate, 2), "steps": count, "seconds": round(seconds, 2)}
        if cuda:
            self.results["phases"][name]["peak_gpu_GB"] = round(torch.cuda.max_memory_allocated(self.device) / 1e9, 2)
        self.write()
        return rate

    def finish(self) -> None:
        self._watchdog.cancel()
        self.current = None
        self.write()


def step_model(net: torch.nn.Module, text: torch.Tensor, mean: Any, std: Any, device: torch.device) -> StepModel:
    """`train`'s step state for `net` (its branch's AdamW at a fixed rate, the loss scaler, autocast as on `device`):
    what this script and `benchmarks.compact` time with `train_step`."""
    from pipelines.train.branch import amp_dtype, branch_of
    from pipelines.train.optim import make_optimizer, make_scaler
    from pipelines.train.step import StepModel

    branch = branch_of(net)
    optimizer, scheduler = make_optimizer(branch, lr=1e-5, weight_decay=1e-4, total=10**6, warmup=0,
                                          warmup_start_lr=1e-5)
    amp = amp_dtype(device)
    return StepModel(net, net, branch, optimizer, scheduler, make_scaler(amp), text, tuple(mean), tuple(std), amp,
                     0.1, 1.0)


def compute_bound(model: str, frames: int, layers: list[int], gamma: int) -> float | None:
    """The cached/online speedup at equal FLOP efficiency, from the FLOPs of one clip on the meta device; None for a
    model profile_dist cannot build by name (a config file's)."""
    from dist_cache.errors import UserError
    from dist_cache.flops import profile_dist

    try:
        parts = profile_dist(model, frames=frames, layers=layers, gamma=gamma)["gflops_by_part"]
    except UserError:
        return None
    branch = parts["temporal_encoder"] + parts["integration_branch"] + parts["head"]
    return (parts["clip"] + 3 * branch) / (3 * branch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="short budgets (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--video-root", default=None)
    p.add_argument("--pretrained", default=None)
    p.add_argument("--read-threads", type=int, default=12)  # 16 cores: the rest for the main loop and decoding
    p.add_argument("--cached-only", action="store_true", help="phases (a) and (b) only")
    args = p.parse_args()

    from dist_cache.model import DiSTConfig, DiSTSwitches
    from pipelines.train.branch import amp_dtype, build_network, online_precision
    from pipelines.train.data.loader import BatchLoader, EpochSampler, frame_source
    from pipelines.train.distributed import Ranks
    from pipelines.train.step import train_step
    from storage import FeatureStore, SampleStatus

    budget, warmup = (2.0, 1) if args.quick else (20.0, 3)
    device = torch.device(args.device)
    store = FeatureStore.open(args.store)
    gamma = 2
    precision = online_precision(store.schema.precision, device)
    # Below benchmarks/gpu.sh's limit for this step (200 s), so a hang still leaves the phases measured before it.
    phases = Phases(args.out, limit_s=30 + 4 * (budget + 15), parameters={
        "store": store.url, "batch": args.batch, "gamma": gamma, "layers": len(store.schema.layers),
        "frames": store.schema.num_frames, "store_dtype": store.schema.dtype, "dense_frames_stored": store.dense_gamma,
        "online_precision": precision, "amp": str(amp_dtype(device)), "device": str(device),
        "read_threads": args.read_threads, "budget_s_per_phase": budget,
        "store_format": store.schema.encoding and {k: store.schema.encoding[k] for k in ("pca", "quantization")},
        "frames_format": store.schema.frames_format}, device=device)
    usable = np.flatnonzero(store.status == SampleStatus.DONE)
    config = DiSTConfig.from_backbone(store.schema.backbone, store.schema.num_frames, list(store.schema.layers),
                                      switches=DiSTSwitches(gamma=gamma))
    ranks = Ranks(0, 1, device)
    text = torch.as_tensor(store.text_features, device=device)
    backbone = store.schema.backbone

    def loader(online: bool) -> BatchLoader:
        sampler = EpochSampler(usable, store.schema.views_per_video, args.batch, seed=0, train=True)
        frames = frame_source(store, gamma, args.video_root, decode_workers="auto", decode_timeout=60.0)
        return BatchLoader(store, sampler, layers=None if online else config.layers, frames=frames, device=device,
                           read_threads=args.read_threads)

    def in_memory(m: StepModel, online: bool) -> Callable[[], Iterator[int]]:
        source = loader(online)
        source.sampler.set_epoch(0)
        batch = next(iter(source))  # on the device; its buffers are device memory, kept
        source.close()

        def steps() -> Iterator[int]:
            while True:
                train_step(m, batch, ranks, store, 0)
                yield len(batch)
        return steps

    def end_to_end(m: StepModel, source: BatchLoader) -> Callable[[], Iterator[int]]:
        def steps() -> Iterator[int]:
            epoch = 0
            while True:
                source.sampler.set_epoch(epoch)
                for batch in source:
                    train_step(m, batch, ranks, store, 0)
                    yield len(batch)
                epoch += 1
        return steps

    rates = {}
    for online in (False,) if args.cached_only else (False, True):
        name = "online" if online else "cached"
        net = build_network(config, online=online, backbone_record=backbone, pretrained=args.pretrained,
                            device=device, seed=0, precision=precision)
        m = step_model(net, text, backbone["mean"], backbone["std"], device)
        rates[f"{name}_step"] = phases.run(f"{name}_step", in_memory(m, online), budget, warmup)
        source = loader(online)
        try:
            rates[f"{name}_e2e"] = phases.run(f"{name}_e2e", end_to_end(m, source), budget, warmup)
        finally:
            source.close()
        del m, net
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next model starts from the memory it needs, not this one's pool
    cached_ratio = rates["cached_e2e"] / rates["cached_step"]
    if args.cached_only:
        phases.results.update(ratio={"cached_e2e_over_step": round(cached_ratio, 3)},
                              goal=f"end to end >= {TARGET} of the model step alone, cached",
                              verdict="met" if cached_ratio >= TARGET else "missed")
        phases.finish()
        print(json.dumps(phases.results, indent=1, default=str))
        return
    online_ratio = rates["online_e2e"] / rates["online_step"]
    speedup = rates["cached_e2e"] / rates["online_e2e"]
    bound = compute_bound(backbone["model"], store.schema.num_frames, config.layers, gamma)
    t_branch = 1 / rates["cached_step"]  # the online step is CLIP's forward plus the same branch step
    phases.results.update(
        compute_bound_cached_over_online=bound and round(bound, 2),
        seconds_per_clip={"clip": round(1 / rates["online_step"] - t_branch, 4), "branch": round(t_branch, 4)},
        ratio={"cached_e2e_over_step": round(cached_ratio, 3), "online_e2e_over_step": round(online_ratio, 3),
               "cached_over_online_e2e": round(speedup, 3),
               "cached_over_online_step": round(rates["cached_step"] / rates["online_step"], 3),
               "cached_over_online_e2e_over_bound": bound and round(speedup / bound, 3)},
        goal=f"end to end >= {TARGET} of the model step alone, cached and online; cached/online end to end >= "
             f"{TARGET} of the compute bound",
        verdict="met" if min(cached_ratio, online_ratio, speedup / (bound or speedup)) >= TARGET else "missed")
    phases.finish()
    print(json.dumps(phases.results, indent=1, default=str))


if __name__ == "__main__":
    from dist_cache.errors import UserError

    try:
        main()
    except UserError as err:  # e.g. a store without dense frames and no --video-root: one line, not a traceback
        raise SystemExit(f"error: {err}") from None
