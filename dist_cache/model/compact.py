"""Cached tokens as PCA codes, and the linear maps of DiST that read them with the projection folded in.

A projected compact store keeps, per layer, codes z = (x - mu) @ B.T of the tokens x (B: K x C, components as
rows). Every map of DiST that reads cached tokens is linear and comes first: FC_l (C -> alpha*C) on every token,
and the head's Linear on the mean over frames of the last layer's class token. So

    FC_l(x) = W (mu + B.T z) + b = (W B.T) z + (W mu + b)

is exact: the step multiplies the K-dim codes by the folded weight W B.T (alpha*C x K), computed from W on the device
every step, and the parameters stay W and b in C space. A checkpoint trained on codes is the same kind of checkpoint
as one trained on fp16 tokens, and evaluates on either (or online). docs/MODEL.md, "Compact stores: the fold".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dist_cache.model.common import without_autocast


class ProjectedTokens:
    """A batch of a projected store's tokens, never formed: per layer, codes (B, T, N+1, K_l) (any float dtype,
    dequantised), with the store's `mean` (L, C) and per-layer `components` (K_l, C), float32, on the same device."""

    def __init__(self, codes: list[torch.Tensor], mean: torch.Tensor, components: list[torch.Tensor]):
        if not (len(codes) == len(components) == mean.shape[0]):
            raise ValueError(f"{len(codes)} layers of codes, {len(components)} of components, {mean.shape[0]} means")
        for z, basis in zip(codes, components):
            if z.dim() != 4 or z.shape[-1] != basis.shape[0] or basis.shape[1] != mean.shape[1] \
                    or z.shape[:3] != codes[0].shape[:3]:
                raise ValueError(f"codes {tuple(z.shape)} do not match components {tuple(basis.shape)} of width "
                                 f"{mean.shape[1]}")
        self.codes, self.mean, self.components = codes, mean, components

    @property
    def num_layers(self) -> int:
        return len(self.codes)

    @property
    def width(self) -> int:
        return int(self.mean.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """(L, B, T, N+1, C): the shape of the tokens these codes stand for."""
        return (self.num_layers, *self.codes[0].shape[:3], self.width)

    def layer(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer i's (codes in `dtype`, components, mean): the arguments of a TokenLinear."""
        return self.codes[i].to(dtype), self.components[i], self.mean[i]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ProjectedTokens:
        """`fn` (which takes and returns tokens (L, B, T, N+1, D)) applied to each layer's codes: mixing. Mixup and
        cutmix combine samples with weights that sum to 1, and x = mu + B.T z is affine, so mixing codes is
        mixing tokens."""
        return ProjectedTokens([fn(z.unsqueeze(0))[0] for z in self.codes], self.mean, self.components)

    def tokens(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The reconstructed tokens (L, B, T, N+1, C): what a reader that wants tokens gets (not used by the step)."""
        return torch.stack([(z.float() @ basis + mu).to(dtype)
                            for z, basis, mu in zip(self.codes, self.components, self.mean)])


TokenBatch = torch.Tensor | ProjectedTokens


class TokenLinear(nn.Linear):
    """nn.Linear on CLIP tokens (C -> out), which also takes PCA codes with the projection folded in.

    `forward(x)` is nn.Linear's. `forward(z, components, mean)` computes the same function of the tokens
    x = mean + z @ components, as F.linear(z, W @ components.T, W @ mean + b). The folded weight and bias are
    formed in float32 outside autocast every call (alpha*C x C x K multiply-adds per call: per step, not per clip),
    so gradients reach W and b as if the tokens had been read, and the state dict is nn.Linear's."""

    def forward(self, x: torch.Tensor, components: torch.Tensor | None = None,
                mean: torch.Tensor | None = None) -> torch.Tensor:
        if components is None:
            return super().forward(x)
        with without_autocast(x.device.type):
            weight = self.weight.float()
            folded = weight @ components.float().t()
            # A (C, 1) matrix rather than a vector: the same product, and FLOP counters see matrix products only.
            bias = (weight @ mean.float().unsqueeze(-1)).squeeze(-1)
            if self.bias is not None:
                bias = bias + self.bias.float()
        return F.linear(x, folded.to(x.dtype), bias.to(x.dtype))


def layer_input(features: TokenBatch, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The arguments of a TokenLinear reading layer i of `features` (tokens (L, B, T, N+1, C), or codes)."""
    if isinstance(features, ProjectedTokens):
        return features.layer(i, dtype)
    return (features[i].to(dtype),)


def class_tokens(features: TokenBatch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The last layer's class tokens (B, T, C) (or their codes (B, T, K), with components and mean)."""
    if isinstance(features, ProjectedTokens):
        z, basis, mu = features.layer(features.num_layers - 1, dtype)
        return z[:, :, 0], basis, mu
    return (features[-1, :, :, 0].to(dtype),)
