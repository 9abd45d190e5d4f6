"""Cached tokens as PCA codes, and the linear maps of DiST that read them with the projection folded in.

A projected compact store keeps, per layer, codes z = (x - mu) @ B.T of the tokens x (B: K x C, components as
rows). Every map of DiST that reads cached tokens is linear and comes first: FC_l (C -> alpha*C) on every token,
and the head's Linear on the mean over frames of the last layer's class token. So

    FC_l(x) = W (mu + B.T z) + b = (W B.T) z + (W mu + b)

is exact: the step multiplies the K-dim codes by the folded weight W B.T (alpha*C x K), computed from W on the device
every step, and the parameters stay W and b in C space. int8 codes (with or without PCA) reach the model as stored
and are dequantised layer by layer where they are read. A checkpoint trained on codes is the same kind of checkpoint
as one trained on fp16 tokens, and evaluates on either (or online). docs/MODEL.md, "Compact stores: the fold".
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from dist_cache.model.common import without_autocast


class CompactTokens:
    """A batch of a compact store's tokens as stored, decoded layer by layer where the model reads them.

    Per layer: `codes` (B, T, N+1, D_l) as stored (fp16, or int8 with `scales` (B, T, N+1, 2) per token and channel
    group, `channel_scales` (D_l,) and `groups` (D_l,): x = codes * scales[..., groups] * channel_scales, as
    storage/quantize.py), and, for PCA codes, the store's `mean` (L, C) and `components` (K_l, C) float32. The
    tokens x_l = mean_l + z_l @ components_l are never formed: TokenLinear folds the projection in. Dequantising
    where a layer is read keeps the batch in device memory as stored (int8: a quarter of float32)."""

    def __init__(self, codes: list[torch.Tensor], *, scales: list[torch.Tensor] | None = None,
                 channel_scales: list[torch.Tensor] | None = None, groups: list[torch.Tensor] | None = None,
                 mean: torch.Tensor | None = None, components: list[torch.Tensor] | None = None):
        self.codes, self.scales, self.channel_scales, self.groups = codes, scales, channel_scales, groups
        self.mean, self.components = mean, components
        width = codes[0].shape[-1] if components is None else components[0].shape[1]
        for n, z in enumerate(codes):
            dim = z.shape[-1] if components is None else components[n].shape[0]
            if z.dim() != 4 or z.shape[:3] != codes[0].shape[:3] or z.shape[-1] != dim or \
                    (components is not None and components[n].shape[1] != width):
                raise ValueError(f"layer {n}: codes {tuple(z.shape)} do not match the others or their components")
        if (scales is None) != (channel_scales is None) or (scales is None) != (groups is None):
            raise ValueError("int8 codes need their token scales, channel scales and groups")
        self.width = int(width)

    @property
    def num_layers(self) -> int:
        return len(self.codes)

    @property
    def projected(self) -> bool:
        return self.components is not None

    @property
    def shape(self) -> tuple[int, ...]:
        """(L, B, T, N+1, C): the shape of the tokens these codes stand for."""
        return (self.num_layers, *self.codes[0].shape[:3], self.width)

    def values(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Layer i's codes (B, T, N+1, D_l) dequantised: in float32, rounded once into `dtype`."""
        z = self.codes[i]
        if self.scales is None:
            return z.to(dtype)
        groups, r = self.groups[i], self.channel_scales[i]  # type: ignore[index]
        return (z.float() * self.scales[i].float()[..., groups] * r).to(dtype)

    def layer(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Layer i as a TokenLinear takes it: (tokens,) or (codes, components, mean)."""
        if self.components is None:
            return (self.values(i, dtype),)
        return self.values(i, dtype), self.components[i], self.mean[i]  # type: ignore[index]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> CompactTokens:
        """`fn` (which takes and returns tokens (L, B, T, N+1, D)) applied to each layer's dequantised codes: mixing.
        Mixup and cutmix combine samples with weights that sum to 1, and x = mean + z @ B is affine, so mixing codes
        is mixing tokens."""
        # PCA codes are small: mixed in float32; tokens in float16, as a plain store's batch is.
        dtype = torch.float32 if self.projected else torch.float16
        mixed = [fn(self.values(i, dtype).unsqueeze(0))[0] for i in range(self.num_layers)]
        return CompactTokens(mixed, mean=self.mean, components=self.components)


TokenBatch = torch.Tensor | CompactTokens


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
    if isinstance(features, CompactTokens):
        return features.layer(i, dtype)
    return (features[i].to(dtype),)


def class_tokens(features: TokenBatch, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The last layer's class tokens (B, T, C) (or their codes (B, T, K), with components and mean)."""
    if isinstance(features, CompactTokens):
        first, *fold = features.layer(features.num_layers - 1, dtype)
        return (first[:, :, 0], *fold)
    return (features[-1, :, :, 0].to(dtype),)
