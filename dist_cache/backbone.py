"""The frozen CLIP spatial encoder: loading an open_clip model, fingerprinting its weights, and
running its visual tower to the per-layer token features DiST consumes.

A "layer" l is the output of block l of the visual transformer (0-based), taken after both residual
adds and before `ln_post`, shaped (N+1, C) per frame with the cls token first and the patches in
row-major order. This is what the reference implementation records (docs/MODEL.md, "Structure").

Loading builds the network on the meta device (no memory, no random initialisation), checks its size,
then assigns the checkpoint's tensors to it, so start-up costs one read of the weights and one hash.
The activation follows what the weights were trained with: OpenAI's CLIPs (and a few others) used
QuickGELU, which open_clip's plain configs (e.g. ViT-B-16) replace by GELU; the tag's pretrained config or a
TorchScript checkpoint's own modules say which, and the store records it ("activation").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_cache.backbone_config import MAX_BACKBONE_PARAMS, check_model_config
from dist_cache.errors import UserError, first_line
from dist_cache.logs import without_log_message
from dist_cache.weights import Weights, read_weights, tag_weights_file

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
ACTIVATIONS = ("quick_gelu", "gelu")
PRECISIONS = ("fp32", "fp16", "bf16")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# What open_clip logs when create_model gets no weights; expected while building on the meta device, where the
# weights are assigned right after.
_NO_WEIGHTS_LOGGED = "No pretrained weights loaded for model"


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
    activation: str
    precision: str
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
            "activation": self.activation,
            "open_clip_version": _open_clip().__version__,
        }

    @torch.no_grad()
    def encode_text(self, class_names: list[str], templates: list[str]) -> np.ndarray:
        """L2-normalised class embeddings (K, E): each template's embedding, averaged, renormalised.
        The text tower always runs in fp32: K class names cost nothing, and the embeddings are the targets."""
        device = next(self.model.parameters()).device
        per_template = []
        for template in templates:
            tokens = self.tokenizer([template.format(name) for name in class_names]).to(device)
            emb = self.model.encode_text(tokens).float()
            per_template.append(emb / emb.norm(dim=-1, keepdim=True))
        mean = torch.stack(per_template).mean(0)
        return (mean / mean.norm(dim=-1, keepdim=True)).cpu().numpy().astype(np.float32)

    def spatial_encoder(self, layers: list[int]) -> SpatialEncoder:
        return SpatialEncoder(self.model.visual, layers, self.precision)


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
    The bytes are handed to hashlib as views (no copy); hashlib releases the GIL while it hashes them.
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(memoryview(t.view(torch.uint8).numpy()))
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


def check_precision(precision: str, device: str | torch.device) -> None:
    """fp32 everywhere; fp16 and bf16 under CUDA autocast; on the CPU bf16 only (CPU autocast's dtype)."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    kind = torch.device(device).type
    if kind == "cpu" and precision == "fp16":
        raise UserError("--precision fp16 needs a CUDA device; on the CPU use --precision bf16 or fp32")
    if kind == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16; use --precision fp16 or fp32")


def _build_on_meta(open_clip, name: str, quick_gelu: bool, preprocess: dict[str, Any]) -> nn.Module:
    """The network's modules with shapes only: no memory, no random initialisation, nothing logged about the
    missing weights (they are assigned next). Refuses a network too large to be any real CLIP: from its config
    alone, before open_clip lays out a module (a stranger's config could ask for 100000 blocks), then by the
    parameters built."""
    try:
        check_model_config(open_clip.get_model_config(name))
    except UserError as err:
        raise UserError(f"--model {name}: {err}; check the model config") from None
    try:
        with without_log_message(_NO_WEIGHTS_LOGGED), torch.device("meta"):
            clip = open_clip.create_model(name, pretrained=None, device="meta", force_quick_gelu=quick_gelu,
                                          force_preprocess_cfg=preprocess)
    except Exception as err:  # open_clip fails in many ways on a config it cannot build
        raise UserError(f"--model {name}: open_clip cannot build this config ({first_line(err, 120)})") from None
    count = sum(p.numel() for p in clip.parameters())
    if count > MAX_BACKBONE_PARAMS:
        raise UserError(
            f"--model {name}: {count / 1e9:.1f} B parameters, more than any open_clip CLIP "
            f"({MAX_BACKBONE_PARAMS / 1e9:.0f} B at most); check the model config"
        )
    if not isinstance(clip.visual, open_clip.transformer.VisionTransformer):
        raise UserError(f"--model {name}: dist-cache needs a ViT visual tower (open_clip VisionTransformer), "
                        f"not {type(clip.visual).__name__}; pick a ViT model")
    return clip


def _assign_weights(clip: nn.Module, weights: Weights, name: str, pretrained: str) -> None:
    """Load a checkpoint's tensors into the meta-built network by assignment, as fp32 CPU tensors.

    A TorchScript module also carries tensors that are no weights (OpenAI's: attention masks, sizes): only
    the names the network has are taken from it. Every weight must be present with its exact shape.
    """
    expected = clip.state_dict()
    state = weights.state_dict
    if weights.torchscript:
        state = {k: v for k, v in state.items() if k in expected}
    # Some checkpoints store logit_scale as a 0-d tensor, others as a 1-element vector.
    if "logit_scale" in state and "logit_scale" in expected:
        state["logit_scale"] = state["logit_scale"].reshape(expected["logit_scale"].shape)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        what = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected else
                f"{wrong[0]} is {tuple(state[wrong[0]].shape)}, not {tuple(expected[wrong[0]].shape)}")
        count = len(missing) + len(unexpected) + len(wrong)
        raise UserError(f"--pretrained {pretrained}: weights do not fit {name} ({what}; {count} such "
                        "keys); check --model")
    # The checkpoint's own tensors become the parameters (no copy), cast to fp32 where stored otherwise (OpenAI: fp16).
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    clip.load_state_dict(tensors, strict=True, assign=True)
    # Non-persistent buffers are not in a checkpoint and stay on the meta device. In open_clip's ViT CLIPs those
    # are the text towers' causal attention masks (-inf above the diagonal), rebuilt here.
    for module in clip.modules():
        for buffer in list(module._non_persistent_buffers_set):
            tensor = getattr(module, buffer)
            if not tensor.is_meta:
                continue
            if buffer != "attn_mask" or tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
                raise RuntimeError(f"open_clip {name}: cannot rebuild the non-persistent buffer {buffer} of "
                                   f"{type(module).__name__}")
            setattr(module, buffer, torch.full(tuple(tensor.shape), float("-inf")).triu_(1))


def load_backbone(
    model: str,
    pretrained: str,
    *,
    allow_random_weights: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    activation: str | None = None,
) -> Backbone:
    """Build the open_clip model, load its weights and freeze it.

    `pretrained` is an open_clip tag (e.g. `openai`), a local checkpoint path, or `none`. Random
    weights make features worthless to share, so `none` needs `allow_random_weights`.
    `precision` is how the spatial encoder runs (fp32, or fp16/bf16 under autocast; the weights stay fp32).
    `activation` forces "quick_gelu" or "gelu" (rebuilding a recorded backbone); by default it is QuickGELU
    whenever the model config, the tag's pretrained config or a TorchScript checkpoint says so.
    """
    open_clip = _open_clip()
    name = _model_name(model, open_clip)
    check_precision(precision, device)
    if activation not in (None, *ACTIVATIONS):
        raise UserError(f"activation {activation!r} is unknown; the store is damaged")
    config = open_clip.get_model_config(name)
    tag_cfg: dict[str, Any] = {}
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
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)

    said_quick = bool(config.get("quick_gelu")) or bool(tag_cfg.get("quick_gelu"))
    quick = said_quick if activation is None else activation == "quick_gelu"
    preprocess = open_clip.transform.merge_preprocess_dict({}, tag_cfg)
    clip = _build_on_meta(open_clip, name, quick, preprocess)
    if source is None:
        # Random weights need open_clip's own initialisation: build for real (the meta build bounded its size).
        clip = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    else:
        weights = read_weights(source if _is_path(pretrained) else tag_weights_file(tag_cfg))
        if activation is None and weights.activation == "quick_gelu" and not quick:
            quick = True
            clip = _build_on_meta(open_clip, name, quick, preprocess)
        _assign_weights(clip, weights, name, pretrained)
    clip.eval().requires_grad_(False)
    digest = weights_sha256(clip)
    clip.to(device)

    visual = clip.visual
    processing = open_clip.get_model_preprocess_cfg(clip)
    return Backbone(
        model=clip,
        name=name,
        model_config=config,
        pretrained="none" if source is None else (Path(source).name if _is_path(pretrained) else source),
        pretrained_source="none" if source is None else source,
        weights_sha256=digest,
        image_size=int(visual.image_size[0]),
        patch_size=int(visual.patch_size[0]),
        width=int(visual.conv1.out_channels),
        embed_dim=int(config["embed_dim"]),
        num_layers=len(visual.transformer.resblocks),
        mean=tuple(float(m) for m in processing["mean"]),
        std=tuple(float(s) for s in processing["std"]),
        activation="quick_gelu" if quick else "gelu",
        precision=precision,
        tokenizer=open_clip.get_tokenizer(name),
    )


class SpatialEncoder(nn.Module):
    """CLIP's frozen visual tower, returning the selected layers' tokens and its own image embedding.

    `precision` fp16/bf16 runs the tower under autocast (CUDA; bf16 also on the CPU), fp32 without; the
    outputs come back in that dtype and the caller casts them where it stores them.
    """

    def __init__(self, visual: nn.Module, layers: list[int], precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        self.visual = visual.eval().requires_grad_(False)
        self.layers = list(layers)
        self.precision = precision

    def train(self, mode: bool = True) -> SpatialEncoder:
        # The spatial encoder is frozen in eval mode whatever the surrounding module does.
        return super().train(False)

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.precision == "fp32" or device.type == "meta":
            return contextlib.nullcontext()
        check_precision(self.precision, device)
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[self.precision])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, S, S), normalised -> tokens (L, N, N+1, C) and embeddings (N, E)."""
        with self._autocast(images.device):
            out = self.visual.forward_intermediates(
                images, indices=self.layers, output_fmt="NLC", output_extra_tokens=True
            )
        dtype = AUTOCAST_DTYPES.get(self.precision, torch.float32) if images.device.type != "meta" else images.dtype
        tokens = torch.stack(
            [torch.cat([cls, patches], dim=1).to(dtype)
             for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        )
        return tokens, out["image_features"].to(dtype)


def recorded_activation(record: dict) -> str:
    """The activation a store's backbone was built with. Records written before dist-cache 0.2 (store format 1)
    have none: those builds used the model config's activation alone (open_clip >= 3 ignores the tag's)."""
    activation = record.get("activation")
    if activation is None:
        config = record.get("model_config")
        return "quick_gelu" if isinstance(config, dict) and config.get("quick_gelu") else "gelu"
    return activation


def check_recorded_config(recorded: dict) -> None:
    """What `load_recorded_backbone` checks of a store's record before it builds anything (a recorded model name
    that open_clip does not know brings its own config, from a stranger: bounded by
    `backbone_config.check_model_config`), for a command to run before it writes anything. Cheap: nothing is built."""
    open_clip, name = _open_clip(), recorded.get("model")
    # What would be built: open_clip's config for a name it knows (one registered from an earlier record too)
    config = open_clip.get_model_config(name) if name in open_clip.list_models() else recorded.get("model_config")
    try:
        check_model_config(config)
    except UserError as err:
        raise UserError(f"the store's backbone: model {str(name)[:60]}: {err}; check the model config; the store is "
                        "damaged or was not written by dist-cache") from None


def activation_mismatch(record: dict) -> str | None:
    """A one-line warning when a store's backbone ran with another activation than its weights were trained
    with (a format-1 store extracted from an OpenAI tag with GELU); None when it did not."""
    open_clip = _open_clip()
    name, tag = str(record.get("model", "")), str(record.get("pretrained", ""))
    trained_quick = (
        bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")) if name in open_clip.list_models() else False
    )
    if not trained_quick or recorded_activation(record) == "quick_gelu":
        return None
    return (f"the features were computed with GELU, but the {tag} weights of {name} were trained with QuickGELU: "
            "they are not CLIP's features; re-extract the store with this dist-cache")


def load_recorded_backbone(
    recorded: dict,
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
) -> Backbone:
    """Rebuild the backbone a store records, with its activation, and prove it is the same by its weights' hash.

    `pretrained` overrides the recorded source. A recorded tag is looked up as usual; a recorded local path is
    never opened on the store's word: a store made from a local checkpoint needs `pretrained`. The record comes
    from a store, i.e. from a stranger: its model config is bounded in size before anything is built.
    """
    open_clip = _open_clip()
    name = recorded["model"]
    activation = recorded_activation(recorded)
    if activation not in ACTIVATIONS:
        raise UserError(f"the store's backbone activation {str(activation)[:40]!r} is unknown; the store is damaged")
    if name not in open_clip.list_models():
        # A store made from a config JSON carries the config itself: register it under its name. The
        # name comes from a store, i.e. from a stranger: it must be a plain file name, never a path.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
            raise UserError(f"the store's backbone model name {str(name)[:60]!r} is not a valid model name; the "
                            "store is damaged")
        with tempfile.TemporaryDirectory(prefix="dist-cache-config-") as config_dir:
            (Path(config_dir) / f"{name}.json").write_text(json.dumps(recorded["model_config"]))
            open_clip.add_model_config(config_dir)
        try:
            _build_on_meta(open_clip, name, activation == "quick_gelu", {})
        except UserError as err:
            raise UserError(f"the store's backbone: {str(err).removeprefix('--')}; the store is damaged or "
                            "was not written by dist-cache") from None
    source = pretrained or recorded.get("pretrained_source") or recorded["pretrained"]
    if source == "none":
        raise UserError(
            "this store was extracted with random weights (--pretrained none), which cannot be rebuilt; "
            "pass --pretrained with the checkpoint that was used, if any"
        )
    if _is_path(source) and not pretrained:
        # The record comes from a stranger: a store never chooses which local file gets opened (it could name
        # /etc/shadow or a FIFO). The user names the checkpoint; its hash then proves it is the store's.
        raise UserError(
            f"the store's weights came from the local file {source[:200]}, which a store cannot choose to open: "
            f"pass --pretrained PATH (that file, or your copy of it)"
        )
    if _is_path(source) and not Path(source).is_file():
        raise UserError(f"--pretrained {pretrained}: no such checkpoint file; check the path")
    backbone = load_backbone(name, source, device=device, precision=precision, activation=activation)
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise UserError(
            f"--pretrained {source}: weights hash {backbone.weights_sha256[:12]} differs from the store's "
            f"{recorded['weights_sha256'][:12]}; pass the checkpoint the store was extracted with"
        )
    return backbone
