"""One training step, guarded, and the meter of its losses and throughput.

The step keeps the logits and the loss in fp32 whatever the autocast dtype (`DiST.logits` runs outside autocast;
the loss is computed from fp32 logits), and scales the loss only for fp16 autocast (`optim.make_scaler`).

Nothing silently wrong: after the backward pass and before the optimiser moves anything, the step reads back
(one device sync, one collective across ranks) the global batch's loss and whether any sample's loss, or the
gradient's norm, is not finite. If one is, every rank stops with the same one-line error naming the samples, and
no weight is updated and no checkpoint written: a NaN loss never becomes checkpointed NaN weights. (Under fp16
loss scaling, an infinite gradient is the scaler's business, which skips that update; the loss is still checked.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_cache.errors import UserError
from dist_cache.mixing import Mixer
from pipelines.train.branch import Network, embed
from pipelines.train.data.loader import Batch
from pipelines.train.distributed import Ranks, all_gather_objects, all_sum
from storage import FeatureStore

NAMED_SAMPLES = 5  # samples a non-finite error names (and counts the rest)


class NonFiniteLoss(UserError):
    """A training step produced a non-finite loss or gradient; nothing was updated."""


@dataclass
class StepModel:
    """What a training step runs: the (possibly DDP-wrapped) network, its trainable branch and optimiser."""

    net: Network  # the network itself (logits)
    model: nn.Module  # what runs the forward pass: `net`, or DDP around it
    branch: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    text: torch.Tensor  # (K, E) class embeddings on the device
    mean: Sequence[float]
    std: Sequence[float]
    amp: torch.dtype | None  # the autocast dtype (None: fp32)
    label_smoothing: float
    clip_grad: float
    mixer: Mixer | None = None  # mixup/cutmix of each batch, drawn from (seed, step)


def train_step(m: StepModel, batch: Batch, ranks: Ranks, store: FeatureStore, step: int) -> float:
    """One optimiser step on `batch` (this rank's share of the global batch); returns the global batch's mean loss.

    Raises NonFiniteLoss, before the update, when a loss or the gradient is not finite on any rank."""
    device = batch.label.device
    mix = None if m.mixer is None else m.mixer.draw(step)
    with torch.autocast(device.type, dtype=m.amp, enabled=m.amp is not None):
        embeddings = embed(m.model, batch, m.mean, m.std, mix)
    logits = m.net.logits(embeddings, m.text).float()  # fp32 (see DiST.logits)
    if mix is None:
        losses = F.cross_entropy(logits, batch.label, label_smoothing=m.label_smoothing, reduction="none")
    else:  # the smoothing is folded into the mixed targets, as timm's Mixup does
        targets = mix.targets(batch.label, logits.shape[1], m.label_smoothing)
        losses = F.cross_entropy(logits, targets, reduction="none")
    loss = losses.mean()
    m.optimizer.zero_grad(set_to_none=True)
    m.scaler.scale(loss).backward()
    norm = None
    if m.clip_grad > 0:
        m.scaler.unscale_(m.optimizer)
        norm = nn.utils.clip_grad_norm_(m.branch.parameters(), m.clip_grad)
    bad_samples = ~torch.isfinite(losses.detach())
    # An fp16 scaler's infinite gradient is an overflow it handles (it skips this update and lowers the scale).
    bad_grad = (torch.zeros((), device=device) if norm is None or m.scaler.is_enabled()
                else (~torch.isfinite(norm)).float())
    stats = all_sum(torch.stack([loss.detach().float().nan_to_num(0.0, 0.0, 0.0), bad_samples.sum().float(),
                                 bad_grad]), ranks)
    loss_sum, samples_bad, grads_bad = stats.tolist()  # the step's one sync
    if samples_bad or grads_bad:
        mine = batch.index[bad_samples.cpu().numpy()] if samples_bad else batch.index
        named = [int(i) for part in all_gather_objects(mine.tolist(), ranks) for i in part]
        raise NonFiniteLoss(_non_finite_message(step, named, store, bool(samples_bad)))
    m.scaler.step(m.optimizer)
    m.scaler.update()
    m.scheduler.step()
    return loss_sum / ranks.world


def _non_finite_message(step: int, samples: list[int], store: FeatureStore, in_loss: bool) -> str:
    def name(i: int) -> str:
        sample = store.sample(i)
        return f"{i} (video {sample['video_index']} {sample['video']}, view {sample['view']})"

    what = "the loss is not finite" if in_loss else "the loss is finite but its gradient is not"
    shown = ", ".join(name(i) for i in samples[:NAMED_SAMPLES])
    more = f" and {len(samples) - NAMED_SAMPLES} more" if len(samples) > NAMED_SAMPLES else ""
    whose = "for samples" if in_loss else "on the batch of samples"
    return (f"step {step + 1}: {what} {whose} {shown}{more} of {store.url}; nothing was updated or saved "
            f"(last.pt holds the last good state): lower --lr, or check those samples with dist-cache verify")


@dataclass
class Meter:
    """Losses and throughput: a window between two logs, and the epoch's running sum (saved in checkpoints, so a
    resumed epoch's mean counts the steps before the kill)."""

    epoch_sum: float = 0.0
    epoch_steps: int = 0
    _window: list[float] = field(default_factory=lambda: [0.0, 0, 0, 0.0])  # loss sum, steps, clips, seconds

    def add(self, loss: float, clips: int, seconds: float) -> None:
        self.epoch_sum += loss
        self.epoch_steps += 1
        w = self._window
        w[0] += loss
        w[1] += 1
        w[2] += clips
        w[3] += seconds

    def take_window(self) -> dict[str, Any]:
        """Mean loss and clips/s (data wait included) since the last call."""
        loss, steps, clips, seconds = self._window
        self._window = [0.0, 0, 0, 0.0]
        return {"loss": loss / max(steps, 1), "clips_per_s": clips / max(seconds, 1e-9)}

    def end_epoch(self) -> float:
        mean = self.epoch_sum / max(self.epoch_steps, 1)
        self.epoch_sum, self.epoch_steps = 0.0, 0
        return mean

    def state(self) -> list[float]:
        return [self.epoch_sum, self.epoch_steps]
