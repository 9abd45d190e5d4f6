"""Turning decoded frames into CLIP input for one `ViewPlan`, in two steps that run in different places.

`render_frames` (crop, resize, flip, grayscale) runs on the CPU, in decode workers, and yields uint8 pixels:
a quarter of the bytes of float32 to send between processes and to the device, and integer arithmetic
throughout, so the bytes do not depend on batching, thread count or CPU kernel. `normalize_frames` runs on
the device right before the model. Extraction and stage-two training both call both, so CLIP's input is
normalize(render(decoded)), and the dense frames of training, decoded and rendered alike, contain exactly
the bytes CLIP saw (dense[::gamma]).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import ViewPlan

# Recorded in every store, so a reader can tell how the cached features' pixels were made.
PREPROCESS = {
    "order": "crop, resize, flip, grayscale (uint8, per frame, on the CPU), then normalise (on the device)",
    "crop": ("ViewPlan.crop box (x, y, w, h) in decoded-frame pixels; test views use the centre square of side "
             "min(W, H)"),
    "resize": "bilinear",
    "antialias": True,
    "resize_dtype": "uint8 (torch's fixed-point antialiased kernel, as PIL's)",
    "grayscale": "ITU-R 601-2 luma in 16-bit fixed point, rounded: (19595 R + 38470 G + 7471 B + 32768) >> 16",
    "value_range": "uint8, then x / 255, then (x - mean) / std",
}

# ITU-R 601-2 luma weights (0.299, 0.587, 0.114) scaled by 2**16; they sum to 2**16 so white stays 255. PIL's
# convert("L") uses the same integers, which makes the result exact and the same on every machine.
_LUMA_Q16 = (19595, 38470, 7471)


def _grayscale(img: torch.Tensor) -> torch.Tensor:
    """uint8 (H, W, 3) -> uint8 (H, W, 3), the rounded luma on all three channels."""
    weights = torch.tensor(_LUMA_Q16, dtype=torch.int32)
    luma = ((img.to(torch.int32) * weights).sum(-1) + (1 << 15)) >> 16
    return luma.to(torch.uint8).unsqueeze(-1).expand(-1, -1, 3)


def render_frames(frames: np.ndarray | torch.Tensor, plan: ViewPlan, image_size: int) -> torch.Tensor:
    """uint8 frames (n, H, W, 3) -> uint8 (n, R, R, 3), R = image_size, on the CPU.

    Each frame on its own: crop the plan's box, resize it to R x R with antialiased bilinear interpolation
    computed in uint8 (torch's fixed-point kernel, ~3x faster than the float path and bit-identical across
    thread counts and CPU kernels), flip, grayscale.
    """
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (n, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
    x, y, w, h = plan.crop
    if not (0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= frames.shape[2] and y + h <= frames.shape[1]):
        raise ValueError(f"crop {plan.crop} is outside the {frames.shape[2]}x{frames.shape[1]} frames")
    frames = frames.cpu()
    out = torch.empty((frames.shape[0], image_size, image_size, 3), dtype=torch.uint8)
    for i, frame in enumerate(frames):
        # (1, 3, h, w) viewed from (h, w, 3): channels-last strides, the layout the uint8 kernel works in.
        img = frame[y : y + h, x : x + w].permute(2, 0, 1).unsqueeze(0)
        img = F.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
        img = img[0].permute(1, 2, 0)
        if plan.flip:
            img = img.flip(1)
        if plan.grayscale:
            img = _grayscale(img)
        out[i] = img
    return out


def normalize_frames(
    frames: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """uint8 (..., R, R, 3) -> `dtype` (..., 3, R, R): x / 255, then (x - mean) / std per channel, computed in
    float32 on the frames' device (the device the model runs on: the host never holds float pixels)."""
    if frames.dtype != torch.uint8 or frames.ndim < 3 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (..., R, R, 3), got {tuple(frames.shape)} {frames.dtype}")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    x = frames.movedim(-1, -3).to(torch.float32)
    return ((x / 255.0 - mean_t) / std_t).to(dtype).contiguous()
