"""Tiny towers of every family dist-cache supports, built from each family's own config with random weights.

Each keeps its family's structure (the timm class, prefix tokens, norm, activation, pooling, patch size, text side
and scoring) and shrinks only the widths, the depth and the image: the timm trunks are the real timm entrypoints
(`vit_base_patch16_siglip_224`, `eva02_base_patch16_clip_224`, ...) called with smaller sizes, registered under
`tiny_<name>` so that open_clip configs can name them as they name the real ones. Nothing is downloaded: the text
sides use open_clip's bundled tokenizer (a real SigLIP tag's comes from the hub), and the weights are random.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHRINK = {"depth": 2, "embed_dim": 32, "num_heads": 2}
# CLIP's BPE tokenizer, bundled with open_clip; a text tower of one block.
TEXT = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
SIGLIP_TEXT = {**TEXT, "no_causal_mask": True, "proj_bias": True, "pool_type": "last", "norm_kwargs": {"eps": 1e-6}}


@dataclass(frozen=True)
class Family:
    """A tower family, its tiny config and what dist-cache must find in it."""

    name: str
    config: dict[str, Any]  # an open_clip model config, or a timm tower config (`timm_model_name`)
    prefix: tuple[str, ...]
    grid: int
    patch: int
    image: int
    activation: str
    scoring: str | None  # "softmax", "sigmoid", or None (no text side)
    timm_base: str | None = None  # the real timm entrypoint the tiny trunk shrinks

    def config_file(self, directory: Path) -> Path:
        """The config as a JSON file (`--model PATH`); registers the tiny timm trunk first."""
        if self.timm_base:
            register_tiny(self.timm_base, img_size=self.image)
        # open_clip gives a model named "*siglip*" without a tokenizer config SigLIP's own, from the hub: the tiny
        # configs keep the bundled one under another name.
        path = directory / f"tiny-{self.name.replace('siglip', 'sigmoid')}.json"
        path.write_text(json.dumps(self.config))
        return path


def register_tiny(base: str, **sizes: Any) -> str:
    """Register `tiny_<base>`: timm's own `base` entrypoint with SHRINK and `sizes` (once per process)."""
    import timm
    from timm.models import register_model
    from timm.models._registry import model_entrypoint

    name = f"tiny_{base}"
    if name not in timm.list_models():
        entry = model_entrypoint(base)

        def build(pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
            return entry(pretrained=False, **{**SHRINK, **sizes, **kwargs})

        build.__name__ = name
        register_model(build)
    return name


def _timm_clip(base: str, image: int, pool: str, proj: str | None, text: dict, embed_dim: int, **extra: Any) -> dict:
    return {"embed_dim": embed_dim, "custom_text": True, **extra,
            "vision_cfg": {"image_size": image, "timm_model_name": f"tiny_{base}", "timm_model_pretrained": False,
                           "timm_pool": pool, "timm_proj": proj},
            "text_cfg": text}


FAMILIES = {
    # OpenAI's ViT-L/14 structure: open_clip's VisionTransformer, a class token, QuickGELU, patch 14.
    "clip-l14": Family("clip-l14", {"embed_dim": 24, "quick_gelu": True,
                                    "vision_cfg": {"image_size": 56, "layers": 2, "width": 32, "patch_size": 14,
                                                   "head_width": 16},
                                    "text_cfg": TEXT},
                       ("class",), 4, 14, 56, "quick_gelu", "softmax"),
    # SigLIP (and SigLIP 2, the same tower): a timm ViT without class token, MAP pooling, a sigmoid loss with a bias.
    "siglip": Family("siglip", _timm_clip("vit_base_patch16_siglip_224", 64, "map", "none", SIGLIP_TEXT, 32,
                                          init_logit_bias=-10),
                     (), 4, 16, 64, "gelu", "sigmoid", "vit_base_patch16_siglip_224"),
    # ViT-SO400M/14 at 384 px: patch 14 over an image its grid does not cover (27 x 14 = 378; here 4 x 14 = 56 of 60).
    "so400m-384": Family("so400m-384", _timm_clip("vit_so400m_patch14_siglip_384", 60, "map", "none", SIGLIP_TEXT,
                                                  32, init_logit_bias=-10),
                         (), 4, 14, 60, "gelu", "sigmoid", "vit_so400m_patch14_siglip_384"),
    # EVA02-CLIP: timm's Eva with a class token, RoPE, SwiGLU; the trunk's head projects to the text space.
    "eva02": Family("eva02", _timm_clip("eva02_base_patch16_clip_224", 64, "token", None, TEXT, 24),
                    ("class",), 4, 16, 64, "swiglu", "softmax", "eva02_base_patch16_clip_224"),
    # DINOv2 with registers, a timm ViT by name: a class token and 4 registers, no text side.
    "dinov2-reg4": Family("dinov2-reg4", {"timm_model_name": "vit_base_patch14_reg4_dinov2",
                                          "timm_model_kwargs": {**SHRINK, "img_size": 56}},
                          ("class",) + ("register",) * 4, 4, 14, 56, "gelu", None),
}


def blocks_of(visual: torch.nn.Module) -> torch.nn.ModuleList:
    """The tower's transformer blocks, for an independent forward (hooks on the tower's plain `forward`)."""
    trunk = getattr(visual, "trunk", visual)
    return trunk.blocks if hasattr(trunk, "blocks") else visual.transformer.resblocks


@torch.no_grad()
def block_outputs(visual: torch.nn.Module, images: torch.Tensor, layers: list[int]) -> torch.Tensor:
    """(L, N, P+N, C): what the tower's blocks output during its ordinary forward (not `forward_intermediates`)."""
    seen: dict[int, torch.Tensor] = {}
    blocks = blocks_of(visual)
    hooks = [blocks[i].register_forward_hook(lambda _m, _a, out, i=i: seen.__setitem__(i, out)) for i in layers]
    try:
        visual(images)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([seen[i] for i in layers])
