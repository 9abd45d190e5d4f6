"""PNG figures of a run: training curves from metrics.jsonl, and an evaluation's confusion matrix.

matplotlib runs on the Agg backend, so plotting works on headless training machines.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from dist_cache.errors import UserError  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a run's metrics.jsonl. A run killed mid-write leaves a torn last line: it is dropped
    (that step is redone on resume); a bad line before the last one means the file was damaged otherwise."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "step" not in record:
            if number == len(lines):
                break
            raise UserError(f"{path} line {number} is not a metrics record; repair or delete that line")
        records.append(record)
    return records


def plot_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Loss and learning rate against step, and validation accuracy against epoch (when there is any)."""
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    val = [r for r in records if r.get("kind") == "epoch" and "val_top1" in r]
    fig, axes = plt.subplots(1, 3 if val else 2, figsize=(15 if val else 10, 4), constrained_layout=True)
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train])
    axes[0].set(xlabel="step", ylabel="training loss", title="loss")
    axes[1].plot(steps, [r["lr"] for r in train])
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    if val:
        epochs = [r["epoch"] for r in val]
        axes[2].plot(epochs, [100 * r["val_top1"] for r in val], marker="o", label="top-1")
        axes[2].plot(epochs, [100 * r["val_top5"] for r in val], marker="o", label="top-5")
        axes[2].set(xlabel="epoch", ylabel="accuracy (%)", title="validation")
        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], out_png: str | Path) -> Path:
    """Row-normalised confusion matrix (rows: true class). Names are printed only while they stay legible."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
    k = len(class_names)
    side = min(20.0, 3 + 0.35 * k)
    fig, ax = plt.subplots(figsize=(side, side), constrained_layout=True)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= 50:
        ax.set_xticks(range(k), class_names, rotation=90)
        ax.set_yticks(range(k), class_names)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix")
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
