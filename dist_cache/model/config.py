"""DiSTConfig: the backbone's shapes a DiST branch is built for, plus its switches; JSON-serialisable so it can
sit in a checkpoint.

C (`width`) is the CLIP width; the switches (`DiSTSwitches`: gamma, alpha_dim, beta_dim, T-Block, Ψ/Φ modes,
ablations, pooling) are defined in dist_cache/model/switches.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from dist_cache.model.switches import SWITCH_NAMES, ConfigError, DiSTSwitches

# Bounds on the shapes a recorded config may claim: beyond every open_clip ViT (widths <= 1792, 48 blocks,
# 378 px), so a checkpoint from a stranger cannot ask for an absurd branch.
SHAPE_BOUNDS = {"width": 8192, "patch_size": 1024, "image_size": 4096, "num_frames": 1024, "embed_dim": 8192}
MAX_LAYERS = 256


def _divisor_heads(dim: int, head_dim: int) -> int:
    """The head count nearest below dim // head_dim (at least 1) that divides dim, so any width works."""
    heads = max(1, dim // head_dim)
    while dim % heads:
        heads -= 1
    return heads


@dataclass
class DiSTConfig:
    """Shape and switches of one DiST branch.

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
    switches: DiSTSwitches = field(default_factory=DiSTSwitches)

    def __post_init__(self) -> None:
        for name, high in SHAPE_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= high:
                raise ConfigError(f"DiST {name}={str(value)[:40]!r} must be an integer in [1, {high}]")
        if not isinstance(self.layers, (list, tuple)) or not 1 <= len(self.layers) <= MAX_LAYERS:
            raise ConfigError(f"DiST layers must be a list of 1 to {MAX_LAYERS} CLIP block indices")
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < MAX_LAYERS for x in self.layers):
            raise ConfigError(f"DiST layers {str(self.layers)[:60]} must be block indices in [0, {MAX_LAYERS})")
        self.layers = list(self.layers)
        if self.patch_size > self.image_size:
            raise ConfigError(f"DiST patch_size {self.patch_size} is larger than image_size {self.image_size}")
        if not isinstance(self.switches, DiSTSwitches):
            raise ConfigError("DiST switches must be a DiSTSwitches")

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        """The tower's patch grid, which the temporal stem reproduces: floor(image / patch) cells a side, as a
        stride-P convolution gives (ViT-SO400M/14 at 384 px: 27, its last 6 pixels seen by neither)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        """N + 1: patches plus the summary token (the tower's class token, or the patches' mean: model/tokens.py)."""
        h, w = self.grid
        return h * w + 1

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def dense_frames(self) -> int:
        return self.switches.gamma * self.num_frames

    @property
    def pool_num_heads(self) -> int:
        """Reference: 6 heads of 64 for αC=384. Other widths keep 64-wide heads, falling back to a divisor."""
        s = self.switches
        return s.pool_heads if s.pool_heads is not None else _divisor_heads(s.alpha_dim, 64)

    @property
    def joint_num_heads(self) -> int:
        """Heads of the joint space-time T-Block (not in the reference code): 32-wide heads, e.g. 3 for βC=96."""
        return _divisor_heads(self.switches.beta_dim, 32)

    # ---- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        shapes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "switches"}
        return {**shapes, "layers": list(self.layers), "switches": self.switches.to_dict()}

    @classmethod
    def from_dict(cls, data: Any) -> DiSTConfig:
        """Validate a recorded config (a checkpoint's, i.e. possibly a stranger's): one-line ConfigError on anything
        unknown, missing, mistyped or out of bounds. dist-cache 0.1 wrote the switches flat beside the shapes;
        those checkpoints still load."""
        if not isinstance(data, dict):
            raise ConfigError(f"DiST config must be a JSON object, not {type(data).__name__}")
        shape_names = [f.name for f in dataclasses.fields(cls) if f.name != "switches"]
        missing = [name for name in shape_names if name not in data]
        if missing:
            raise ConfigError(f"DiST config lacks {missing}; the checkpoint is damaged")
        shapes = {name: data[name] for name in shape_names}
        rest = {k: v for k, v in data.items() if k not in shapes}
        if "switches" in rest:
            unknown = sorted(set(rest) - {"switches"})
            if unknown:
                raise ConfigError(f"DiST config has unknown keys {unknown[:5]}; it was written by a different version")
            switches = DiSTSwitches.from_dict(rest["switches"])
        else:  # the flat dist-cache 0.1 layout
            unknown = sorted(set(rest) - set(SWITCH_NAMES))
            if unknown:
                raise ConfigError(f"DiST config has unknown keys {unknown[:5]}; it was written by a different version")
            switches = DiSTSwitches.from_dict(rest)
        return cls(**shapes, switches=switches)

    @classmethod
    def from_backbone(cls, record: dict[str, Any], num_frames: int, layers: list[int] | None = None,
                      switches: DiSTSwitches | None = None, **overrides: Any) -> DiSTConfig:
        """Shape a config after a backbone record (`Backbone.describe()`, or a store's `backbone`): width,
        patch, resolution, text space; every block unless `layers` says otherwise. `overrides` change single
        switches of `switches` (default: the reference's)."""
        return cls(
            width=int(record["width"]),
            patch_size=int(record["patch_size"]),
            image_size=int(record["image_size"]),
            num_frames=num_frames,
            embed_dim=int(record["embed_dim"]),
            layers=list(range(int(record["num_layers"]))) if layers is None else list(layers),
            switches=(switches or DiSTSwitches()).replace(**overrides),
        )
