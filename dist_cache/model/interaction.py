"""Ψ (temporal encoder -> integration branch) and Φ (integration branch -> temporal encoder), paper Eq. 5-6.

Both agree on one alignment: sparse slot k (CLIP frame = dense frame γk) corresponds to the dense window
γk .. γk+γ-1. Ψ reads that window, and nearest-mode Φ writes back onto it (docs/MODEL.md, "Structure").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dist_cache.model.common import new_token
from dist_cache.model.config import DiSTConfig


class Psi(nn.Module):
    """(B, βC, γT, h, w) -> (B, T, N+1, αC): downsample time by γ, widen to αC, flatten, prepend a cls token.

    mode "dconv" (reference, Eq. 5): Conv3d βC->αC with kernel = stride = (γ,1,1).
    mode "avg" / "max" (Tab. 2a): pool each γ window, then Linear βC->αC.
    The cls token has shape (1, T, 1, αC): one per frame slot and per layer, shared across the batch.
    """

    def __init__(self, config: DiSTConfig):
        super().__init__()
        s = config.switches
        self.mode = s.psi
        self.gamma = s.gamma
        if self.mode == "dconv":
            self.down = nn.Conv3d(s.beta_dim, s.alpha_dim, kernel_size=(s.gamma, 1, 1), stride=(s.gamma, 1, 1))
        else:
            self.down = nn.Linear(s.beta_dim, s.alpha_dim)
        self.cls_token = new_token(1, config.num_frames, 1, s.alpha_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "dconv":
            y = self.down(z).flatten(3).permute(0, 2, 3, 1)  # (B, T, h*w, αC), row-major patches
        else:
            pool = F.avg_pool3d if self.mode == "avg" else F.max_pool3d
            window = (self.gamma, 1, 1)
            y = self.down(pool(z, window, window).flatten(3).permute(0, 2, 3, 1))
        cls = self.cls_token.expand(y.shape[0], -1, -1, -1).to(y.dtype)
        return torch.cat([cls, y], dim=2)


class Phi(nn.Module):
    """(B, T, N+1, αC) -> (B, βC, γT, h, w): drop cls, Linear αC->βC, upsample time T -> γT (Eq. 6).

    mode "nearest" (reference): each slot repeated γ times, onto the window Ψ reads.
    mode "trilinear" (Tab. 2b): F.interpolate over time (align_corners=False, so slot centres sit mid-window).
    mode "deconv" (Tab. 2b): ConvTranspose3d βC->βC with kernel = stride = (γ,1,1).
    """

    def __init__(self, config: DiSTConfig):
        super().__init__()
        s = config.switches
        self.mode = s.phi
        self.gamma = s.gamma
        self.grid = config.grid
        self.reduce = nn.Linear(s.alpha_dim, s.beta_dim)
        if self.mode == "deconv":
            self.up = nn.ConvTranspose3d(s.beta_dim, s.beta_dim, kernel_size=(s.gamma, 1, 1), stride=(s.gamma, 1, 1))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        b, t = m.shape[:2]
        y = self.reduce(m[:, :, 1:])  # (B, T, h*w, βC)
        y = y.permute(0, 3, 1, 2).reshape(b, -1, t, *self.grid)
        if self.mode == "nearest":
            return y.repeat_interleave(self.gamma, dim=2)
        if self.mode == "trilinear":
            return F.interpolate(y, size=(t * self.gamma, *self.grid), mode="trilinear", align_corners=False)
        return self.up(y)
