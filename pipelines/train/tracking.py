"""A run's record of its progress: metrics.jsonl always (with the PNG curves, the offline record), and, when asked
(`--report-to`), TensorBoard event files in RUN/tensorboard and a Weights & Biases run (WANDB_MODE=offline works).

Scalars, the same in every backend: train/loss, train/lr, train/clips_per_s (every --log-every steps, by step),
train/epoch_loss and val/top1, val/top5, val/mean_class_accuracy (every epoch, at the epoch's last step).
A resumed run drops what the killed run logged after its last checkpoint (those steps are redone).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_cache.errors import UserError, first_line
from pipelines.files import replace_atomically, write_failure
from pipelines.train.plots import read_metrics

REPORTERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb-run-id"
# metrics.jsonl key -> the scalar's name in TensorBoard and W&B.
SCALARS = {"loss": "train/loss", "lr": "train/lr", "clips_per_s": "train/clips_per_s",
           "train_loss": "train/epoch_loss", "val_top1": "val/top1", "val_top5": "val/top5",
           "val_mean_class_accuracy": "val/mean_class_accuracy"}


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step (kind "train") and per epoch (kind "epoch")."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        try:
            if resume_step is None:
                path.write_text("")
            else:
                # Drop what the killed run logged after its last checkpoint: those steps are redone.
                kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
                replace_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))
        except OSError as err:
            raise write_failure(path, err) from None

    def write(self, record: dict[str, Any]) -> None:
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as err:
            raise write_failure(self.path, err) from None


class Tracker:
    """Every backend of one run, fed the records metrics.jsonl gets."""

    def __init__(self, out: Path, report_to: Sequence[str], *, resume_step: int | None, config: dict[str, Any]):
        self.log = MetricsLog(out / "metrics.jsonl", resume_step)
        self._tensorboard = _tensorboard(out, resume_step) if "tensorboard" in report_to else None
        self._wandb = _wandb(out, config) if "wandb" in report_to else None

    def write(self, record: dict[str, Any]) -> None:
        self.log.write(record)
        scalars = {SCALARS[k]: float(v) for k, v in record.items() if k in SCALARS and v is not None}
        if self._tensorboard is not None:
            for name, value in scalars.items():
                self._tensorboard.add_scalar(name, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _tensorboard(out: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise UserError(f"--report-to tensorboard needs the tensorboard package ({first_line(err)}): "
                        "pip install 'dist-cache[tensorboard]'") from None
    # purge_step: TensorBoard hides the killed run's events from the resumed step on.
    return SummaryWriter(str(out / "tensorboard"), purge_step=None if resume_step is None else resume_step + 1)


def _wandb(out: Path, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError as err:
        raise UserError(f"--report-to wandb needs the wandb package ({first_line(err)}): "
                        "pip install 'dist-cache[wandb]'") from None
    # One W&B run per run directory: --resume continues it under the id its first start chose.
    id_file = out / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    try:
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "dist-cache"), dir=str(out), id=run_id,
                          resume="allow", name=out.name,
                          config=config)
    except Exception as err:  # wandb's own errors (no API key online, a server that cannot be reached)
        raise UserError(f"--report-to wandb: {first_line(err, 160)}; run `wandb login`, or set WANDB_MODE=offline "
                        "and sync later") from None
