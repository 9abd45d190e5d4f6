"""Small building blocks shared by the DiST modules, and the reference's weight initialisation."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): CLIP's activation, used everywhere in the reference branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ChannelLayerNorm3d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, T, H, W) tensor, per position (the T-Block's only norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 4, 1)).permute(0, 4, 1, 2, 3)


def mlp(dim: int, hidden: int) -> nn.Sequential:
    """Linear -> QuickGELU -> Linear, the feed-forward shape used by the I-Block and the pooling head."""
    return nn.Sequential(nn.Linear(dim, hidden), QuickGELU(), nn.Linear(hidden, dim))


def new_token(*shape: int) -> nn.Parameter:
    """A learned token (cls, query or positional embedding), trunc-normal std .02 like the reference."""
    token = nn.Parameter(torch.empty(*shape))
    nn.init.trunc_normal_(token, std=0.02)
    return token


def init_reference_weights(module: nn.Module) -> None:
    """The reference's `_init_weights`: every Conv and Linear (MHA out_proj included) trunc-normal std .02, bias 0.

    LayerNorms keep (1, 0), the MHA in_proj keeps PyTorch's xavier-uniform, and nothing is zero-initialised,
    so the branch perturbs the CLIP path from the first step (docs/MODEL.md, "Structure").
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose3d)):
            nn.init.trunc_normal_(sub.weight, std=0.02)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Switch autocast off where it exists; the meta device (FLOP counting) has none to switch off."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
