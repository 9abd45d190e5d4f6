"""A compact store's encoding on the device: encode CLIP's tokens where extraction computes them, and hand what a
training batch read to the model as `CompactTokens` (codes as stored, with the parameters: int8 is dequantised
where each layer is read, and PCA codes are never reconstructed).

The same arithmetic as storage/encoding.py and storage/quantize.py (numpy, the reference that `FeatureStore` and the
README's recipe follow), in torch, so the bytes that cross to and from the host are the stored ones: codes and int8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_cache.model.compact import CompactTokens
from storage.encoding import Encoding
from storage.quantize import GROUPS, QMAX

# The smallest positive fp16 (a subnormal): the floor of a token scale, as storage/quantize.py's _MIN_SCALE.
_MIN_SCALE = float(torch.finfo(torch.float16).smallest_normal) * 2.0 ** -10


class DeviceEncoding:
    """A store's fitted parameters for the stored layers `positions` (T frames of `tokens` tokens), as float32
    tensors on `device`."""

    def __init__(self, encoding: Encoding, positions: Sequence[int], frames: int, tokens: int, device: torch.device):
        self.encoding, self.positions = encoding, list(positions)
        self.frames, self.num_tokens = frames, tokens

        def tensor(values, dtype=torch.float32) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).to(device)

        self.mean = tensor(encoding.mean[self.positions]) if encoding.projected else None  # type: ignore[index]
        self.bases = [tensor(encoding.layer_basis(p)) for p in self.positions] if encoding.projected else None
        self.scales = [tensor(encoding.layer_scales(p)) for p in self.positions] if encoding.quantized else None
        self.groups = [tensor(encoding.layer_groups(p), torch.long) for p in self.positions] \
            if encoding.quantized else None
        # Per layer, a 0/1 mask of each group's channels: a group's absmax without indexing (no host sync on CUDA).
        self.masks = [[(g == k).float() for k in range(GROUPS)] for g in self.groups] if self.groups else None
        self.dims = [encoding.dims[p] for p in self.positions]

    # ---------------------------------------------------------------- encode (extraction)
    def encode_layer(self, n: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(..., C) tokens of the n-th layer -> (codes (..., D) fp16 or int8, token scales (..., 2) fp16 or None)."""
        x = x.float()
        if self.bases is not None:
            x = (x - self.mean[n]) @ self.bases[n].t()  # type: ignore[index]
        if self.scales is None:
            return x.to(torch.float16), None
        y = x / self.scales[n]
        groups = self.groups[n]  # type: ignore[index]
        magnitude = y.abs()
        absmax = torch.stack([(magnitude * mask).amax(-1) for mask in self.masks[n]], -1)  # type: ignore[index]
        scale = (absmax / QMAX).to(torch.float16).clamp_min(_MIN_SCALE)
        q = torch.round(y / scale.float()[..., groups]).clamp_(-QMAX, QMAX).to(torch.int8)
        return q, scale

    # ---------------------------------------------------------------- decode (training)
    def tokens(self, codes: torch.Tensor, scales: torch.Tensor | None) -> CompactTokens:
        """A batch as read and copied: codes (B, L', T, N+1, C) int8 without projection, or flat codes
        (B, T*(N+1)*sum K) with it, and token scales (B, L', T, N+1, 2) for int8 -> CompactTokens (views, no copy)."""
        B, T, N1 = codes.shape[0], self.frames, self.num_tokens
        per_layer, at = [], 0
        for n, k in enumerate(self.dims):
            if self.bases is None:
                per_layer.append(codes[:, n])
            else:
                per_layer.append(codes[:, at:at + T * N1 * k].view(B, T, N1, k))
                at += T * N1 * k
        per_scales = None if scales is None else [scales[:, n] for n in range(len(self.dims))]
        return CompactTokens(per_layer, scales=per_scales, channel_scales=self.scales, groups=self.groups,
                             mean=self.mean, components=self.bases)
