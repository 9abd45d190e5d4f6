"""Choosing the torch device every command runs on, from the `--device` flag."""

from __future__ import annotations

import torch

from dist_cache.errors import UserError


def resolve_device(device: str) -> torch.device:
    """`auto` is the GPU when there is one; asking for CUDA on a machine without it is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
