"""The frozen spatial encoder: loading an image tower (an open_clip model, or a timm ViT by name), fingerprinting
its weights, and running it to the per-layer token features DiST consumes.

A "layer" l is the output of block l of the visual transformer (0-based), taken after both residual
adds and before the tower's final norm (`ln_post`), shaped (P+N, C) per frame: the tower's P prefix tokens (CLIP:
its class token; DINOv2 with registers: the class token and 4 registers; SigLIP: none), then the patches in
row-major order. For CLIP this is what the reference implementation records (docs/MODEL.md, "Structure"); every
tower is run through its own `forward_intermediates` (dist_cache/towers.py).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_cache.backbone_config import MAX_BACKBONE_PARAMS, check_model_config
from dist_cache.errors import UserError, first_line
from dist_cache.logs import without_log_message
from dist_cache.model.tokens import branch_tokens
from dist_cache.towers import (
    TIMM_PREFIX,
    TowerFacts,
    build_timm_tower,
    check_timm_config,
    init_unsaved_buffers,
    is_timm_config,
    timm_config,
    timm_state_dict,
    timm_tags,
    tower_facts,
)
from dist_cache.weights import Weights, read_weights, tag_weights_file, text_tokenizer, timm_weights_file

BUNDLED_CONFIGS = Path(__file__).parent / "configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# The activations an open_clip ViT can be built with (a timm tower's is fixed by its architecture).
ACTIVATIONS = ("quick_gelu", "gelu")
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = ("fp32", *AUTOCAST_DTYPES)  # fp32 or an autocast dtype: a store's `precision`
# What open_clip logs when create_model gets no weights; expected while building on the meta device, where the
# weights are assigned right after.
_NO_WEIGHTS_LOGGED = "No pretrained weights loaded for model"
TEXT_TOWER_SOURCE = "backbone text tower, mean of L2-normalised templates"
# A tower without a text side (a timm ViT by name) still needs fixed class embeddings for DiST's cosine logits.
PROTOTYPE_SOURCE = ("fixed class embeddings, the tower has no text side: the rows of an orthonormal matrix from "
                    "torch.randn with seed 0 and QR (normalised Gaussian rows when classes outnumber dimensions)")


def _open_clip():
    """Import open_clip lazily (it takes seconds) and register the bundled tiny configs once."""
    import open_clip

    if "dist-tiny" not in open_clip.list_models():
        open_clip.add_model_config(BUNDLED_CONFIGS)
    return open_clip


@dataclass
class Backbone:
    """A loaded, frozen image tower (with its text side, if it has one) plus everything needed to reproduce its
    features."""

    model: nn.Module  # open_clip's CLIP (`.visual`, `.encode_text`), or `towers.VisionOnly` (`.visual` only)
    name: str
    model_config: dict
    pretrained: str
    pretrained_source: str
    weights_sha256: str
    tower: TowerFacts
    embed_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: str

    @property
    def image_size(self) -> int:
        return self.tower.image_size

    @property
    def patch_size(self) -> int:
        return self.tower.patch_size

    @property
    def width(self) -> int:
        return self.tower.width

    @property
    def num_layers(self) -> int:
        return self.tower.num_layers

    @property
    def activation(self) -> str:
        return self.tower.activation

    @property
    def num_tokens(self) -> int:
        """P + N: the tower's prefix tokens plus its patch grid (CLIP: the cls token and the grid)."""
        return self.tower.layout.num_tokens

    @property
    def has_text(self) -> bool:
        return hasattr(self.model, "encode_text")

    @property
    def text_source(self) -> str:
        """How `class_embeddings` makes the store's class embeddings (recorded as the store's text.source)."""
        return TEXT_TOWER_SOURCE if self.has_text else PROTOTYPE_SOURCE

    def scoring(self) -> dict[str, Any] | None:
        """How the model scores an image against a text: CLIP a softmax over its scaled cosines, SigLIP a sigmoid
        of each (scale * cosine + bias); None without a text side. Zero-shot eval scores this way."""
        if not self.has_text:
            return None
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:
            return {"kind": "softmax"}
        return {"kind": "sigmoid", "scale": float(self.model.logit_scale.detach().exp()),
                "bias": float(bias.detach().reshape(-1)[0])}

    def describe(self) -> dict:
        """JSON-safe description recorded in every store, enough to rebuild this exact backbone and to tell which
        stored token is which (storage/README.md, "The schema")."""
        import timm

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
            **self.tower.record(),
            "text_tower": self.has_text,
            "scoring": self.scoring(),
            "open_clip_version": _open_clip().__version__,
            "timm_version": timm.__version__,
        }

    @torch.no_grad()
    def encode_text(self, class_names: list[str], templates: list[str]) -> np.ndarray:
        """L2-normalised class embeddings (K, E): each template's embedding, averaged, renormalised.
        The text tower always runs in fp32: K class names cost nothing, and the embeddings are the targets."""
        if not self.has_text:
            raise UserError(f"{self.name} is an image tower without a text side: it cannot embed class names "
                            "(zero-shot needs an image-text model: CLIP, SigLIP, EVA02-CLIP)")
        tokenizer = text_tokenizer(_open_clip(), self.name, self.model_config)
        device = next(self.model.parameters()).device
        per_template = []
        for template in templates:
            tokens = tokenizer([template.format(name) for name in class_names]).to(device)
            emb = self.model.encode_text(tokens).float()
            per_template.append(emb / emb.norm(dim=-1, keepdim=True))
        mean = torch.stack(per_template).mean(0)
        return (mean / mean.norm(dim=-1, keepdim=True)).cpu().numpy().astype(np.float32)

    def class_embeddings(self, class_names: list[str], templates: list[str]) -> np.ndarray:
        """The store's class embeddings (K, E): the text tower's (`encode_text`), or for a tower without one fixed
        orthonormal prototypes, which DiST's learned projection maps the video embedding onto (`text_source`)."""
        if self.has_text:
            return self.encode_text(class_names, templates)
        return class_prototypes(len(class_names), self.embed_dim)

    def spatial_encoder(self, layers: list[int]) -> SpatialEncoder:
        return SpatialEncoder(self.model.visual, layers, self.precision)


def class_prototypes(num_classes: int, dim: int) -> np.ndarray:
    """(K, E) unit rows, orthonormal when K <= E (PROTOTYPE_SOURCE): the targets of a tower with no text side."""
    gaussian = torch.randn(max(num_classes, 1), dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if num_classes <= dim:
        q, r = torch.linalg.qr(gaussian.T)
        rows = (q * torch.sign(torch.diagonal(r))).T  # the sign fix makes the factorisation unique
    else:
        rows = gaussian / gaussian.norm(dim=1, keepdim=True)
    return rows.numpy().astype(np.float32)


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


@dataclass(frozen=True)
class ModelSpec:
    """A model to build: its name, its config (open_clip's, or a timm tower's), and which library builds it."""

    name: str
    config: dict[str, Any]
    timm: bool  # a timm ViT by name (no text side); else an open_clip model


def resolve_model(model: str) -> ModelSpec:
    """`--model`: an open_clip name, a bundled config name, `timm:NAME` (a timm ViT), or a path to a JSON config:
    an open_clip model config, or a timm tower's `{"timm_model_name": NAME, "timm_model_kwargs": {...}}`."""
    open_clip = _open_clip()
    path = Path(model)
    if model.startswith(TIMM_PREFIX):
        config = timm_config(model)
        check_timm_config(config, f"--model {model}")
        return ModelSpec(model, config, True)
    if model.endswith(".json"):
        if not path.is_file():
            raise UserError(f"--model {model}: no such config file; pass an open_clip name or an existing JSON")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"--model {model}: not a readable JSON config ({first_line(err, 80)})") from None
        if is_timm_config(config):
            check_timm_config(config, f"--model {model}")
            return ModelSpec(path.stem, config, True)
        open_clip.add_model_config(path)
        return ModelSpec(path.stem, open_clip.get_model_config(path.stem), False)
    if model not in open_clip.list_models():
        raise UserError(
            f"--model {model}: unknown model; use a name from open_clip.list_models() (e.g. ViT-B-16, "
            "ViT-B-16-SigLIP, EVA02-B-16), dist-tiny, timm:NAME for a timm ViT (e.g. "
            "timm:vit_base_patch14_reg4_dinov2), or a path to a model-config JSON"
        )
    return ModelSpec(model, open_clip.get_model_config(model), False)


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


def _build_on_meta(spec: ModelSpec, quick_gelu: bool, preprocess: dict[str, Any], tag: str | None = None
                   ) -> nn.Module:
    """The network's modules with shapes only: no memory, no random initialisation, nothing logged about the
    missing weights (they are assigned next). Refuses a network too large to be any real tower: from its config
    alone, before open_clip or timm lays out a module (a stranger's config could ask for 100000 blocks), then by the
    parameters built; and a tower that is not a ViT."""
    open_clip = _open_clip()
    try:
        check_model_config(spec.config)
    except UserError as err:
        raise UserError(f"--model {spec.name}: {err}; check the model config") from None
    try:
        with without_log_message(_NO_WEIGHTS_LOGGED), torch.device("meta"):
            if spec.timm:
                model = build_timm_tower(*check_timm_config(spec.config, f"--model {spec.name}"), tag)
            else:
                model = open_clip.create_model(spec.name, pretrained=None, device="meta",
                                               force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess)
    except UserError:
        raise
    except Exception as err:  # open_clip and timm fail in many ways on a config they cannot build
        library = "timm" if spec.timm else "open_clip"
        raise UserError(f"--model {spec.name}: {library} cannot build this config ({first_line(err, 120)})") from None
    count = sum(p.numel() for p in model.parameters())
    if count > MAX_BACKBONE_PARAMS:
        raise UserError(
            f"--model {spec.name}: {count / 1e9:.1f} B parameters, more than any open_clip CLIP "
            f"({MAX_BACKBONE_PARAMS / 1e9:.0f} B at most); check the model config"
        )
    tower_facts(model.visual, spec.name)  # a ViT, or a one-line refusal
    return model


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
    # Non-persistent buffers are not in a checkpoint and stay on the meta device: computed again on the CPU.
    init_unsaved_buffers(clip, name)


def load_backbone(
    model: str,
    pretrained: str,
    *,
    allow_random_weights: bool = False,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    activation: str | None = None,
) -> Backbone:
    """Build the tower (`resolve_model`), load its weights and freeze it.

    `pretrained` is a tag (open_clip's, e.g. `openai`; timm's for a timm ViT, e.g. `lvd142m`), a local checkpoint
    path, or `none`. Random weights make features worthless to share, so `none` needs `allow_random_weights`.
    `precision` is how the spatial encoder runs (fp32, or fp16/bf16 under autocast; the weights stay fp32).
    `activation` is what a record says the tower ran with: it forces "quick_gelu" or "gelu" on an open_clip ViT
    (rebuilding a record), and must match a timm tower's own. By default an open_clip ViT gets QuickGELU whenever
    the model config, the tag's pretrained config or a TorchScript checkpoint says so.
    """
    return _load(resolve_model(model), pretrained, allow_random_weights=allow_random_weights, device=device,
                 precision=precision, activation=activation)


def _load(spec: ModelSpec, pretrained: str, *, allow_random_weights: bool = False,
          device: str | torch.device = "cpu", precision: str = "fp32", activation: str | None = None) -> Backbone:
    open_clip = _open_clip()
    name = spec.name
    check_precision(precision, device)
    tag_cfg: dict[str, Any] = {}
    tag = None
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
        tags = timm_tags(spec.config["timm_model_name"]) if spec.timm else open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise UserError(
                f"--pretrained {pretrained}: not a known tag for {name} (known: {', '.join(tags) or 'none'}); "
                "pass a tag, a checkpoint path, or none"
            )
        source = tag = pretrained
        if not spec.timm:
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)

    said_quick = bool(spec.config.get("quick_gelu")) or bool(tag_cfg.get("quick_gelu"))
    # A record's activation decides only an open_clip ViT's (a timm tower's is its architecture's).
    forcible = not spec.timm and not spec.config.get("vision_cfg", {}).get("timm_model_name")
    quick = activation == "quick_gelu" if forcible and activation in ACTIVATIONS else said_quick
    preprocess = open_clip.transform.merge_preprocess_dict({}, tag_cfg)
    model = _build_on_meta(spec, quick, preprocess, tag)
    if source is None:
        # Random weights need the library's own initialisation: build for real (the meta build bounded its size).
        if spec.timm:
            model = build_timm_tower(*check_timm_config(spec.config, f"--model {name}"), tag)
        else:
            model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    else:
        if _is_path(pretrained):
            weights = read_weights(source)
        else:
            weights = read_weights(timm_weights_file(spec.config["timm_model_name"], tag) if spec.timm else
                                   tag_weights_file(tag_cfg))
        if spec.timm:
            weights = Weights(timm_state_dict(model, weights.state_dict), None, False)
        elif activation is None and weights.activation == "quick_gelu" and not quick:
            quick = True
            model = _build_on_meta(spec, quick, preprocess)
        _assign_weights(model, weights, name, pretrained)
    model.eval().requires_grad_(False)
    facts = tower_facts(model.visual, name)
    if activation is not None and activation != facts.activation:
        # A record's activation that this build cannot give: an open_clip ViT only takes quick_gelu or gelu.
        raise UserError(f"the store's backbone activation {str(activation)[:40]!r} is not what {name} runs "
                        f"({facts.activation}); the store is damaged")
    digest = weights_sha256(model)
    model.to(device)

    if spec.timm:
        trunk = model.visual.trunk
        mean, std, embed_dim = trunk.pretrained_cfg["mean"], trunk.pretrained_cfg["std"], int(trunk.num_features)
    else:
        processing = open_clip.get_model_preprocess_cfg(model)
        mean, std, embed_dim = processing["mean"], processing["std"], int(spec.config["embed_dim"])
    return Backbone(
        model=model,
        name=name,
        model_config=spec.config,
        pretrained="none" if source is None else (Path(source).name if _is_path(pretrained) else source),
        pretrained_source="none" if source is None else source,
        weights_sha256=digest,
        tower=facts,
        embed_dim=embed_dim,
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        precision=precision,
    )


class SpatialEncoder(nn.Module):
    """The frozen image tower, returning the selected layers' tokens (as stored: prefix tokens, then patches) and
    its own image embedding, through the tower's `forward_intermediates`.

    `precision` fp16/bf16 runs the tower under autocast (CUDA; bf16 also on the CPU), fp32 without; the
    outputs come back in that dtype and the caller casts them where it stores them. `layout` says which token is
    which; `branch_tokens(tokens)` forms what DiST takes from them (dist_cache/model/tokens.py).
    """

    def __init__(self, visual: nn.Module, layers: list[int], precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise UserError(f"--precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
        self.visual = visual.eval().requires_grad_(False)
        self.layers = list(layers)
        self.precision = precision
        self.layout = tower_facts(visual, type(visual).__name__).layout

    def branch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(..., P+N, C) tokens of this tower -> (..., 1+N, C), the summary token and the patches."""
        return branch_tokens(tokens, self.layout)

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
        """images (N, 3, S, S), normalised -> tokens (L, N, P+N, C) and embeddings (N, E)."""
        with self._autocast(images.device):
            # Prefix tokens only where the tower has them: timm's EVA cannot return an empty prefix (PE-Core bigG).
            out = self.visual.forward_intermediates(
                images, indices=self.layers, output_fmt="NLC", output_extra_tokens=self.layout.num_prefix > 0
            )
        dtype = AUTOCAST_DTYPES.get(self.precision, torch.float32) if images.device.type != "meta" else images.dtype
        patches = out["image_intermediates"]
        prefixes = out.get("image_intermediates_prefix") or [None] * len(patches)
        tokens = torch.stack([(x if prefix is None else torch.cat([prefix, x], dim=1)).to(dtype)
                              for prefix, x in zip(prefixes, patches)])
        if tokens.shape[2] != self.layout.num_tokens:
            raise RuntimeError(f"the tower returned {tokens.shape[2]} tokens per image, its layout says "
                               f"{self.layout.num_tokens}")
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


def recorded_weights_source(recorded: dict, pretrained: str | None = None) -> str:
    """Where a store's weights are loaded from: `pretrained`, or the recorded tag. Cheap (nothing is loaded), so a
    command can refuse a missing --pretrained before it writes anything."""
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
    return source


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
    if not isinstance(activation, str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", activation):
        raise UserError(f"the store's backbone activation {str(activation)[:40]!r} is unknown; the store is damaged")
    config = recorded["model_config"]
    # The name and config come from a store, i.e. from a stranger: a plain model name, never a path.
    if not re.fullmatch(r"(timm:)?[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
        raise UserError(f"the store's backbone model name {str(name)[:60]!r} is not a valid model name; the "
                        "store is damaged")
    known = name in open_clip.list_models()
    if is_timm_config(config):
        spec = ModelSpec(name, config, True)
    elif known:
        spec = ModelSpec(name, open_clip.get_model_config(name), False)
    else:
        # A store made from a config JSON carries the config itself: register it under its name.
        with tempfile.TemporaryDirectory(prefix="dist-cache-config-") as config_dir:
            (Path(config_dir) / f"{name}.json").write_text(json.dumps(config))
            open_clip.add_model_config(config_dir)
        spec = ModelSpec(name, open_clip.get_model_config(name), False)
    if not known:
        try:
            _build_on_meta(spec, activation == "quick_gelu", {})
        except UserError as err:
            raise UserError(f"the store's backbone: {str(err).removeprefix('--')}; the store is damaged or "
                            "was not written by dist-cache") from None
    source = recorded_weights_source(recorded, pretrained)
    backbone = _load(spec, source, device=device, precision=precision, activation=activation)
    if backbone.weights_sha256 != recorded["weights_sha256"]:
        raise UserError(
            f"--pretrained {source}: weights hash {backbone.weights_sha256[:12]} differs from the store's "
            f"{recorded['weights_sha256'][:12]}; pass the checkpoint the store was extracted with"
        )
    return backbone
