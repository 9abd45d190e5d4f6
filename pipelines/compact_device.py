"""A compact store's encoding on the device: encode CLIP's tokens where extraction computes them, and decode what a
training batch read (int8 dequantised, PCA codes handed to the model as `ProjectedTokens`, never reconstructed).

The same arithmetic as storage/encoding.py and storage/quantize.py (numpy, the reference that `FeatureStore` and the
README's recipe follow), in torch, so the bytes that cross to and from the host are the stored ones: codes and int8.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dist_cache.model.compact import ProjectedTokens
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
        absmax = torch.stack([magnitude[..., groups == g].amax(-1) if bool((groups == g).any())
                              else magnitude.new_zeros(magnitude.shape[:-1]) for g in range(GROUPS)], -1)
        scale = (absmax / QMAX).to(torch.float16).clamp_min(_MIN_SCALE)
        q = torch.round(y / scale.float()[..., groups]).clamp_(-QMAX, QMAX).to(torch.int8)
        return q, scale

    # ---------------------------------------------------------------- decode (training)
    def dequantize(self, n: int, codes: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """The n-th layer's stored codes (..., D) (and token scales (..., 2)) -> float16 values (..., D):
        codes * scales[..., groups] * r, in float32 and rounded once, as storage.quantize.dequantize_scaled."""
        if scales is None:
            return codes.to(torch.float16)
        groups, r = self.groups[n], self.scales[n]  # type: ignore[index]
        return (codes.float() * scales.float()[..., groups] * r).to(torch.float16)

    def tokens(self, codes: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor | ProjectedTokens:
        """A batch as read: without projection, int8 (B, L', T, N+1, C) -> float16 tokens (L', B, T, N+1, C);
        with projection, flat codes (B, T*(N+1)*sum K) -> ProjectedTokens of float16 codes (B, T, N+1, K_l)."""
        if self.bases is None:
            out = torch.empty(codes.shape, dtype=torch.float16, device=codes.device)
            for n in range(codes.shape[1]):  # layer by layer: no float32 copy of the whole batch
                out[:, n] = self.dequantize(n, codes[:, n], None if scales is None else scales[:, n])
            return out.transpose(0, 1)
        B, T, N1 = codes.shape[0], self.frames, self.num_tokens
        per_layer, at = [], 0
        for n, k in enumerate(self.dims):
            layer = codes[:, at:at + T * N1 * k].view(B, T, N1, k)
            at += T * N1 * k
            per_layer.append(self.dequantize(n, layer, None if scales is None else scales[:, n]))
        return ProjectedTokens(per_layer, self.mean, self.bases)  # type: ignore[arg-type]
