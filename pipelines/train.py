"""Stage two: train the DiST branch on cached CLIP features (or, with `online`, on CLIP run live).

The recipe is the reference's (dist-reference.md §4-5) without its release bugs: AdamW (0.9, 0.999, 1e-8)
over every branch parameter, biases included; weight decay on weight matrices only; linear warmup then a
per-iteration cosine to 0; label smoothing 0.1. Mixed precision is used on CUDA only.

Everything that decides a step's result is a function of (seed, step): the initial weights, the epoch's
view choice and order (see `pipelines.data.EpochSampler`), and the state in the checkpoint. So `resume`
after a kill continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from dist_cache.devices import resolve_device
from dist_cache.errors import UserError
from dist_cache.model import DiSTConfig, DiSTSwitches
from pipelines.branch import amp_dtype, autocast, branch_of, build_network, embed
from pipelines.checkpoint import load_checkpoint, save_checkpoint
from pipelines.checks import (
    check_backbone, check_store_fits, check_video_root, open_store, select_layers, usable_samples,
)
from pipelines.data import EpochSampler, StoreClips, make_loader
from pipelines.evaluate import eval_loader, score_videos, summarize
from pipelines.files import replace_atomically
from pipelines.plots import plot_curves, read_metrics
from pipelines.train_ddp import Ranks, global_means, joined

BETAS, EPS = (0.9, 0.999), 1e-8

# Options a resumed run may change: where things are and how fast they run, never what is computed.
RUNTIME_OPTIONS = frozenset({
    "cache", "video_root", "out", "val_cache", "val_video_root", "resume", "pretrained", "workers",
    "device", "save_every", "log_every", "eval_every", "eval_batch_size", "storage_options",
})


@dataclass
class TrainOptions:
    cache: str
    video_root: str
    out: str
    val_cache: str | None = None
    val_video_root: str | None = None  # defaults to video_root
    resume: bool = False
    online: bool = False  # run the frozen CLIP live instead of reading cached features
    pretrained: str | None = None  # local copy of the store's backbone weights (online only)
    # model (DiSTConfig; shapes come from the store's backbone)
    layers: str = "all"  # all (the store's), last:N, or a comma list of CLIP block indices
    switches: DiSTSwitches = field(default_factory=DiSTSwitches)
    recipe: str | None = None  # the preset `switches` started from (dist_cache.recipes), recorded with the run
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3.2e-4  # peak: the reference's BASE_LR 3.2e-5 x NEW_NET_LRMULT 10
    warmup_epochs: float = 5.0  # the reference's 6 of 36 epochs, scaled to 30
    warmup_start_lr: float = 8e-7  # WARMUP_START_LR 8e-8 x 10
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip_grad: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    # runtime
    workers: int = 4
    device: str = "auto"
    save_every: int = 500  # steps between last.pt writes (also written at every epoch end)
    log_every: int = 10
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    eval_batch_size: int | None = None
    storage_options: dict = field(default_factory=dict)

    def recorded(self) -> dict[str, Any]:
        """The options as stored in checkpoints: storage_options may hold credentials, so never."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "storage_options"}


@dataclass
class TrainResult:
    out: Path
    steps: int
    epochs: int
    last: Path
    best: Path
    best_top1: float | None
    metrics: Path
    plot: Path
    skipped_failed_samples: int
    final_loss: float | None


def check_options(opts: TrainOptions) -> None:
    if opts.epochs < 1 or opts.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if opts.lr <= 0 or opts.weight_decay < 0 or opts.clip_grad < 0 or opts.warmup_epochs < 0:
        raise UserError("--lr must be positive; --weight-decay, --clip-grad and --warmup-epochs must not be negative")
    if not 0 <= opts.label_smoothing < 1:
        raise UserError(f"--label-smoothing {opts.label_smoothing}: must lie in [0, 1)")
    if opts.save_every < 1 or opts.log_every < 1 or opts.eval_every < 1:
        raise UserError("--save-every, --log-every and --eval-every must be at least 1")
    if not Path(opts.video_root).is_dir():
        raise UserError(f"--video-root {opts.video_root}: no such directory")


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


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step (kind "train") and per epoch (kind "epoch")."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.write_text("")
        else:
            # Drop what the killed run logged after its last checkpoint: those steps are redone.
            kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
            replace_atomically(path, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in kept)))

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def restore_scaler(scaler: torch.amp.GradScaler, state: dict[str, Any]) -> None:
    """Load a checkpoint's loss-scaler state. A run saved without loss scaling (CPU, bf16) holds an empty
    state, which an enabled scaler (fp16 on a GPU without bf16) refuses: it starts fresh then."""
    if state and scaler.is_enabled():
        scaler.load_state_dict(state)


def _check_resume(ckpt: dict[str, Any], opts: TrainOptions, store_fingerprint: str, cache: str) -> None:
    if ckpt["store"]["fingerprint"] != store_fingerprint:
        raise UserError(
            f"--cache {cache} is not the store this run was trained on (fingerprint {store_fingerprint[:12]}, "
            f"the checkpoint's {ckpt['store']['fingerprint'][:12]}); resume with the same --cache"
        )
    recorded, now = _comparable(ckpt["train_config"]), _comparable(opts.recorded())
    for key in sorted(now):
        if key not in RUNTIME_OPTIONS and recorded.get(key) != now[key]:
            raise UserError(
                f"--resume: this run was started with {key}={recorded.get(key)!r}, not {now[key]!r}; "
                "resume with the original flags, or start a new --out"
            )


def _comparable(train_config: dict[str, Any]) -> dict[str, Any]:
    """A recorded train_config with its switches beside the other options, one key each, so a resume names the
    one that differs. dist-cache 0.1 recorded them that way already, without the library-only switches and the
    recipe: those were the defaults."""
    flat = {**DiSTSwitches().to_dict(), "recipe": None}
    flat.update({k: v for k, v in train_config.items() if k != "switches"})
    flat.update(train_config.get("switches", {}))
    return flat


def train(opts: TrainOptions, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in `opts.out`: last.pt, best.pt, metrics.jsonl and curves.png.
    Under a launcher (see `pipelines.train_ddp`) this process is one rank of a data-parallel run."""
    check_options(opts)  # before joining: a bad flag fails every rank alike, without a process group
    with joined(resolve_device(opts.device)) as ranks:
        return _train(opts, progress and ranks.main, ranks)


@dataclass
class _Checked:
    """What `preflight` opened and checked, for the run to use."""
    store: Any
    usable: Any
    failed: int
    layers: list[int]
    config: Any
    frames: bool
    val_store: Any
    val_usable: Any
    ckpt: dict[str, Any] | None


def preflight(opts: TrainOptions, world: int = 1) -> _Checked:
    """Every check before the first step, each failing as a one-line UserError. `launch` runs it in the
    parent before it spawns the ranks, and every rank runs it again (cheap: no features are read)."""
    check_options(opts)
    out = Path(opts.out)
    last_path = out / "last.pt"
    if opts.resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} does not exist; drop --resume to start this run")
    if not opts.resume and last_path.exists():
        raise UserError(f"--out {out} already holds a run ({last_path.name}); pass --resume to continue it, or another --out")
    if opts.batch_size % world:
        raise UserError(f"--batch-size {opts.batch_size}: must be a multiple of the {world} processes")

    store = open_store(opts.cache, "--cache", opts.storage_options)
    usable, failed = usable_samples(store, "--cache")
    if not len(usable):
        raise UserError(f"--cache {store.url}: no sample has features (all {failed} failed at extraction)")
    layers = select_layers(opts.layers, store, opts.online)
    config = DiSTConfig.from_backbone(store.schema.backbone, store.schema.num_frames, layers, switches=opts.switches)
    check_store_fits(store, config, "--cache", online=opts.online)
    frames = opts.online or config.switches.temporal
    if frames:
        check_video_root(store, usable, opts.video_root, "--video-root")
    val_store = val_usable = None
    if opts.val_cache:
        val_store = open_store(opts.val_cache, "--val-cache", opts.storage_options)
        check_backbone(val_store, store.schema.backbone, "--val-cache", f"--cache {store.url}")
        check_store_fits(val_store, config, "--val-cache", online=opts.online)
        val_usable, _ = usable_samples(val_store, "--val-cache")
        if frames:
            check_video_root(val_store, val_usable, opts.val_video_root or opts.video_root, "--val-video-root")
    ckpt = load_checkpoint(last_path) if opts.resume else None
    if ckpt is not None:
        _check_resume(ckpt, opts, store.fingerprint, opts.cache)
    return _Checked(store, usable, failed, layers, config, frames, val_store, val_usable, ckpt)


def _train(opts: TrainOptions, progress: bool, ranks: Ranks) -> TrainResult:
    out = Path(opts.out)
    last_path, best_path, metrics_path = out / "last.pt", out / "best.pt", out / "metrics.jsonl"
    device = ranks.device
    checked = preflight(opts, ranks.world)
    store, usable, failed, layers, config = checked.store, checked.usable, checked.failed, checked.layers, checked.config
    frames, val_store, val_usable, ckpt = checked.frames, checked.val_store, checked.val_usable, checked.ckpt

    # Rank r's batch b is every world-th sample of the global batch b, so the ranks' batches partition it.
    sampler = EpochSampler(usable, store.schema.views_per_video, opts.batch_size // ranks.world, seed=opts.seed, train=True,
                           rank=ranks.rank, world_size=ranks.world)
    steps_per_epoch = sampler.batches_per_epoch
    if steps_per_epoch == 0:
        raise UserError(f"--cache {store.url}: no sample has features (all {failed} failed at extraction)")
    total = opts.epochs * steps_per_epoch
    warmup = round(opts.warmup_epochs * steps_per_epoch)

    net = build_network(
        config, online=opts.online, backbone_record=store.schema.backbone, pretrained=opts.pretrained, device=device, seed=opts.seed
    )
    branch = branch_of(net)
    optimizer = torch.optim.AdamW(param_groups(branch, opts.weight_decay), lr=opts.lr, betas=BETAS, eps=EPS)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_at(s, peak=opts.lr, total=total, warmup=warmup, start=opts.warmup_start_lr) / opts.lr
    )
    # fp16 autocast needs loss scaling; bf16 (and fp32 on the CPU) does not.
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
    step, best_top1, epoch_loss = 0, None, [0.0, 0]
    if ckpt is not None:
        branch.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_scaler(scaler, ckpt["scaler"])
        step, best_top1, epoch_loss = ckpt["step"], ckpt["best_top1"], list(ckpt["epoch_loss"])

    text = torch.as_tensor(store.text_features, device=device)
    dataset = StoreClips(store, opts.video_root, config.switches.gamma, None if opts.online else layers, frames=frames)
    loader = make_loader(dataset, sampler, workers=opts.workers, device=device)
    if val_store is not None and ranks.main:
        val_loader = eval_loader(net, val_store, val_usable, video_root=opts.val_video_root or opts.video_root,
                                 batch_size=opts.eval_batch_size or opts.batch_size, workers=opts.workers, device=device)
        val_text = torch.as_tensor(val_store.text_features, device=device)
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(metrics_path, step if ckpt is not None else None)
    # DDP averages the ranks' gradients (each the mean over its equal share of the global batch), which
    # is the gradient of the global batch's mean loss: the update one process would make.
    model = net if ranks.world == 1 else nn.parallel.DistributedDataParallel(net)

    def payload() -> dict[str, Any]:
        return {
            "model": branch.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "epoch": step // steps_per_epoch,
            "steps_per_epoch": steps_per_epoch, "best_top1": best_top1, "epoch_loss": list(epoch_loss),
            "dist_config": config.to_dict(), "train_config": opts.recorded(),
            "store": {"fingerprint": store.fingerprint, "url": store.url, "backbone": store.schema.backbone,
                      "class_names": list(store.schema.class_names)},
        }

    net.train()
    window_loss, window_steps, window_clips, window_time, last_loss = 0.0, 0, 0, 0.0, None
    # Per-step losses stay on the device until a log, a save or an epoch end needs them: reading one
    # (.item(), or the all-reduce across ranks) waits for the GPU, which every step would otherwise do.
    pending: list[torch.Tensor] = []

    def settle() -> None:
        """Fold the pending steps' global-batch losses into the running sums, step by step as they ran.
        A collective: every rank calls it at the same steps."""
        nonlocal window_loss, window_steps, last_loss
        for value in global_means(pending, ranks):
            last_loss = value
            epoch_loss[0] += value
            epoch_loss[1] += 1
            window_loss += value
            window_steps += 1
        pending.clear()
    bar = tqdm(total=total, initial=step, unit="step", desc="train", disable=not progress, dynamic_ncols=True)
    try:
        while step < total:
            epoch, consumed = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, consumed)
            tick = time.monotonic()  # clips/s measures training steps (data wait included), not validation
            for batch in loader:
                lr = optimizer.param_groups[0]["lr"]
                with autocast(device):
                    logits = net.logits(embed(model, batch, device, dataset.mean, dataset.std), text)
                loss = F.cross_entropy(logits.float(), batch["label"].to(device), label_smoothing=opts.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if opts.clip_grad > 0:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(branch.parameters(), opts.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                pending.append(loss.detach())
                logs = step % opts.log_every == 0 or step == total
                # An epoch's last step is saved below, after its validation.
                saves = step % opts.save_every == 0 and step % steps_per_epoch
                if logs or saves:
                    settle()  # before the clock is read, so clips/s counts the GPU's time
                window_clips += len(batch["label"]) * ranks.world
                window_time += time.monotonic() - tick
                tick = time.monotonic()
                bar.update(1)
                if ranks.main and logs:
                    clips_per_s = window_clips / max(window_time, 1e-9)
                    record = {"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                              "loss": window_loss / window_steps, "lr": lr, "clips_per_s": clips_per_s}
                    log.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", clips_s=f"{clips_per_s:.1f}")
                    window_loss, window_steps, window_clips, window_time = 0.0, 0, 0, 0.0
                if ranks.main and saves:
                    save_checkpoint(last_path, payload())

            # ---- epoch end: validate, then best.pt, then last.pt (so a resumed run never skips a validation) ----
            settle()
            epoch += 1
            if not ranks.main:
                epoch_loss = [0.0, 0]
                continue
            record = {"kind": "epoch", "epoch": epoch, "step": step, "train_loss": epoch_loss[0] / max(epoch_loss[1], 1)}
            epoch_loss = [0.0, 0]
            if val_store is not None and (epoch % opts.eval_every == 0 or epoch == opts.epochs):
                scores, views = score_videos(net, val_loader, val_text, val_store.schema.num_videos, device=device, progress=False)
                val = summarize(scores, views, val_store.labels, list(val_store.schema.class_names))
                record.update(val_top1=val["top1"], val_top5=val["top5"], val_mean_class_accuracy=val["mean_class_accuracy"])
                if best_top1 is None or val["top1"] > best_top1:
                    best_top1 = val["top1"]
                    save_checkpoint(best_path, payload())
            elif val_store is None:
                save_checkpoint(best_path, payload())
            log.write(record)
            save_checkpoint(last_path, payload())
    finally:
        bar.close()
    plot = plot_curves(metrics_path, out / "curves.png") if ranks.main else out / "curves.png"
    return TrainResult(
        out=out, steps=step, epochs=step // steps_per_epoch, last=last_path, best=best_path, best_top1=best_top1,
        metrics=metrics_path, plot=plot, skipped_failed_samples=failed, final_loss=last_loss,
    )
