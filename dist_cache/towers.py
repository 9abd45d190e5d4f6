"""The image towers dist-cache runs, whichever library builds them, seen through one interface.

Every tower is a module with open_clip's `forward_intermediates(images, indices, output_fmt="NLC",
output_extra_tokens=True)` -> {"image_intermediates": patch tokens per layer, "image_intermediates_prefix": prefix
tokens per layer (absent when the tower has none), "image_features": its own image embedding}:
- open_clip's own `VisionTransformer` (OpenAI CLIP, LAION CLIP, CLIPA, CoCa, ...): one class token;
- open_clip's `TimmModel` around a timm ViT or EVA (SigLIP, SigLIP 2, ViT-SO400M, EVA02, PE-Core, MobileCLIP-B,
  ...): the trunk's prefix tokens, none for SigLIP;
- a timm ViT by name (`timm:vit_base_patch14_reg4_dinov2`), wrapped here by `TimmTower` (no text side).
`tower_facts` reads what a store records about one (prefix tokens, grid, patch size, image size, width, depth,
activation, norm) from the module itself, and refuses a tower that is not a plain patch-grid transformer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_cache.errors import UserError
from dist_cache.model.tokens import TokenLayout

TIMM_PREFIX = "timm:"
# timm.create_model keywords that load files or change what a recorded config builds: a stranger's store may name
# kwargs, never these.
_FORBIDDEN_TIMM_KWARGS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
                          "features_only", "num_classes", "scriptable", "exportable", "no_jit", "device", "dtype"}
_ACTIVATION_NAMES = {"QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh", "SiLU": "silu", "Swish": "silu",
                     "ReLU": "relu"}


class TimmTower(nn.Module):
    """A timm ViT (or EVA) trunk with open_clip's `forward_intermediates` convention; its embedding is timm's
    pooled pre-logits (`forward_head`, no classifier: the trunk is built with num_classes=0)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def forward_intermediates(self, images: torch.Tensor, indices: list[int] | None = None, *,
                              output_fmt: str = "NLC", output_extra_tokens: bool = False) -> dict[str, Any]:
        with_prefix = output_extra_tokens and self.trunk.num_prefix_tokens > 0
        final, layers = self.trunk.forward_intermediates(images, indices=indices, output_fmt=output_fmt,
                                                         return_prefix_tokens=with_prefix)
        out: dict[str, Any] = {}
        if with_prefix:
            out["image_intermediates_prefix"] = [prefix for _, prefix in layers]
            layers = [patches for patches, _ in layers]
        out["image_intermediates"] = layers
        out["image_features"] = self.trunk.forward_head(final)
        return out


class VisionOnly(nn.Module):
    """The model of a tower without a text side (a timm ViT by name): `.visual` and nothing else."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual


@dataclass(frozen=True)
class TowerFacts:
    """What a store records about a tower's geometry and function (docs/DESIGN.md, "backbone.py")."""

    kind: str  # "open_clip VisionTransformer", "timm VisionTransformer", "timm Eva", ...
    layout: TokenLayout
    patch_size: int  # pixels per grid cell (the temporal stem's stride)
    image_size: int
    width: int
    num_layers: int
    activation: str
    norm: str

    def record(self) -> dict[str, Any]:
        return {"tower": self.kind, "prefix_tokens": list(self.layout.prefix), "grid": list(self.layout.grid),
                "norm": self.norm}


def _trunk(visual: nn.Module) -> nn.Module:
    return getattr(visual, "trunk", visual)


def is_open_clip_vit(visual: nn.Module) -> bool:
    import open_clip

    return isinstance(visual, open_clip.transformer.VisionTransformer)


def tower_facts(visual: nn.Module, name: str) -> TowerFacts:
    """The facts of an open_clip ViT, or of a timm ViT/EVA trunk (open_clip's TimmModel, or `TimmTower`); a one-line
    UserError for anything else (ResNets, ConvNeXts, Swin, FastViT: no patch grid of transformer tokens)."""
    if is_open_clip_vit(visual):
        blocks = visual.transformer.resblocks
        grid = tuple(int(g) for g in visual.grid_size)
        size, patch = int(visual.image_size[0]), int(visual.patch_size[0])
        return TowerFacts("open_clip VisionTransformer", TokenLayout(("class",), (grid[0], grid[1])), patch, size,
                          int(visual.conv1.out_channels), len(blocks), _activation(blocks[0].mlp),
                          _norm(blocks[0].ln_1))
    trunk = _trunk(visual)
    embed = getattr(trunk, "patch_embed", None)
    if not (hasattr(trunk, "forward_intermediates") and hasattr(trunk, "num_prefix_tokens") and
            hasattr(trunk, "blocks") and getattr(embed, "grid_size", None)):
        raise UserError(f"--model {name}: dist-cache needs a ViT visual tower (a transformer over a patch grid: "
                        f"open_clip's VisionTransformer, a timm ViT or EVA), not {type(trunk).__name__}; "
                        "pick a ViT model")
    grid = tuple(int(g) for g in embed.grid_size)
    size = tuple(int(s) for s in embed.img_size)
    if grid[0] != grid[1] or size[0] != size[1]:
        raise UserError(f"--model {name}: a {size[0]}x{size[1]} px tower with a {grid[0]}x{grid[1]} grid; "
                        "dist-cache renders square frames: pick a square tower")
    # The grid cell in pixels: the patch size, or a hybrid stem's stride (MobileCLIP-B, ViTamin: their patch_size is
    # counted in the stem's feature map). A grid that does not cover the image (ViT-SO400M/14 at 384 px: 27 x 14 =
    # 378) leaves the last pixels out, as a stride-P convolution does.
    patch = int(getattr(embed, "patch_size", (0,))[0])
    if patch < 1 or size[0] // patch != grid[0]:
        patch = size[0] // grid[0]
    prefix = (("class",) if getattr(trunk, "cls_token", None) is not None else ()) + \
             (("distillation",) if getattr(trunk, "dist_token", None) is not None else ())
    registers = int(trunk.num_prefix_tokens) - len(prefix)
    if registers < 0:
        raise UserError(f"--model {name}: the tower's prefix tokens do not add up; dist-cache cannot tell them apart")
    prefix += ("register",) * registers
    block = trunk.blocks[0]
    return TowerFacts(f"timm {type(trunk).__name__}", TokenLayout(prefix, (grid[0], grid[1])), patch, size[0],
                      int(trunk.embed_dim), len(trunk.blocks), _activation(block.mlp),
                      _norm(getattr(block, "norm1", None)))


def _activation(mlp: nn.Module) -> str:
    """The activation of a block's MLP, as the store records it: quick_gelu, gelu, gelu_tanh, silu, swiglu, ..."""
    act = next((m for m in mlp.modules() if m is not mlp and not list(m.children()) and not
                isinstance(m, (nn.Linear, nn.Dropout, nn.Identity, nn.LayerNorm))), None)
    if act is None:
        return "unknown"
    name = type(act).__name__
    kind = ("gelu_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu") if name == "GELU" else \
        _ACTIVATION_NAMES.get(name, re.sub(r"[^a-z0-9_]", "", name.lower())[:24] or "unknown")
    if "glu" in type(mlp).__name__.lower():  # a gated MLP (EVA02's SwiGLU): the gate's activation names it
        return "swiglu" if kind == "silu" else f"{kind}_glu"
    return kind


def _norm(norm: nn.Module | None) -> str:
    return "unknown" if norm is None else re.sub(r"[^a-z0-9_]", "", type(norm).__name__.lower())


def patch_embedding(visual: nn.Module) -> nn.Module:
    """The module that turns one image into grid tokens (FLOP counting of the reference's dense-frame embeddings)."""
    return visual.conv1 if is_open_clip_vit(visual) else _trunk(visual).patch_embed


# ---- timm ViTs by name ------------------------------------------------------------------------------------

def timm_config(name: str) -> dict[str, Any]:
    """The model config of `timm:NAME`: the name and no keyword arguments."""
    return {"timm_model_name": name[len(TIMM_PREFIX):], "timm_model_kwargs": {}}


def is_timm_config(config: Any) -> bool:
    return isinstance(config, dict) and "timm_model_name" in config and "vision_cfg" not in config


def check_timm_config(config: dict[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """A timm tower config's model name and keyword arguments, checked (it may be a stranger's): a registered timm
    model, plain JSON values, no keyword that loads a file."""
    import timm

    unknown = sorted(set(config) - {"timm_model_name", "timm_model_kwargs"})
    name, kwargs = config.get("timm_model_name"), config.get("timm_model_kwargs", {})
    if unknown or not isinstance(name, str) or not isinstance(kwargs, dict):
        raise UserError(f"{what}: a timm tower config is {{\"timm_model_name\": NAME, \"timm_model_kwargs\": {{...}}}}"
                        + (f"; unknown keys {unknown[:3]}" if unknown else ""))
    if name not in timm.list_models():
        raise UserError(f"{what}: {name[:60]!r} is not a timm model; use a name from timm.list_models('vit_*')")
    bad = sorted(k for k, v in kwargs.items() if k in _FORBIDDEN_TIMM_KWARGS or not _plain(v))
    if bad:
        raise UserError(f"{what}: timm_model_kwargs {bad[0]!r} is not allowed (only plain values that shape the "
                        "network; weights come from --pretrained)")
    return name, kwargs


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= 16 and all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def build_timm_tower(name: str, kwargs: dict[str, Any], tag: str | None) -> VisionOnly:
    """A timm ViT without classifier, with the named pretrained config (`tag`: its normalisation), weights left
    as built; `torch.device("meta")` around the call builds shapes only."""
    import timm

    trunk = timm.create_model(f"{name}.{tag}" if tag else name, pretrained=False, num_classes=0, **kwargs)
    return VisionOnly(TimmTower(trunk))


def timm_tags(name: str) -> list[str]:
    import timm

    return [full.split(".", 1)[1] for full in timm.list_pretrained(f"{name}.*")]


def timm_state_dict(model: VisionOnly, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm checkpoint (the trunk's keys, as timm's hub stores them) in the holder's names, through the model
    module's own `checkpoint_filter_fn` (it converts original checkpoints and resamples position embeddings to
    the built image size, e.g. DINOv2's 518 px weights at 224 px); the classifier is not built, so it is dropped."""
    import sys

    trunk = model.visual.trunk
    if all(k.startswith("visual.trunk.") for k in state):
        state = {k[len("visual.trunk."):]: v for k, v in state.items()}
    convert = getattr(sys.modules[type(trunk).__module__], "checkpoint_filter_fn", None)
    if convert is not None:
        state = convert(state, trunk)
    return {f"visual.trunk.{k}": v for k, v in state.items() if not k.startswith("head.")}


def init_unsaved_buffers(model: nn.Module, name: str) -> None:
    """Buffers a checkpoint does not hold stay on the meta device after a meta build: rebuild them on the CPU.

    timm's modules recompute theirs (RoPE frequencies, EVA's zero k-bias, relative position indices) in
    `init_non_persistent_buffers`; open_clip's text towers have one, the causal mask (-inf above the diagonal)."""
    for module in model.modules():
        metas = [b for b in module._non_persistent_buffers_set if getattr(module, b) is not None and
                 getattr(module, b).is_meta]
        if not metas:
            continue
        for buffer in metas:
            tensor = getattr(module, buffer)
            setattr(module, buffer, torch.zeros(tuple(tensor.shape), dtype=tensor.dtype))
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()
            continue
        for buffer in metas:
            tensor = getattr(module, buffer)
            if buffer != "attn_mask" or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
                raise RuntimeError(f"{name}: cannot rebuild the non-persistent buffer {buffer} of "
                                   f"{type(module).__name__}")
            setattr(module, buffer, torch.full(tuple(tensor.shape), float("-inf")).triu_(1))
