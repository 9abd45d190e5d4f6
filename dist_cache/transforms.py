"""Turning decoded frames into CLIP input for one `ViewPlan`.

Feature extraction and stage-two training both call `render_frames`, so the sparse frames the temporal branch
sees in training are bit-identical to those CLIP saw when the features were cached (on the same device).
Every frame is processed on its own, so the result does not depend on how frames are batched.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .sampling import ViewPlan

# Recorded in every store, so a reader can tell how the cached features' pixels were made.
PREPROCESS = {
    "order": "crop, resize, flip, grayscale, normalise",
    "crop": "ViewPlan.crop box (x, y, w, h) in decoded-frame pixels; test views use the centre square of side min(W, H)",
    "resize": "bilinear",
    "antialias": True,
    "grayscale": "ITU-R 601-2 luma",
    "value_range": "0-1 then (x-mean)/std",
}

# ITU-R 601-2 luma weights, as in torchvision and PIL.
_LUMA = (0.299, 0.587, 0.114)


def render_frames(
    frames: np.ndarray | torch.Tensor,
    plan: ViewPlan,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> torch.Tensor:
    """uint8 frames (n, H, W, 3) -> float32 (n, 3, S, S) normalised CLIP input, on the frames' device."""
    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (n, H, W, 3), got {tuple(frames.shape)} {frames.dtype}")
    x, y, w, h = plan.crop
    if not (0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= frames.shape[2] and y + h <= frames.shape[1]):
        raise ValueError(f"crop {plan.crop} is outside the {frames.shape[2]}x{frames.shape[1]} frames")
    mean_t = torch.tensor(mean, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    luma = torch.tensor(_LUMA, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    out = torch.empty((frames.shape[0], 3, image_size, image_size), dtype=torch.float32, device=frames.device)
    for i, frame in enumerate(frames):
        # One frame at a time: no kernel can then pick a batch-size-dependent path.
        img = frame[y : y + h, x : x + w].permute(2, 0, 1).float().unsqueeze(0)
        img = F.interpolate(img, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)[0]
        if plan.flip:
            img = img.flip(-1)
        if plan.grayscale:
            img = (img * luma).sum(0, keepdim=True).expand(3, -1, -1)
        out[i] = (img / 255.0 - mean_t) / std_t
    return out
