"""Mixup and cutmix of a training batch: pixels, cached tokens and labels mixed with one lambda.

As timm's `Mixup` (the reference's): each batch is paired with itself reversed (sample i with B-1-i); when both
mixup and cutmix are on, each batch is one or the other with probability 0.5; lambda ~ Beta(alpha, alpha); a
cutmix box has sides sqrt(1 - lambda) times the image's around a uniform centre, clipped at the border, and
lambda is then corrected to 1 - the box's area fraction; label smoothing is folded into the mixed targets
(docs/DESIGN.md, "Augmentation and mixing").

Every draw is a function of (seed, step) on the host: no device randomness, so a run is deterministic for its
seed and a resumed run (which restores the step) mixes exactly as an uninterrupted one.

Cached features (`--feature-mixup`, `--feature-cutmix`): tokens are mixed per layer like pixels. A cutmix box is
drawn on the ViT's patch grid (`patch` pixels a cell), so the pixel box covers whole patches and the patch tokens
of those cells are taken from the partner; the class token, a summary of the whole image, is mixed linearly with
the corrected lambda. Neither is what CLIP would compute on mixed pixels: attention mixes information across the
box's edge, and a mixed image's tokens are not the mix of two images' tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Distinguishes the mixing draws from every other stream seeded with (seed, ...).
_STREAM = 0x6D6978


@dataclass(frozen=True)
class Mix:
    """One batch's mixing: `lam` of each sample with (1 - lam) of its partner (the batch reversed).

    `box` (y0, y1, x0, x1) in pixels for cutmix (None: mixup); `cells` the same box in patch cells when it was
    drawn on a patch grid of side `grid` (cached tokens are then mixed too)."""

    lam: float
    box: tuple[int, int, int, int] | None = None
    cells: tuple[int, int, int, int] | None = None
    grid: int | None = None

    def pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Mixed frames (B, ..., H, W), float (normalised): the same box on every frame of a clip."""
        partner = x.flip(0)
        if self.box is None:
            return x * self.lam + partner * (1.0 - self.lam)
        y0, y1, x0, x1 = self.box
        out = x.clone()
        out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        return out

    def tokens(self, features: torch.Tensor) -> torch.Tensor:
        """Mixed cached tokens (L, B, T, 1 + grid*grid, C): linearly for mixup; for cutmix the patch tokens of the
        box's cells come from the partner and the class token is mixed linearly with `lam`."""
        partner = features.flip(1)
        if self.box is None:
            return features * self.lam + partner * (1.0 - self.lam)
        if self.cells is None or self.grid is None:
            raise ValueError("a cutmix box drawn in pixels has no token region: draw it on the patch grid")
        g = self.grid
        if features.shape[-2] != 1 + g * g:
            raise ValueError(f"expected 1 + {g}x{g} tokens, got {features.shape[-2]}")
        out = features.clone()
        out[..., 0, :] = features[..., 0, :] * self.lam + partner[..., 0, :] * (1.0 - self.lam)
        r0, r1, c0, c1 = self.cells
        patches = out[..., 1:, :].unflatten(-2, (g, g))  # a view: writes land in `out`
        patches[..., r0:r1, c0:c1, :] = partner[..., 1:, :].unflatten(-2, (g, g))[..., r0:r1, c0:c1, :]
        return out

    def targets(self, labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
        """float32 (B, num_classes): smoothed one-hots, lam of each sample's and (1 - lam) of its partner's (each
        row sums to 1)."""
        off = smoothing / num_classes
        one_hot = torch.full((len(labels), num_classes), off, dtype=torch.float32, device=labels.device)
        one_hot.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)
        return one_hot * self.lam + one_hot.flip(0) * (1.0 - self.lam)


@dataclass(frozen=True)
class Mixer:
    """Draws each step's `Mix`. `patch` None: cutmix boxes in pixels of an `image_size` square (pixel mixing
    before CLIP); `patch` p: boxes on the (image_size / p)^2 patch grid (cached tokens mixed with the pixels)."""

    mixup_alpha: float
    cutmix_alpha: float
    image_size: int
    seed: int
    patch: int | None = None

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup and cutmix alphas must not be negative")
        # A grid may leave the last pixels uncovered (ViT-SO400M/14 at 384 px: 27 cells of 14 px): no token and no
        # temporal-stem cell sees them, so the boxes lie on the covered grid.
        if self.patch is not None and not 1 <= self.patch <= self.image_size:
            raise ValueError(f"patch size {self.patch} must lie in [1, image size {self.image_size}]")

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, step: int) -> Mix | None:
        """Step `step`'s mixing (None when both alphas are 0)."""
        if not self.enabled:
            return None
        rng = np.random.default_rng([self.seed, step, _STREAM])
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.uniform() < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix_alpha if cutmix else self.mixup_alpha])))
        if not cutmix:
            return Mix(lam)
        cell = self.patch or 1
        grid = self.image_size // cell
        r0, r1, c0, c1 = _box(rng, grid, lam)
        area = (r1 - r0) * (c1 - c0) / (grid * grid)
        box = (r0 * cell, r1 * cell, c0 * cell, c1 * cell)
        return Mix(1.0 - area, box, (r0, r1, c0, c1) if self.patch else None, grid if self.patch else None)


def _box(rng: np.random.Generator, side: int, lam: float) -> tuple[int, int, int, int]:
    """timm's rand_bbox on a `side` x `side` grid: sides int(side * sqrt(1 - lam)) around a uniform centre,
    clipped at the border, as (y0, y1, x0, x1)."""
    cut = int(side * math.sqrt(1.0 - lam))
    cy, cx = int(rng.integers(side)), int(rng.integers(side))
    y0, y1 = np.clip([cy - cut // 2, cy + cut // 2], 0, side)
    x0, x1 = np.clip([cx - cut // 2, cx + cut // 2], 0, side)
    return int(y0), int(y1), int(x0), int(x1)
