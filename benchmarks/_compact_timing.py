"""The compact-store study's timings (benchmarks.compact --only timing): to be taken on a quiet machine.

* loader: `BatchLoader` (reader threads, stored frames, as `train` reads) over a ViT-B/16-shaped store and its
  compact copies, each against a plain read of its own bytes (every shard file of its features or codes, token
  scales and frames, open().read()), warm page cache, interleaved rounds, medians;
* step: the training step (`pipelines.train.step.train_step`, AdamW, the default DiST branch) on fp16 tokens against the
  same step on a compact batch (`CompactTokens`: int8 dequantised where each layer is read, PCA codes through the
  folded FC_l and head), the same branch weights and frames, interleaved; beside the FLOPs the profile counts.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._compact_formats import format_store, parse_format

LOADER_FORMATS = ("int8", "pca128-int8", "pca128-int8+jpeg")
STEP_FORMATS = ("int8", "pca128", "pca128-int8")


def loader_rates(workdir: Path, quick: bool, batch: int, threads: int) -> dict:
    """clips/s of the loader and of a plain read, per format (fp16 and LOADER_FORMATS), and their ratio."""
    from benchmarks.data_loader import GAMMA, build_store, plain_read
    from pipelines.train.data.loader import BatchLoader, EpochSampler, StoredFrames
    from storage import FeatureStore

    videos, views, seconds = (2, 2, 2.0) if quick else (12, 3, 6.0)
    rounds = 1 if quick else 3
    url, _ = build_store(workdir, videos, views, seconds)
    urls = {"fp16": url, **{name: str(format_store(Path(url), name, workdir)) for name in LOADER_FORMATS}}
    stores = {name: FeatureStore.open(u) for name, u in urls.items()}
    n = len(stores["fp16"])
    sampler = EpochSampler(np.arange(n), views, batch, train=False)
    loaders = {name: BatchLoader(s, sampler, layers=list(s.schema.layers), frames=StoredFrames(s, GAMMA),
                                 device=torch.device("cpu"), read_threads=threads) for name, s in stores.items()}
    sides = [(name, kind) for name in urls for kind in ("plain", "loader")]
    nbytes = {name: plain_read(u)[1] for name, u in urls.items()}  # warms the page cache
    for loader in loaders.values():
        list(loader)
    rates: dict[tuple[str, str], list[float]] = {side: [] for side in sides}
    try:
        for r in range(rounds):
            for name, kind in sides[r % len(sides):] + sides[:r % len(sides)]:  # rotating: load hits each alike
                start = time.perf_counter()
                if kind == "plain":
                    plain_read(urls[name])
                else:
                    for _ in loaders[name]:
                        pass
                rates[name, kind].append(n / (time.perf_counter() - start))
    finally:
        for loader in loaders.values():
            loader.close()
    out = {}
    for name in urls:
        plain, loader = statistics.median(rates[name, "plain"]), statistics.median(rates[name, "loader"])
        out[name] = {"MB_per_clip_read": round(nbytes[name] / n / 1e6, 3), "plain_clips_per_s": round(plain, 2),
                     "loader_clips_per_s": round(loader, 2), "loader_over_plain": round(loader / plain, 3),
                     "rounds": {"plain": [round(x, 2) for x in rates[name, "plain"]],
                                "loader": [round(x, 2) for x in rates[name, "loader"]]}}
    return {"samples": n, "batch": batch, "read_threads": threads, "rounds": rounds, "formats": out}


def _compact_batch(tokens: torch.Tensor, name: str, device: torch.device):
    """The CompactTokens a loader hands the step for `tokens` (L, B, T, N+1, C) stored as format `name`, with the
    format fitted on these tokens (storage/pca.py)."""
    from pipelines.compact_device import DeviceEncoding
    from storage.pca import FitAccumulator, fit

    options = parse_format(name)
    L, B, T, N1, C = tokens.shape
    flat = tokens.float().reshape(L, -1, C).numpy()
    acc = FitAccumulator(L, C, FitAccumulator.stride_for(flat.shape[1]))
    acc.add(flat)
    encoding = fit(acc, options.get("pca"), quantize=options.get("dtype") == "int8").encoding
    device_encoding = DeviceEncoding(encoding, list(range(L)), T, N1, device)
    per_layer = [device_encoding.encode_layer(n, tokens[n].to(device)) for n in range(L)]
    scales = None if per_layer[0][1] is None else torch.stack([s for _, s in per_layer], dim=1)
    if encoding.projected:
        codes = torch.cat([c.reshape(B, -1) for c, _ in per_layer], dim=1)
    else:
        codes = torch.stack([c for c, _ in per_layer], dim=1)
    return device_encoding.tokens(codes, scales)


def step_times(quick: bool, device: torch.device, batch: int, reps: int) -> dict:
    """Seconds per training step on fp16 tokens and on each STEP_FORMATS batch (ViT-B/16 shapes; --quick: the tiny
    CLIP's), interleaved, medians; and the profile's branch GFLOPs on tokens and on PCA codes."""
    from benchmarks.gpu_train import step_model
    from dist_cache.backbone import load_backbone
    from dist_cache.flops import profile_dist
    from dist_cache.model import DiST, DiSTConfig, DiSTSwitches
    from pipelines.train.data.loader import Batch
    from pipelines.train.distributed import Ranks
    from pipelines.train.step import train_step

    model, T, gamma = ("dist-tiny", 4, 2) if quick else ("ViT-B-16", 8, 2)
    backbone = load_backbone(model, "none", allow_random_weights=True)
    layers = list(range(backbone.num_layers))
    config = DiSTConfig(width=backbone.width, patch_size=backbone.patch_size, image_size=backbone.image_size,
                        num_frames=T, embed_dim=backbone.embed_dim, layers=layers,
                        switches=DiSTSwitches(gamma=gamma))
    torch.manual_seed(0)
    net = DiST(config).to(device).train()
    text = torch.randn(4, config.embed_dim, device=device)
    state, ranks = step_model(net, text, backbone.mean, backbone.std, device), Ranks(0, 1, device)

    def step(batch: Batch) -> None:
        train_step(state, batch, ranks, None, 0)
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (batch, config.dense_frames, config.image_size, config.image_size, 3),
                           generator=g, dtype=torch.uint8).to(device)
    # Tokens with a ViT's spread of channel scales (the values do not change the step's cost, only the fit's K).
    tokens = (torch.randn(len(layers), batch, T, config.num_tokens, config.width, generator=g)
              * torch.rand(len(layers), 1, 1, 1, config.width, generator=g).add(0.2)).half()
    label = torch.arange(batch, device=device) % 4
    index = np.arange(batch)
    batches = {"fp16": Batch(index, index, label, tokens.to(device), frames)}
    for name in STEP_FORMATS:
        batches[name] = Batch(index, index, label, _compact_batch(tokens, name, device), frames)
    for b in batches.values():
        step(b)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in batches}
    for _ in range(reps):
        for name, b in batches.items():  # interleaved, so load hits each alike
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    profile = profile_dist(model, frames=T, gamma=gamma, pca_k=min(128, backbone.width))["pca"]
    return {"model": f"{model} shapes (random tokens)", "batch": batch, "reps": reps, "device": str(device),
            "step_s": {name: round(t, 4) for name, t in median.items()},
            "over_fp16": {name: round(t / median["fp16"], 3) for name, t in median.items() if name != "fp16"},
            "all_steps_s": {name: [round(x, 4) for x in t] for name, t in times.items()},
            "profile_pca128": profile}
