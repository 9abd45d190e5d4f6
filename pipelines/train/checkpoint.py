"""Training checkpoints: the trainable DiST weights and the state to resume, never the frozen CLIP.

A checkpoint is a plain dict of tensors and JSON-like values, so it loads with
`torch.load(weights_only=True)` (no pickled code runs). It names the store it was trained on
(fingerprint, backbone record, class names), so evaluation and resumption can refuse a store made
with another backbone before computing anything. A checkpoint may come from someone else: its structure,
its DiST config and the shapes of its weights are checked, as one-line errors, before anything is built.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

from dist_cache.errors import UserError
from dist_cache.model import ConfigError, DiSTConfig
from dist_cache.model.dist import check_branch_state
from dist_cache.weights import TorchFileError, load_torch_file
from pipelines.files import replace_atomically, write_failure

FORMAT = "dist-cache-checkpoint"
# 2: the DiST config holds its switches under "switches" (dist-cache 0.2); 1 (0.1) had them flat. Both load.
VERSION = 2
READABLE_VERSIONS = (1, 2)
# What every checkpoint holds, with the type each reader relies on.
FIELDS: dict[str, type | tuple[type, ...]] = {
    "model": dict, "optimizer": dict, "scheduler": dict, "scaler": dict, "step": int, "epoch": int,
    "steps_per_epoch": int, "best_top1": (float, type(None)), "epoch_loss": list, "dist_config": dict,
    "train_config": dict, "store": dict,
}
STORE_FIELDS: dict[str, type] = {"fingerprint": str, "backbone": dict, "class_names": list}


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write atomically: a kill -9 mid-write leaves the previous file whole, never a torn one.

    Serialised in memory first, then written by Python's file I/O: torch.save writing to a full disk raises
    a RuntimeError that has lost the OS error ("basic_ios::clear"), where a plain write keeps it, for a
    one-line `write_failure` (the branch's weights and optimiser state are a few hundred MB at most)."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    try:
        return replace_atomically(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()), fsync=True)
    except OSError as err:
        raise write_failure(path, err) from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, with no code execution, and check what it holds."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path}: no such file; pass a best.pt or last.pt written by dist-cache train")
    try:
        data = load_torch_file(path)
    except TorchFileError as err:
        what = (f"it holds pickled Python objects ({err.pickled}), which dist-cache never unpickles" if err.pickled
                else f"torch cannot read it: {err.reason}")
        raise UserError(f"checkpoint {path}: not a dist-cache checkpoint ({what}); pass a best.pt or last.pt written "
                        "by dist-cache train") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"checkpoint {path}: not a dist-cache checkpoint; pass a file written by dist-cache train")
    if data.get("version") not in READABLE_VERSIONS:
        raise UserError(f"checkpoint {path}: version {str(data.get('version'))[:20]} is not supported "
                        f"(this dist-cache reads {', '.join(map(str, READABLE_VERSIONS))})")
    _check_fields(data, FIELDS, f"checkpoint {path}")
    _check_fields(data["store"], STORE_FIELDS, f"checkpoint {path}: store")
    try:
        config = DiSTConfig.from_dict(data["dist_config"])
    except ConfigError as err:
        raise UserError(f"checkpoint {path}: {err}") from None
    check_branch_state(config, data["model"], f"checkpoint {path}")
    return data


def _check_fields(data: dict[str, Any], fields: dict[str, Any], what: str) -> None:
    for key, kind in fields.items():
        if key not in data:
            raise UserError(f"{what} lacks {key!r}; the file is damaged or was not written by dist-cache train")
        value = data[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{what}: {key!r} is a {type(value).__name__}; the file is damaged")
