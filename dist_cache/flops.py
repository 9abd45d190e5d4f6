"""FLOPs and parameter counts of one DiST view, in the paper's convention (1 multiply-add = 1 FLOP).

The count is measured, not derived: the whole forward of `OnlineDiST` (CLIP visual on the T sparse frames,
then the DiST branch and head; the text tower excluded) runs under `torch.utils.flop_counter.FlopCounterMode`
on the meta device, so no weights are allocated and a ViT-B/16 profile takes well under a second.

Two settings make FlopCounterMode count attention at all: the MHA fast path is disabled (its fused kernel
hides the projections and the attention matmuls) and SDPA is forced to the MATH backend (which decomposes
into counted bmm's). With both, ViT-B/16 at 224 px is 17.56 GMACs per frame, the paper's figure.

`gflops` is what this project runs. `gflops_paper_convention` adds what the reference also computes: it
applies CLIP's patch embedding to all γT dense frames before keeping every γ-th one (docs/MODEL.md, "FLOPs
and parameters"), i.e. (γ-1)·T extra patch embeddings (0.92 G for B/16, 8 frames, γ=2). The paper's Table 1 numbers are
reproduced by that convention.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from dist_cache.model import DiST, DiSTConfig, DiSTSwitches, OnlineDiST
from dist_cache.model.switches import ConfigError

# Paper GFLOPs (ViT-B/16, 8 sparse frames, one view; Table 1). Key: (gamma, alpha_dim, beta_dim, t_block).
PAPER_TABLE1_GFLOPS: dict[tuple[int, int, int, str], tuple[str, float]] = {
    (2, 384, 96, "r2plus1d"): ("default (Tab. 1c-f)", 163.1),
    (1, 384, 96, "r2plus1d"): ("Tab. 1d gamma 1", 158.7),
    (4, 384, 96, "r2plus1d"): ("Tab. 1d gamma 4", 171.6),
    (8, 384, 96, "r2plus1d"): ("Tab. 1d gamma 8", 188.8),
    (2, 96, 96, "r2plus1d"): ("Tab. 1e alpha 96", 149.4),
    (2, 192, 96, "r2plus1d"): ("Tab. 1e alpha 192", 152.8),
    (2, 768, 96, "r2plus1d"): ("Tab. 1e alpha 768", 196.1),
    (2, 384, 64, "r2plus1d"): ("Tab. 1f beta 64", 159.7),
    (2, 384, 128, "r2plus1d"): ("Tab. 1f beta 128", 167.4),
    (2, 384, 192, "r2plus1d"): ("Tab. 1f beta 192", 178.7),
    (2, 384, 96, "c3d"): ("Tab. 1c C3D", 168.2),
    (2, 384, 96, "tada"): ("Tab. 1c TAdaConv", 162.0),
    (2, 384, 96, "joint"): ("Tab. 1c joint transformer", 165.0),
}
# Paper Tab. 4 (SSv2, ViT-L/14 at 224 px, gamma 2, the default branch): 0.71 / 1.42 / 2.83 TFLOPs per view at
# 8 / 16 / 32 frames, 336 M parameters (Tab. 5, K400's 4 AdaPooling blocks: 343 M). Key: frames.
PAPER_VIT_L14_GFLOPS: dict[int, tuple[str, float]] = {
    8: ("Tab. 4 ViT-L/14, 8 frames", 710.0), 16: ("Tab. 4 ViT-L/14, 16 frames", 1420.0),
    32: ("Tab. 4 ViT-L/14, 32 frames", 2830.0),
}
# Only Table 1's model, frame count and the reference's interaction/pooling defaults have a paper value.
_PAPER_DEFAULTS = {"psi": "dconv", "phi": "nearest", "temporal": True, "integration": True,
                   "integ_to_temp": True, "temp_to_integ": True, "pool_blocks": 2, "stem_t_kernel": 5}

PARTS = ("clip", "temporal_encoder", "integration_branch", "head")
PART_LABELS = {
    "clip": "CLIP visual, T sparse frames (frozen)",
    "temporal_encoder": "temporal encoder (stem + T-Blocks)",
    "integration_branch": "integration branch (FC, I-Blocks, Psi, Phi)",
    "head": "head (AdaPooling, cls fusion, proj)",
}


@contextlib.contextmanager
def counting_attention() -> Iterator[None]:
    """Make FlopCounterMode see attention: MHA fast path off and SDPA on MATH, restored afterwards."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


@functools.lru_cache(maxsize=4)
def _meta_visual(model_name: str) -> tuple[nn.Module, int]:
    """Build a tower on the meta device (shapes only) and return it with the width of its image embedding.

    Cached: a meta module holds no data and profiling never changes it, so a table of settings builds it once.
    """
    from dist_cache.backbone import _build_on_meta, resolve_model

    spec = resolve_model(model_name)
    model = _build_on_meta(spec, bool(spec.config.get("quick_gelu")), {})
    embed_dim = int(model.visual.trunk.num_features) if spec.timm else int(spec.config["embed_dim"])
    return model.visual.eval().requires_grad_(False), embed_dim


def _count(fn, *args) -> tuple[dict[str, int], int]:
    """Run fn under FlopCounterMode; return MACs per module name and in total (counter FLOPs / 2)."""
    with counting_attention(), FlopCounterMode(display=False) as counter:
        fn(*args)
    per_module = {name: sum(ops.values()) // 2 for name, ops in counter.get_flop_counts().items()}
    return per_module, counter.get_total_flops() // 2


def _subtree(per_module: dict[str, int], prefix: str) -> int:
    """MACs of module `prefix` and everything under it.

    The tracker only names modules that were *called*; DiST.forward calls e.g. `temporal.blocks[i]` directly,
    never `temporal` itself, so sum the outermost called descendants instead (no double counting).
    """
    if prefix in per_module:
        return per_module[prefix]
    total = 0
    for name, macs in per_module.items():
        if not name.startswith(prefix + "."):
            continue
        parts = name.split(".")
        ancestors = (".".join(parts[:i]) for i in range(len(prefix.split(".")) + 1, len(parts)))
        if not any(a in per_module for a in ancestors):
            total += macs
    return total


def _numel(modules: list[nn.Module | None]) -> int:
    return sum(p.numel() for m in modules if m is not None for p in m.parameters())


def paper_gflops(model_name: str, frames: int, config: DiSTConfig) -> tuple[str, float] | None:
    """The paper's value for this setting, if it has one: Table 1 (ViT-B/16, 8 frames), Table 4 (ViT-L/14, the
    default branch at 8, 16 or 32 frames); every layer integrated."""
    s = config.switches
    if any(getattr(s, key) != value for key, value in _PAPER_DEFAULTS.items()):
        return None
    if model_name == "ViT-L-14" and config.layers == list(range(24)):
        default = (s.gamma, s.alpha_dim, s.beta_dim, s.t_block) == (2, 384, 96, "r2plus1d")
        return PAPER_VIT_L14_GFLOPS.get(frames) if default else None
    if model_name != "ViT-B-16" or frames != 8 or config.layers != list(range(12)):
        return None
    return PAPER_TABLE1_GFLOPS.get((s.gamma, s.alpha_dim, s.beta_dim, s.t_block))


def profile_dist(
    model_name: str = "ViT-B-16", frames: int = 8, switches: DiSTSwitches | None = None,
    layers: list[int] | None = None, pca_k: int | None = None, **overrides: Any,
) -> dict[str, Any]:
    """Count one view's forward (CLIP visual on T sparse frames + DiST + head) and the parameters.

    `switches` (default: the reference's) with `overrides` applied (any DiSTSwitches field: gamma, alpha_dim,
    t_block, ...). `layers` defaults to every block, as in the reference.
    `pca_k` K also counts the cached branch on a compact store's PCA codes (K per layer), the projection folded into
    FC_l and the head's class-token Linear (dist_cache/model/compact.py), against the branch on tokens.
    Returns a JSON-safe dict; `format_profile` renders it.
    """
    from dist_cache.towers import patch_embedding, tower_facts

    visual, embed_dim = _meta_visual(model_name)
    tower = tower_facts(visual, model_name)
    num_layers = tower.num_layers
    config = DiSTConfig(
        width=tower.width, patch_size=tower.patch_size, image_size=tower.image_size,
        num_frames=frames, embed_dim=embed_dim, layers=list(range(num_layers)) if layers is None else list(layers),
        switches=(switches or DiSTSwitches()).replace(**overrides),
    )
    if config.layers[-1] >= num_layers or config.layers[0] < 0:
        raise ConfigError(f"profile_dist: layers must lie in 0..{num_layers - 1} for {model_name}")

    from dist_cache.backbone import SpatialEncoder

    with torch.device("meta"):
        dist = DiST(config)
    model = OnlineDiST(SpatialEncoder(visual, config.layers), dist).eval()
    size = config.image_size
    video = torch.empty(1, config.dense_frames, 3, size, size, device="meta")
    # Not under no_grad: FlopCounterMode's module tracker trips over learned tokens expanded in no_grad mode.
    # On the meta device the autograd graph costs nothing anyway.
    per_module, total = _count(model, video)
    _, patch_embed = _count(patch_embedding(visual), torch.empty(1, 3, size, size, device="meta"))

    root = "OnlineDiST"
    clip = _subtree(per_module, f"{root}.encoder")
    temporal = _subtree(per_module, f"{root}.dist.temporal")
    integration = sum(_subtree(per_module, f"{root}.dist.{part}") for part in ("integration", "psi", "phi"))
    head = _subtree(per_module, f"{root}.dist.head")
    macs = {"clip": clip, "temporal_encoder": temporal, "integration_branch": integration, "head": head}
    if sum(macs.values()) != total:
        raise RuntimeError(f"FLOP parts {macs} do not add up to the total {total}; module names changed?")
    # Without a temporal encoder there are no dense frames, so the reference convention adds nothing.
    extra = (config.switches.gamma - 1) * config.num_frames * patch_embed if config.switches.temporal else 0

    params = {
        "clip_visual_frozen": _numel([visual]),
        "temporal_encoder": _numel([dist.temporal]),
        "integration_branch": _numel([dist.integration, dist.psi, dist.phi]),
        "head": _numel([dist.head]),
    }
    params["dist_trainable"] = params["temporal_encoder"] + params["integration_branch"] + params["head"]
    params["total"] = params["clip_visual_frozen"] + params["dist_trainable"]

    paper = paper_gflops(model_name, frames, config)
    result: dict[str, Any] = {
        "model": model_name,
        "frames": config.num_frames,
        "gamma": config.switches.gamma,
        "dense_frames": config.dense_frames,
        "alpha_dim": config.switches.alpha_dim,
        "beta_dim": config.switches.beta_dim,
        "config": config.to_dict(),
        "convention": "one view; 1 multiply-add = 1 FLOP; CLIP visual + DiST branch + head; text tower excluded",
        "gflops": total / 1e9,
        "gflops_paper_convention": (total + extra) / 1e9,
        "gflops_dense_patch_embed": extra / 1e9,
        "gflops_by_part": {part: value / 1e9 for part, value in macs.items()},
        "clip_gflops_per_frame": clip / config.num_frames / 1e9,
        "params": params,
        "paper_setting": paper[0] if paper else None,
        "paper_gflops": paper[1] if paper else None,
    }
    if paper:
        result["paper_rel_diff"] = result["gflops_paper_convention"] / paper[1] - 1
    if pca_k is not None:
        result["pca"] = _fold_profile(dist, config, pca_k)
    return result


def _fold_profile(dist: DiST, config: DiSTConfig, k: int) -> dict[str, Any]:
    """The cached branch (DiST and head, CLIP excluded) on tokens and on PCA codes of K components per layer.

    Measured twice with batches of 1 and 2 views: the difference is the cost per view, and what is left of the
    batch-of-1 count is the fold itself (W B.T and W mu + b for every FC_l and the head's Linear), paid once per
    step whatever the batch."""
    from dist_cache.model.compact import CompactTokens

    if not 1 <= k <= config.width:
        raise ConfigError(f"--pca-k {k}: must lie in 1..{config.width} (the model's width)")
    L, T, N1, C = config.num_layers, config.num_frames, config.num_tokens, config.width
    size = config.image_size

    def count(batch: int, codes: bool) -> int:
        frames = torch.empty(batch, config.dense_frames, 3, size, size, device="meta") \
            if config.switches.temporal else None
        if codes:
            features: Any = CompactTokens([torch.empty(batch, T, N1, k, device="meta") for _ in range(L)],
                                          mean=torch.empty(L, C, device="meta"),
                                          components=[torch.empty(k, C, device="meta") for _ in range(L)])
        else:
            features = torch.empty(L, batch, T, N1, C, device="meta")
        return _count(dist, features, frames)[1]

    tokens = count(2, False) - count(1, False)
    one, two = count(1, True), count(2, True)
    per_view = two - one
    return {"k": k, "branch_gflops_tokens": tokens / 1e9, "branch_gflops_codes": per_view / 1e9,
            "fold_gflops_per_step": (one - per_view) / 1e9, "saved_per_view": 1 - per_view / tokens}


def format_profile(result: dict[str, Any]) -> str:
    """Human-readable table of a `profile_dist` result (GFLOPs and M params; MFLOPs and K for tiny models)."""
    cfg = result["config"]["switches"]
    params = result["params"]
    big = result["gflops"] >= 1
    flop_unit, flop_scale = ("GFLOPs", 1.0) if big else ("MFLOPs", 1e3)
    big_params = params["total"] >= 1e6
    param_unit, param_scale = ("params (M)", 1e6) if big_params else ("params (K)", 1e3)

    def row(label: str, gflops: float | None = None, count: int | None = None, suffix: str = "") -> str:
        f = f"{gflops * flop_scale:>10.2f}" if gflops is not None else " " * 10
        p = f"{count / param_scale:>12.2f}" if count is not None else ""
        return f"  {label:<46}{f}{p}{suffix}"

    switches = [name for name in ("temporal", "integration", "integ_to_temp", "temp_to_integ") if not cfg[name]]
    lines = [
        f"DiST profile: {result['model']}, {result['frames']} CLIP frames + {result['dense_frames']} dense frames "
        f"(gamma {result['gamma']}), alpha dim {result['alpha_dim']}, beta dim {result['beta_dim']}, "
        f"{len(result['config']['layers'])} layers",
        f"  T-Block {cfg['t_block']}, Psi {cfg['psi']}, Phi {cfg['phi']}, {cfg['pool_blocks']} AdaPooling blocks"
        + (f", off: {', '.join(switches)}" if switches else ""),
        f"  {result['convention']}",
        "",
        f"  {'part':<46}{flop_unit:>10}{param_unit:>12}",
    ]
    part_params = {"clip": params["clip_visual_frozen"], "temporal_encoder": params["temporal_encoder"],
                   "integration_branch": params["integration_branch"], "head": params["head"]}
    for part in PARTS:
        lines.append(row(PART_LABELS[part], result["gflops_by_part"][part], part_params[part]))
    lines += [
        row("total (what this pipeline runs)", result["gflops"], params["total"]),
        row("  of which trainable (DiST)", None, params["dist_trainable"]),
        row("+ patch embed of the non-CLIP dense frames", result["gflops_dense_patch_embed"]),
        row("total, paper convention", result["gflops_paper_convention"]),
    ]
    if result.get("paper_gflops") is not None:
        lines.append(row(f"paper, {result['paper_setting']}", result["paper_gflops"],
                         suffix=f"   ({100 * result['paper_rel_diff']:+.1f}% paper convention vs paper)"))
    lines.append(f"  CLIP visual: {result['clip_gflops_per_frame'] * flop_scale:.2f} {flop_unit} per frame")
    pca = result.get("pca")
    if pca:
        lines += ["", f"  cached branch per view (DiST + head, no CLIP) on a compact store's PCA codes (K {pca['k']}):",
                  row("on tokens (fp16 / int8 store)", pca["branch_gflops_tokens"]),
                  row(f"on codes, projection folded (-{100 * pca['saved_per_view']:.1f}%)",
                      pca["branch_gflops_codes"]),
                  row("+ the fold (W B^T, W mu + b), once per step", pca["fold_gflops_per_step"])]
    return "\n".join(lines)
