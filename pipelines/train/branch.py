"""Building and running the DiST branch in stage two, from cached features or with CLIP run live.

Training, validation and evaluation all feed batches through `embed`, so the cached and the online
path differ in one place only: where the per-layer tokens come from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_cache.backbone import load_recorded_backbone
from dist_cache.mixing import Mix
from dist_cache.model import DiST, DiSTConfig, OnlineDiST
from dist_cache.model.compact import CompactTokens
from dist_cache.transforms import normalize_frames
from pipelines.train.data.loader import Batch

Network = DiST | OnlineDiST


def build_network(
    config: DiSTConfig,
    *,
    online: bool,
    backbone_record: dict[str, Any],
    pretrained: str | None,
    device: torch.device,
    seed: int,
    precision: str = "fp32",
) -> Network:
    """A DiST initialised from `seed`, wrapped with the store's frozen CLIP when `online`.

    `precision` is how the online CLIP runs: pass the one extraction used, so the live features are those the
    cache holds. The backbone is loaded first and the seed set after it, so the branch's initial weights do
    not depend on whether it runs cached or online.
    """
    encoder = None
    if online:
        # Rebuilt from the store's record and checked against its weight hash, so the live features
        # are those the cache would hold.
        backbone = load_recorded_backbone(backbone_record, pretrained, device=device, precision=precision)
        encoder = backbone.spatial_encoder(config.layers)
    torch.manual_seed(seed)
    dist = DiST(config)
    net: Network = dist if encoder is None else OnlineDiST(encoder, dist)
    return net.to(device)


def branch_of(net: Network) -> DiST:
    """The trainable part: what checkpoints hold (never CLIP)."""
    return net.dist if isinstance(net, OnlineDiST) else net


def online_precision(recorded: str, device: torch.device) -> str:
    """The precision the online CLIP runs in: the store's recorded one, so the live features are those the
    cache holds; a CPU cannot run fp16, so an fp16 store's CLIP runs in fp32 there (the nearer of the two)."""
    return "fp32" if device.type == "cpu" and recorded == "fp16" else recorded


def embed(
    net: Network | DistributedDataParallel,
    batch: Batch,
    mean: Sequence[float],
    std: Sequence[float],
    mix: Mix | None = None,
) -> torch.Tensor:
    """Video embeddings (B, E) of a `Batch` already on the model's device; `net` may be DDP-wrapped (training).

    The batch's uint8 frames are normalised here, on the device, with the store's `mean` and `std`, as
    extraction normalised CLIP's input. `mix` (training) then mixes the normalised frames, before CLIP and the
    temporal encoder see them, and the cached tokens."""
    frames = None if batch.frames is None else normalize_frames(batch.frames, mean, std)
    features = batch.features
    if mix is not None:
        frames = None if frames is None else mix.pixels(frames)
        if isinstance(features, CompactTokens):  # codes mix like tokens: x = mean + z @ B is affine
            features = features.map(mix.tokens)
        elif features is not None:
            features = mix.tokens(features)
    inner = net.module if isinstance(net, DistributedDataParallel) else net
    if isinstance(inner, OnlineDiST):
        return net(frames)
    return net(features, frames)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only (bf16 where supported, else fp16); CPU runs stay in fp32."""
    dtype = amp_dtype(device)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The training step's autocast dtype: bf16 on GPUs that have it, fp16 (with loss scaling) on others, none
    on the CPU. The logits and the loss stay fp32 whatever it is (`DiST.logits`)."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
