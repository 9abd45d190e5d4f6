"""The integration branch: per layer, FC_l (C -> αC) on CLIP's tokens and an I-Block (paper Eq. 4)."""

from __future__ import annotations

import torch
from torch import nn

from dist_cache.model.common import QuickGELU, mlp
from dist_cache.model.compact import TokenLinear
from dist_cache.model.config import DiSTConfig

# Reference INTEGRATION_MLP_RATIO and INTEGRATION_TEMPORAL_MLP_RATIO.
FFN_RATIO = 1
TFFN_RATIO = 0.25


class TemporalFFN(nn.Module):
    """Pointwise αC -> αC/4, Conv over time (kernel 3) per token position, QuickGELU, pointwise back.

    The reference writes the pointwise steps as 1x1x1 Conv3d on a (B, αC, T, N+1, 1) tensor; Linear layers
    are the same map with the same parameter count. No activation between the first two steps (reference).
    Every token position, cls included, is convolved over time independently.
    """

    def __init__(self, dim: int):
        super().__init__()
        hidden = max(1, int(dim * TFFN_RATIO))
        self.down = nn.Linear(dim, hidden)
        self.conv_t = nn.Conv2d(hidden, hidden, kernel_size=(3, 1), padding=(1, 0))  # == Conv3d (3,1,1) here
        self.act = QuickGELU()
        self.up = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, N+1, αC) -> same shape."""
        y = self.down(x).permute(0, 3, 1, 2)  # (B, hidden, T, N+1)
        y = self.act(self.conv_t(y)).permute(0, 2, 3, 1)
        return self.up(y)


class IBlock(nn.Module):
    """Y = FFN(LN_a(Ŷ)) + TFFN(LN_b(Ŷ)), with two separate LayerNorms.

    There is deliberately no identity term: the residual is carried by the caller (M = FC(X) + R in the
    next layer, F = R + M' after the last), exactly as in the reference.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm_a = nn.LayerNorm(dim)
        self.ffn = mlp(dim, dim * FFN_RATIO)
        self.norm_b = nn.LayerNorm(dim)
        self.tffn = TemporalFFN(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.norm_a(x)) + self.tffn(self.norm_b(x))


class IntegrationBranch(nn.Module):
    """FC_l (C -> αC, on all N+1 raw pre-LN CLIP tokens, or on their PCA codes with the projection folded in:
    `TokenLinear`) and I-Block_l for every integrated layer."""

    def __init__(self, config: DiSTConfig):
        super().__init__()
        self.fcs = nn.ModuleList(TokenLinear(config.width, config.switches.alpha_dim)
                                 for _ in range(config.num_layers))
        self.blocks = nn.ModuleList(IBlock(config.switches.alpha_dim) for _ in range(config.num_layers))
