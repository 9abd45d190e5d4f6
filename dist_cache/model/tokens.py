"""What DiST takes from a tower's tokens: one rule for every family (docs/MODEL.md, "Towers other than CLIP").

A store holds each layer's tokens as the tower has them: its prefix tokens (a class token, registers, a
distillation token, or none), then the patch grid in row-major order (`TokenLayout`, recorded in the store's
backbone record). The branch expects CLIP's layout: a summary token at position 0, then the patches. `branch_tokens`
forms that on the device, from whatever the store holds (or the tower computes live):
- position 0 is the tower's class token where it has one, else the mean of the layer's patch tokens (SigLIP);
- registers and distillation tokens are dropped (they have no place on the grid, and the class token is the
  summary the tower was trained to produce).
The mean is linear, so it commutes with everything the pipeline does to stored tokens before it: int8
dequantisation, feature mixup, and a linear code of the tokens (it is the same function of the decoded tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PREFIX_KINDS = ("class", "register", "distillation")


@dataclass(frozen=True)
class TokenLayout:
    """Which stored token is which: `prefix` tokens (kinds in order), then grid[0] x grid[1] patches, row-major."""

    prefix: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def num_prefix(self) -> int:
        return len(self.prefix)

    @property
    def has_class(self) -> bool:
        return "class" in self.prefix

    @property
    def num_tokens(self) -> int:
        """The tokens stored per frame: prefix plus patches."""
        return self.num_prefix + self.grid[0] * self.grid[1]

    @property
    def is_branch_layout(self) -> bool:
        """The tokens are already what the branch takes (CLIP: one class token, then the patches)."""
        return self.prefix == ("class",)

    @classmethod
    def of_record(cls, record: dict[str, Any]) -> TokenLayout:
        """The layout a backbone record describes. Records written before towers other than CLIP were supported
        (store format 2 without `prefix_tokens`) are open_clip ViTs: one class token, a square grid."""
        side = int(record["image_size"]) // int(record["patch_size"])
        prefix = tuple(record.get("prefix_tokens", ("class",)))
        grid = tuple(int(g) for g in record.get("grid", (side, side)))
        return cls(prefix, (grid[0], grid[1]))


def branch_tokens(features: Any, layout: TokenLayout) -> Any:
    """(..., prefix + N, C) stored tokens -> (..., 1 + N, C): the summary token, then the patches (module doc).

    CLIP's tokens are returned as they are (no copy). A batch that is not a tensor (a compact store's codes, which
    offer `map` over each layer's dequantised codes) gets the same rule through `map`: a class token is selected,
    and a mean of codes is the code of the mean, the decoding being affine."""
    if layout.is_branch_layout:
        return features
    if not isinstance(features, torch.Tensor):
        return features.map(lambda tokens: branch_tokens(tokens, layout))
    if features.shape[-2] != layout.num_tokens:
        raise ValueError(f"expected {layout.num_tokens} tokens per frame ({layout.num_prefix} prefix + "
                         f"{layout.grid[0]}x{layout.grid[1]} patches), got {features.shape[-2]}")
    patches = features[..., layout.num_prefix:, :]
    if layout.has_class:
        at = layout.prefix.index("class")
        summary = features[..., at:at + 1, :]
    else:
        # torch accumulates a half-precision mean in fp32 on both the CPU and CUDA; the result is cast back once.
        summary = patches.mean(dim=-2, keepdim=True)
    return torch.cat([summary, patches], dim=-2)
