"""The temporal encoder: a 3D patch stem over the gamma*T dense frames and one T-Block per integrated layer.

Features stay (B, βC, γT, h, w) throughout: no temporal or spatial downsampling after the stem, so the grid
matches CLIP's patch grid and Ψ/Φ only need to change the time axis and the width (docs/MODEL.md, "Structure").
"""

from __future__ import annotations

import torch
from torch import nn

from dist_cache.model.common import ChannelLayerNorm3d, QuickGELU, mlp
from dist_cache.model.config import DiSTConfig


class TemporalStem(nn.Module):
    """Conv3d 3 -> βC with kernel (k, P, P), stride (1, P, P): CLIP's patch grid, every dense frame kept."""

    def __init__(self, beta_dim: int, patch_size: int, t_kernel: int):
        super().__init__()
        self.conv = nn.Conv3d(
            3, beta_dim, kernel_size=(t_kernel, patch_size, patch_size),
            stride=(1, patch_size, patch_size), padding=(t_kernel // 2, 0, 0),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames (B, γT, 3, H, W) -> (B, βC, γT, H/P, W/P)."""
        return self.conv(frames.transpose(1, 2))


class R2Plus1DBlock(nn.Module):
    """Reference T-Block: QuickGELU(z + Conv(1,3,3)(QuickGELU(Conv(3,1,1)(LN(z))))).

    Temporal conv first, then spatial: the reverse of classic R(2+1)D, as the reference has it. The
    activation after the residual add (post-activation) is also the reference's.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelLayerNorm3d(dim)
        self.conv_t = nn.Conv3d(dim, dim, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        self.act = QuickGELU()
        self.conv_s = nn.Conv3d(dim, dim, kernel_size=(1, 3, 3), padding=(0, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(z + self.conv_s(self.act(self.conv_t(self.norm(z)))))


class C3DBlock(nn.Module):
    """Tab. 1c's C3D variant: the same residual block with one full 3x3x3 conv instead of the (2+1)D pair."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelLayerNorm3d(dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.act = QuickGELU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.act(z + self.conv(self.norm(z)))


class TemporalCalibration(nn.Module):
    """TAdaConv's calibration branch (Huang et al., ICLR 2022, "routing function"): per frame and input channel, a
    factor alpha_t = 1 + b(ReLU(BN(a(x_t + g(x_global))))) generated from temporal context.

    x_t is frame t's spatial average and x_global the whole clip's; g is a pointwise map (C -> C), a and b are
    convolutions over time (kernel 3; C -> C/4 -> C) with BatchNorm and ReLU between them, as in TAdaConv.
    """

    def __init__(self, dim: int, ratio: int = 4, kernel: int = 3):
        super().__init__()
        hidden = max(1, dim // ratio)
        self.g = nn.Linear(dim, dim)
        self.a = nn.Conv1d(dim, hidden, kernel, padding=kernel // 2)
        self.bn = nn.BatchNorm1d(hidden)
        self.b = nn.Conv1d(hidden, dim, kernel, padding=kernel // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T, H, W) -> alpha (B, C, T)."""
        frames = x.mean(dim=(3, 4))  # (B, C, T)
        clip = self.g(frames.mean(dim=2))  # (B, C)
        return 1 + self.b(torch.relu(self.bn(self.a(frames + clip[:, :, None]))))


class TAdaBlock(nn.Module):
    """Tab. 1c's TAdaConv variant: QuickGELU(z + TAdaConv(1,3,3)(LN(z))), the C3D block's shape with its 3D conv
    replaced by a temporally adaptive spatial conv.

    TAdaConv convolves frame t with the kernel W_t = alpha_t * W (alpha_t calibrating W's input channels, TAdaConv's
    default). A per-input-channel factor that is constant over the frame commutes with the convolution, so
    conv(x_t, alpha_t * W) = conv(alpha_t * x_t, W): the calibrated kernels are applied exactly by scaling the
    input and running one ordinary Conv(1,3,3) over all frames (tests/test_model.py checks the identity).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = ChannelLayerNorm3d(dim)
        self.calibration = TemporalCalibration(dim)
        self.conv = nn.Conv3d(dim, dim, kernel_size=(1, 3, 3), padding=(0, 1, 1))
        self.act = QuickGELU()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.norm(z)
        alpha = self.calibration(x)
        return self.act(z + self.conv(x * alpha[:, :, :, None, None]))


class JointAttentionBlock(nn.Module):
    """Tab. 1c's joint space-time transformer: pre-LN MHSA over all γT*h*w tokens, then a pre-LN MLP (4x).

    The reference code has no such block; this is the standard ViT block. It adds no positional embedding:
    the stem's temporal kernel and the Φ input already make tokens position-dependent. Its attention is
    quadratic in γT*h*w, so it is far more expensive than the convolutional blocks at ViT-B sizes.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, 4 * dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = z.shape
        x = z.flatten(2).transpose(1, 2)  # (B, γT*h*w, C), time-major
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        x = x + self.mlp(self.norm2(x))
        return x.transpose(1, 2).reshape(b, c, t, h, w)


def make_t_block(config: DiSTConfig) -> nn.Module:
    kind, dim = config.switches.t_block, config.switches.beta_dim
    if kind == "r2plus1d":
        return R2Plus1DBlock(dim)
    if kind == "c3d":
        return C3DBlock(dim)
    if kind == "tada":
        return TAdaBlock(dim)
    return JointAttentionBlock(dim, config.joint_num_heads)


class TemporalEncoder(nn.Module):
    """Stem plus one T-Block per integrated layer. DiST.forward steps through `blocks` itself, because the
    integration branch interleaves with them (Φ feeds each layer's output into the next T-Block)."""

    def __init__(self, config: DiSTConfig):
        super().__init__()
        self.stem = TemporalStem(config.switches.beta_dim, config.patch_size, config.switches.stem_t_kernel)
        self.blocks = nn.ModuleList(make_t_block(config) for _ in range(config.num_layers))
