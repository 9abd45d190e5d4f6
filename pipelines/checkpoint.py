"""Training checkpoints: the trainable DiST weights and the state to resume, never the frozen CLIP.

A checkpoint is a plain dict of tensors and JSON-like values, so it loads with
`torch.load(weights_only=True)` (no pickled code runs). It names the store it was trained on
(fingerprint, backbone record, class names), so evaluation and resumption can refuse a store made
with another backbone before computing anything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dist_cache.errors import UserError, first_line
from pipelines.files import replace_atomically

FORMAT = "dist-cache-checkpoint"
VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write atomically: a kill -9 mid-write leaves the previous file whole, never a torn one."""
    return replace_atomically(path, lambda tmp: torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp),
                              fsync=True)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with no code execution."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file; pass a best.pt or last.pt written by dist-cache train")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or corrupt files
        first = first_line(err, 160)
        raise UserError(f"checkpoint {path}: cannot be read ({first})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not a dist-cache checkpoint; pass a file written by dist-cache train")
    if data.get("version") != VERSION:
        raise UserError(f"checkpoint {path}: version {data.get('version')} is not supported (this dist-cache reads {VERSION})")
    return data
