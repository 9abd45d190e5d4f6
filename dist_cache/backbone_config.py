"""Bounding an open_clip model config before anything is built from it; reading `--layers` against its blocks.

A config comes from a user's `--model CONFIG.json` or from a store's record, i.e. from a stranger. open_clip
builds whatever it is given: 100000 blocks of width 16384 take minutes and gigabytes to lay out even on the meta
device, before any parameter count could refuse them. So each field that sets the network's size is checked
here, from the JSON alone, and the parameter count is computed analytically and held to the same cap that
applies after a build (`MAX_BACKBONE_PARAMS`).

The bounds sit several times above open_clip 3.3's largest configs (vision: ViT-e-14's 56 blocks of width
1792; text: 36 blocks, width 1280, a 901629-token vocabulary; embeddings of 1536) and far below what would
take noticeable time to build.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dist_cache.errors import UserError

# open_clip 3.3's largest configuration is EVA02-E-14-plus with 5.04 B parameters (ViT-e-14: 4.58 B).
MAX_BACKBONE_PARAMS = 6_000_000_000
MAX_LAYERS = 256
MAX_WIDTH = 8192
MAX_MLP_RATIO = 16.0
MAX_IMAGE_SIZE = 4096
MAX_TOKENS = 16384  # patches per image: (image_size / patch_size)^2; SigLIP2 at 512 px has 1024
MAX_CONTEXT = 4096
MAX_VOCAB = 4_000_000
# timm's keyword arguments that size a ViT (vision_transformer, eva): name -> (least, most).
TIMM_SIZE_KWARGS = {"depth": (1, MAX_LAYERS), "embed_dim": (1, MAX_WIDTH), "num_heads": (1, MAX_WIDTH),
                    "reg_tokens": (0, MAX_TOKENS), "img_size": (1, MAX_IMAGE_SIZE), "patch_size": (1, MAX_IMAGE_SIZE)}
# open_clip's dataclass defaults (CLIPVisionCfg, CLIPTextCfg), which a config may leave out.
VISION_DEFAULTS = {"layers": 12, "width": 768, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 16,
                   "image_size": 224}
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12,
                 "mlp_ratio": 4.0}


def _integer(value: Any, field: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UserError(f"{field} is {repr(value)[:40]}: must be an integer in {low}..{high}")
    return value


def _ratio(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_MLP_RATIO:
        raise UserError(f"{field} is {repr(value)[:40]}: must be a number in (0, {MAX_MLP_RATIO:g}]")
    return float(value)


def _side(value: Any, field: str, high: int) -> int:
    """An image or patch size: an integer, or [height, width] (open_clip accepts both); the larger side."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return max(_integer(v, field, 1, high) for v in value)
    return _integer(value, field, 1, high)


def _blocks(layers: int, width: int, mlp_ratio: float) -> int:
    """Parameters of `layers` transformer blocks: attention (4 w^2 + 4 w), MLP (2 r w^2 + r w + w), 2 LayerNorms."""
    hidden = int(width * mlp_ratio)
    return layers * (4 * width * width + 4 * width + 2 * width * hidden + hidden + width + 4 * width)


def check_timm_kwargs(kwargs: Any, field: str) -> None:
    """Bound the keyword arguments that size a timm ViT (a registered timm model is a real one: its own sizes need
    no bound, but `depth=100000` would build for minutes). What the kwargs leave out is the model's own."""
    if not isinstance(kwargs, dict):
        raise UserError(f"{field} is not a JSON object")
    for key, (low, high) in TIMM_SIZE_KWARGS.items():
        if key in kwargs:
            if key in ("img_size", "patch_size"):
                _side(kwargs[key], f"{field}.{key}", high)
            else:
                _integer(kwargs[key], f"{field}.{key}", low, high)
    if "mlp_ratio" in kwargs:
        _ratio(kwargs["mlp_ratio"], f"{field}.mlp_ratio")
    if "img_size" in kwargs and "patch_size" in kwargs:
        tokens = (_side(kwargs["img_size"], field, MAX_IMAGE_SIZE) // _side(kwargs["patch_size"], field,
                                                                             MAX_IMAGE_SIZE)) ** 2
        if tokens > MAX_TOKENS:
            raise UserError(f"{field}: img_size / patch_size gives {tokens} patches per image, more than {MAX_TOKENS}")


def vision_params(cfg: dict, embed_dim: int) -> int:
    """Check a ViT visual tower's config; its parameter count (0 for a timm tower: a registered timm model, whose
    size-setting kwargs are bounded here and whose built parameters are counted after the meta build)."""
    if cfg.get("timm_model_name"):
        check_timm_kwargs(cfg.get("timm_model_kwargs", {}), "vision_cfg.timm_model_kwargs")
        if "image_size" in cfg:
            _side(cfg["image_size"], "vision_cfg.image_size", MAX_IMAGE_SIZE)
        return 0
    cfg = {**VISION_DEFAULTS, **cfg}
    if isinstance(cfg["layers"], (list, tuple)):
        raise UserError("dist-cache needs a ViT visual tower, not a ResNet one; pick a ViT model")
    layers = _integer(cfg["layers"], "vision_cfg.layers", 1, MAX_LAYERS)
    width = _integer(cfg["width"], "vision_cfg.width", 1, MAX_WIDTH)
    head_width = _integer(cfg["head_width"], "vision_cfg.head_width", 1, width)
    if width % head_width:
        raise UserError(f"vision_cfg.width {width} is not a multiple of vision_cfg.head_width {head_width}")
    mlp_ratio = _ratio(cfg["mlp_ratio"], "vision_cfg.mlp_ratio")
    image = _side(cfg["image_size"], "vision_cfg.image_size", MAX_IMAGE_SIZE)
    patch = _side(cfg["patch_size"], "vision_cfg.patch_size", image)
    tokens = (image // patch) ** 2
    if tokens > MAX_TOKENS:
        raise UserError(f"vision_cfg.image_size {image} / patch_size {patch} gives {tokens} patches per image, "
                        f"more than {MAX_TOKENS}")
    return 3 * patch * patch * width + (tokens + 2) * width + 4 * width + _blocks(layers, width, mlp_ratio) + \
        width * embed_dim


def text_params(cfg: dict, embed_dim: int, tower: str = "text_cfg") -> int:
    """Check open_clip's own text tower's config (or CoCa's multimodal decoder's, `tower="multimodal_cfg"`,
    whose blocks also cross-attend: counted twice); its parameter count. A Hugging Face text tower
    (`hf_model_name`) takes its size from that model's config, not from this one: 0 here."""
    if cfg.get("hf_model_name"):
        return 0
    cfg = {**TEXT_DEFAULTS, **cfg}
    layers = _integer(cfg["layers"], f"{tower}.layers", 1, MAX_LAYERS)
    width = _integer(cfg["width"], f"{tower}.width", 1, MAX_WIDTH)
    heads = _integer(cfg["heads"], f"{tower}.heads", 1, width)
    if width % heads:
        raise UserError(f"{tower}.width {width} is not a multiple of {tower}.heads {heads}")
    mlp_ratio = _ratio(cfg["mlp_ratio"], f"{tower}.mlp_ratio")
    context = _integer(cfg["context_length"], f"{tower}.context_length", 1, MAX_CONTEXT)
    vocab = _integer(cfg["vocab_size"], f"{tower}.vocab_size", 1, MAX_VOCAB)
    blocks = _blocks(layers, width, mlp_ratio) * (2 if tower == "multimodal_cfg" else 1)
    return (vocab + context + 2) * width + blocks + width * embed_dim


def check_model_config(config: Any) -> int:
    """Refuse, in one line, a model config whose network could not be a CLIP dist-cache runs, from the config
    alone: a non-ViT visual tower, a field out of its bound, or more than MAX_BACKBONE_PARAMS parameters.
    Returns the analytic parameter count (within 0.5 % of open_clip's for every ViT config it ships)."""
    if isinstance(config, dict) and "timm_model_name" in config:  # a timm tower by name (`--model timm:NAME`)
        check_timm_kwargs(config.get("timm_model_kwargs", {}), "timm_model_kwargs")
        return 0
    # open_clip registers only configs with all three (get_model_config gives None for any other name)
    if not isinstance(config, dict) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise UserError("no such model config (a config is a JSON object with embed_dim, vision_cfg and text_cfg)")
    embed_dim = _integer(config.get("embed_dim"), "embed_dim", 1, MAX_WIDTH)
    for tower in ("vision_cfg", "text_cfg", "multimodal_cfg"):
        if not isinstance(config.get(tower, {}), dict):
            raise UserError(f"{tower} is not a JSON object")
    count = vision_params(config["vision_cfg"], embed_dim) + text_params(config["text_cfg"], embed_dim)
    if "multimodal_cfg" in config:  # CoCa's caption decoder
        count += text_params(config["multimodal_cfg"], embed_dim, "multimodal_cfg")
    if count > MAX_BACKBONE_PARAMS:
        raise UserError(f"{count / 1e9:.1f} B parameters, more than any open_clip CLIP "
                        f"({MAX_BACKBONE_PARAMS / 1e9:.0f} B at most)")
    return count


def resolve_layers(spec: str | None, available: int | Sequence[int], whose: str = "") -> list[int]:
    """`--layers`: all (or None), last:N or a comma list of block indices, sorted, over `available`: a model's
    blocks (an int: their count) or the layers a store holds. `whose` names them in the one-line error. Torch-free,
    so that copy does not load torch to read its `--layers`."""
    have = list(range(available)) if isinstance(available, int) else list(available)
    whose = whose or f"this model's blocks 0..{len(have) - 1}"
    spec = "all" if spec is None else spec.strip()
    if spec == "all":
        return have
    if spec.startswith("last:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or not 1 <= int(count) <= len(have):
            raise UserError(f"--layers {spec}: N must be 1..{len(have)} ({whose})")
        return have[len(have) - int(count):]
    try:
        wanted = sorted({int(part) for part in spec.split(",") if part.strip()})
    except ValueError:
        wanted = []
    if not wanted:
        raise UserError(f"--layers {spec!r} is not 'all', 'last:N' or a comma list of block indices")
    missing = [x for x in wanted if x not in have]
    if missing:
        raise UserError(f"--layers {spec}: layers {missing} are not in {whose}")
    return wanted
