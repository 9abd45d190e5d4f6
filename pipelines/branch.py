"""Building and running the DiST branch in stage two, from cached features or with CLIP run live.

Training, validation and evaluation all feed batches through `embed`, so the cached and the online
path differ in one place only: where the per-layer tokens come from.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

from dist_cache.backbone import load_recorded_backbone
from dist_cache.model import DiST, DiSTConfig, OnlineDiST
from dist_cache.transforms import normalize_frames

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


def embed(
    net: Network | DistributedDataParallel,
    batch: dict[str, torch.Tensor],
    device: torch.device,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """Video embeddings (B, E) of a collated batch from `StoreClips`; `net` may be DDP-wrapped (training).

    The batch's uint8 frames are normalised here, on the device, with the store's `mean` and `std`, as
    extraction normalised CLIP's input."""
    frames = None
    if "frames" in batch:
        frames = normalize_frames(batch["frames"].to(device, non_blocking=True), mean, std)
    inner = net.module if isinstance(net, DistributedDataParallel) else net
    if isinstance(inner, OnlineDiST):
        return net(frames)
    # The loader stacks samples first, (B, L, T, N+1, C); DiST takes layers first.
    features = batch["features"].to(device, non_blocking=True).transpose(0, 1)
    return net(features, frames)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA only (bf16 where supported, else fp16); CPU runs stay in fp32."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=amp_dtype(device))


def amp_dtype(device: torch.device) -> torch.dtype | None:
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
