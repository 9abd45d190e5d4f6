"""The frozen CLIP spatial encoder: loading an open_clip model, fingerprinting its weights, and
running its visual tower to the per-layer token features DiST consumes.

A "layer" l is the output of block l of the visual transformer (0-based), taken after both residual
adds and before `ln_post`, shaped (N+1, C) per frame with the cls token first and the patches in
row-major order. This is what the reference implementation records (dist-reference.md §1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dist_cache.errors import UserError, first_line

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _open_clip():
    """Import open_clip lazily (it takes seconds) and register the bundled tiny configs once."""
    import open_clip

    if "dist-tiny" not in open_clip.list_models():
        open_clip.add_model_config(BUNDLED_CONFIGS)
    return open_clip


@dataclass
class Backbone:
    """A loaded, frozen open_clip model plus everything needed to reproduce its features."""

    model: nn.Module
    name: str
    model_config: dict
    pretrained: str
    pretrained_source: str
    weights_sha256: str
    image_size: int
    patch_size: int
    width: int
    embed_dim: int
    num_layers: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    tokenizer: object = field(repr=False)

    @property
    def num_tokens(self) -> int:
        """N + 1: the square grid of patches plus the cls token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    def describe(self) -> dict:
        """JSON-safe description recorded in every store, enough to rebuild this exact backbone."""
        return {
            "model": self.name,
            "model_config": self.model_config,
            "pretrained": self.pretrained,
            "pretrained_source": self.pretrained_source,
            "weights_sha256": self.weights_sha256,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "embed_dim": self.embed_dim,
            "num_layers": self.num_layers,
            "mean": list(self.mean),
            "std": list(self.std),
            "open_clip_version": _open_clip().__version__,
        }

    @torch.no_grad()
    def encode_text(self, class_names: list[str], templates: list[str]) -> np.ndarray:
        """L2-normalised class embeddings (K, E): each template's embedding, averaged, renormalised."""
        device = next(self.model.parameters()).device
        per_template = []
        for template in templates:
            tokens = self.tokenizer([template.format(name) for name in class_names]).to(device)
            emb = self.model.encode_text(tokens).float()
            per_template.append(emb / emb.norm(dim=-1, keepdim=True))
        mean = torch.stack(per_template).mean(0)
        return (mean / mean.norm(dim=-1, keepdim=True)).cpu().numpy().astype(np.float32)

    def spatial_encoder(self, layers: list[int]) -> "SpatialEncoder":
        return SpatialEncoder(self.model.visual, layers)


def resolve_layers(spec: str, num_layers: int) -> list[int]:
    """Parse `all`, `last:N` or a comma list of 0-based block indices into a sorted list."""
    spec = spec.strip()
    if spec == "all":
        return list(range(num_layers))
    if spec.startswith("last:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or not 1 <= int(count) <= num_layers:
            raise UserError(f"--layers {spec}: N must be 1..{num_layers} for this model")
        return list(range(num_layers - int(count), num_layers))
    try:
        layers = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        raise UserError(f"--layers {spec!r} is not 'all', 'last:N' or a comma list of block indices") from None
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise UserError(f"--layers {spec}: indices must lie in 0..{num_layers - 1} for this model")
    return layers


def weights_sha256(module: nn.Module) -> str:
    """sha256 of the weights actually loaded: names, dtypes, shapes and bytes in state_dict order.

    Hashing the tensors rather than the checkpoint file means a TorchScript, a state_dict and a
    safetensors copy of the same weights share one fingerprint, and random weights get one too.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _model_name(model: str, open_clip) -> str:
    """Accept an open_clip name, a bundled config name, or a path to a model-config JSON."""
    path = Path(model)
    if model.endswith(".json"):
        if not path.is_file():
            raise UserError(f"--model {model}: no such config file; pass an open_clip name or an existing JSON")
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise UserError(
            f"--model {model}: unknown open_clip model; use a name from open_clip.list_models() "
            "(e.g. ViT-B-16), dist-tiny, or a path to a model-config JSON"
        )
    return model


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith(_CHECKPOINT_SUFFIXES)


def load_backbone(
    model: str, pretrained: str, *, allow_random_weights: bool = False, device: str | torch.device = "cpu"
) -> Backbone:
    """Build the open_clip model, load its weights and freeze it.

    `pretrained` is an open_clip tag (e.g. `openai`), a local checkpoint path, or `none`. Random
    weights make features worthless to share, so `none` needs `allow_random_weights`.
    """
    open_clip = _open_clip()
    name = _model_name(model, open_clip)
    if pretrained.lower() == "none":
        if not allow_random_weights:
            raise UserError(
                "--pretrained none gives random features that are useless to share; "
                "pass a tag (e.g. openai) or a checkpoint path, or add --allow-random-weights"
            )
        source = None
    elif _is_path(pretrained):
        if not Path(pretrained).is_file():
            raise UserError(f"--pretrained {pretrained}: no such checkpoint file; check the path")
        source = str(Path(pretrained).resolve())
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(
                f"--pretrained {pretrained}: not a known tag for {name} (known: {', '.join(tags) or 'none'}); "
                "pass a tag, a checkpoint path, or none"
            )
        source = pretrained

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
        try:
            clip = open_clip.create_model(name, pretrained=source, device=device, require_pretrained=source is not None)
        except (RuntimeError, AssertionError, KeyError, ValueError) as err:
            # open_clip reports a checkpoint that does not fit the architecture in several ways.
            if source is not None and Path(source).is_file():
                first = first_line(err)
                raise UserError(f"--pretrained {pretrained}: weights do not fit {name} ({first}); check --model") from None
            raise
    clip.eval().requires_grad_(False)

    visual = clip.visual
    config = open_clip.get_model_config(name)
    preprocess = open_clip.get_model_preprocess_cfg(clip)
    return Backbone(
        model=clip,
        name=name,
        model_config=config,
        pretrained="none" if source is None else (Path(source).name if _is_path(pretrained) else source),
        pretrained_source="none" if source is None else source,
        weights_sha256=weights_sha256(clip),
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        width=int(visual.conv1.out_channels),
        embed_dim=int(config["embed_dim"]),
        num_layers=len(visual.transformer.resblocks),
        mean=tuple(float(m) for m in preprocess["mean"]),
        std=tuple(float(s) for s in preprocess["std"]),
        tokenizer=open_clip.get_tokenizer(name),
    )


class SpatialEncoder(nn.Module):
    """CLIP's frozen visual tower, returning the selected layers' tokens and its own image embedding."""

    def __init__(self, visual: nn.Module, layers: list[int]):
        super().__init__()
        self.visual = visual.eval().requires_grad_(False)
        self.layers = list(layers)

    def train(self, mode: bool = True) -> "SpatialEncoder":
        # The spatial encoder is frozen in eval mode whatever the surrounding module does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, S, S), normalised -> tokens (L, N, N+1, C) and embeddings (N, E)."""
        out = self.visual.forward_intermediates(
            images, indices=self.layers, output_fmt="NLC", output_extra_tokens=True
        )
        tokens = torch.stack(
            [torch.cat([cls, patches], dim=1) for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        )
        return tokens, out["image_features"]


def load_recorded_backbone(recorded: dict, pretrained: str | None = None, device: str | torch.device = "cpu") -> Backbone:
    """Rebuild the backbone a store records, and prove it is the same by its weights' hash.

    `pretrained` overrides the recorded source (a store made from a local checkpoint records only
    where it was; another machine passes its own copy).
    """
    open_clip = _open_clip()
    name = recorded["model"]
    if name not in open_clip.list_models():
        # A store made from a config JSON carries the config itself: register it under its name. The
        # name comes from a store, i.e. from a stranger: it must be a plain file name, never a path.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
            raise UserError(f"the store's backbone model name {str(name)[:60]!r} is not a valid model name; the store is damaged")
        with tempfile.TemporaryDirectory(prefix="dist-cache-config-") as config_dir:
            (Path(config_dir) / f"{name}.json").write_text(json.dumps(recorded["model_config"]))
            open_clip.add_model_config(config_dir)
    source = pretrained or recorded.get("pretrained_source") or recorded["pretrained"]
    if source == "none":
        raise UserError(
            "this store was extracted with random weights (--pretrained none), which cannot be rebuilt; "
            "pass --pretrained with the checkpoint that was used, if any"
        )
    if _is_path(source) and not Path(source).is_file():
        if pretrained:
            raise UserError(f"--pretrained {pretrained}: no such checkpoint file; check the path")
        raise UserError(
            f"the store's weights came from {source}, which is not on this machine; pass --pretrained PATH to your copy"
        )
    backbone = load_backbone(name, source, device=device)
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise UserError(
            f"--pretrained {source}: weights hash {backbone.weights_sha256[:12]} differs from the store's "
            f"{recorded['weights_sha256'][:12]}; pass the checkpoint the store was extracted with"
        )
    return backbone
