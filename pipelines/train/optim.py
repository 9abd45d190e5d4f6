"""The optimiser of stage two, as the reference sets it up (without its release bugs): AdamW (0.9, 0.999, 1e-8) over
every branch parameter, biases included; weight decay on weight matrices only; linear warmup then a per-iteration
cosine to 0; loss scaling for fp16 autocast only."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

BETAS, EPS = (0.9, 0.999), 1e-8


def _decays(module: nn.Module, name: str, param: nn.Parameter) -> bool:
    """Weight decay on the matrices that multiply inputs; none on biases, norms, tokens and positional embeddings.

    Free parameters (not owned by a Linear/Conv/attention layer) are learned tokens, except a 2-D output
    projection (the head's `proj`), which the reference decays like any weight.
    """
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return name == "weight"
    if isinstance(module, nn.MultiheadAttention):
        return name.endswith("proj_weight")
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return False
    return param.ndim == 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                (decay if _decays(module, name, param) else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, peak: float, total: int, warmup: int, start: float) -> float:
    """Learning rate of update `step` (0-based): the reference's per-iteration cosine from `peak` to 0
    over all steps, preceded by a linear ramp from `start` to the cosine's value at the end of warmup."""

    def cosine(s: int) -> float:
        return peak * 0.5 * (1.0 + math.cos(math.pi * s / total))

    if step < warmup:
        return start + (cosine(warmup) - start) * step / warmup
    return cosine(step)


def make_optimizer(branch: nn.Module, *, lr: float, weight_decay: float, total: int, warmup: int,
                   warmup_start_lr: float) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(param_groups(branch, weight_decay), lr=lr, betas=BETAS, eps=EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, peak=lr, total=total, warmup=warmup, start=warmup_start_lr) / lr)
    return optimizer, scheduler


def loss_scaling(amp: torch.dtype | None) -> bool:
    """Loss scaling for fp16 autocast only: bf16 has fp32's range, and fp32 needs none."""
    return amp == torch.float16


def make_scaler(amp: torch.dtype | None) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=loss_scaling(amp))


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a checkpoint's loss-scaler state. A run saved without loss scaling (CPU, bf16) holds an empty
    state, which an enabled scaler (fp16 on a GPU without bf16) refuses: it starts fresh then."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)
