"""Stage two: training the DiST branch from a store, and evaluating it.

- `run.py`: `TrainOptions`, `preflight` (every check before anything is written), `train`, `train_ranks`.
- `step.py`: one guarded optimiser step; `optim.py`: the reference's AdamW and schedule.
- `branch.py`: the network (cached or online) and how a batch reaches it; `checks.py`: the store, layer, frame and
  backbone checks training and evaluation share; `decoder_check.py`: `--decoder` against the store's decoder.
- `evaluation.py`: `EvalOptions`, `evaluate`, and the validation pass of training.
- `checkpoint.py`, `selection.py` (which store best.pt was chosen on), `runlock.py`, `runlog.py` (RUN/train.log),
  `tracking.py` (metrics.jsonl, TensorBoard, W&B), `plots.py`.
- `distributed.py` (DDP, the launcher), `preemption.py` (SIGTERM/SIGUSR1: stop after a step, last.pt written).
- `data/`: the loader (`loader.py`), dense frames stored or decoded (`dense_frames.py`), re-augmented views
  (`reaugment.py`).
"""

from __future__ import annotations

import importlib
from typing import Any

# What the CLI uses, imported on first use: every command imports `preemption` (its error handler), which must not
# load torch for `dist-cache info`.
_EXPORTS = {
    "TrainOptions": "run", "preflight": "run", "train": "run", "train_ranks": "run",
    "EvalOptions": "evaluation", "evaluate": "evaluation", "format_report": "evaluation",
    "online_jpeg_warning": "checks", "quiet_unless_main": "distributed",
    "RunLog": "runlog", "run_heading": "runlog",
    "PREEMPTED_EXIT": "preemption", "Preempted": "preemption",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
