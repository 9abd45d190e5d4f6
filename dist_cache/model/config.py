"""DiSTConfig: every hyper-parameter of the DiST branch, JSON-serialisable so it can sit in a checkpoint.

Names follow the paper (Qing et al., ICCV 2023, §3): C is the CLIP width, alpha_dim = αC is the integration
branch width (the reference's INTEGRATION_DIM), beta_dim = βC the temporal encoder width (TEMPORAL_DIM), and
gamma = γ the ratio of dense (temporal encoder) frames to sparse (CLIP) frames. Beware the reference's
SPARSE_SAMPLE_ALPHA, which is γ, not α (dist-reference.md, "Naming trap").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dist_cache.errors import UserError

T_BLOCKS = ("r2plus1d", "c3d", "joint")
PSI_MODES = ("dconv", "avg", "max")
PHI_MODES = ("nearest", "trilinear", "deconv")


class ConfigError(UserError, ValueError):
    """An invalid DiST setting. A UserError so the CLI prints it as one line, a ValueError for library callers."""


def _divisor_heads(dim: int, head_dim: int) -> int:
    """The head count nearest below dim // head_dim (at least 1) that divides dim, so any width works."""
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


@dataclass
class DiSTConfig:
    """Shape and switches of one DiST branch.

    The defaults are the reference implementation's SSv2 configuration for ViT-B/16 (dist-reference.md §2-4).
    `layers` are the 0-based CLIP block indices the branch integrates, in order (the reference uses all of them);
    only their count shapes the module, the indices themselves tell the spatial encoder what to record.
    `num_frames` is T, the SPARSE (CLIP) frame count; the temporal encoder sees gamma * T dense frames.
    Several parameters have a length-T axis (Ψ's cls tokens, the pooling positional embedding), so a
    trained branch is tied to its T, exactly as in the reference.
    """

    width: int
    patch_size: int
    image_size: int
    num_frames: int
    embed_dim: int
    layers: list[int]
    gamma: int = 2
    alpha_dim: int = 384
    beta_dim: int = 96
    t_block: str = "r2plus1d"
    psi: str = "dconv"
    phi: str = "nearest"
    temporal: bool = True
    integration: bool = True
    integ_to_temp: bool = True
    temp_to_integ: bool = True
    pool_blocks: int = 2
    pool_heads: int | None = None
    stem_t_kernel: int = 5
    logit_scale: float = 100.0

    def __post_init__(self) -> None:
        self.layers = [int(layer) for layer in self.layers]
        positive = ("width", "patch_size", "image_size", "num_frames", "embed_dim", "gamma", "alpha_dim", "beta_dim")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"DiST {name}={getattr(self, name)} must be a positive integer")
        if not self.layers:
            raise ConfigError("DiST layers is empty; give at least one CLIP block index")
        if self.image_size % self.patch_size:
            raise ConfigError(f"DiST image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for name, value, allowed in (("t_block", self.t_block, T_BLOCKS), ("psi", self.psi, PSI_MODES), ("phi", self.phi, PHI_MODES)):
            if value not in allowed:
                raise ConfigError(f"DiST {name}={value!r} is unknown; use one of {', '.join(allowed)}")
        if self.pool_blocks < 1:
            raise ConfigError(f"DiST pool_blocks={self.pool_blocks} must be at least 1")
        if self.pool_heads is not None and (self.pool_heads < 1 or self.alpha_dim % self.pool_heads):
            raise ConfigError(f"DiST pool_heads={self.pool_heads} must be positive and divide alpha_dim={self.alpha_dim}")
        if self.stem_t_kernel < 1 or self.stem_t_kernel % 2 == 0:
            # An odd kernel with padding k//2 keeps all gamma*T frames (the reference never downsamples time).
            raise ConfigError(f"DiST stem_t_kernel={self.stem_t_kernel} must be odd")
        if self.logit_scale <= 0:
            raise ConfigError(f"DiST logit_scale={self.logit_scale} must be positive")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        """N + 1: patches plus CLIP's cls token."""
        h, w = self.grid
        return h * w + 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dense_frames(self) -> int:
        return self.gamma * self.num_frames

    @property
    def pool_num_heads(self) -> int:
        """Reference: 6 heads of 64 for αC=384. Other widths keep 64-wide heads, falling back to a divisor."""
        return self.pool_heads if self.pool_heads is not None else _divisor_heads(self.alpha_dim, 64)

    @property
    def joint_num_heads(self) -> int:
        """Heads of the joint space-time T-Block (not in the reference code): 32-wide heads, e.g. 3 for βC=96."""
        return _divisor_heads(self.beta_dim, 32)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiSTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"DiST config has unknown keys {unknown}; it was written by a different version")
        return cls(**data)

    @classmethod
    def from_backbone(cls, record: dict[str, Any], num_frames: int, layers: list[int] | None = None, **overrides: Any) -> "DiSTConfig":
        """Shape a config after a backbone record (`Backbone.describe()`, or a store's `backbone`): width,
        patch, resolution, text space; every block unless `layers` says otherwise."""
        return cls(
            width=int(record["width"]),
            patch_size=int(record["patch_size"]),
            image_size=int(record["image_size"]),
            num_frames=num_frames,
            embed_dim=int(record["embed_dim"]),
            layers=list(range(int(record["num_layers"]))) if layers is None else list(layers),
            **overrides,
        )
