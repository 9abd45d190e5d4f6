"""Stage two: train the DiST branch on cached CLIP features (or, with `online`, on CLIP run live).

A run is four named steps: `preflight` (every check, before anything is written), `setup` (network, optimiser,
loaders, the run's record), `train_step` (step.py: one guarded optimiser step) and `end_of_epoch`
(validation, best.pt, last.pt). The optimiser is the reference's (optim.py); mixed precision on CUDA
only, with the logits and the loss in fp32.

Everything that decides a step's result is a function of (seed, step): the initial weights, the epoch's
view choice and order (see `pipelines.train.data.loader.EpochSampler`), and the state in the checkpoint. So `resume`
after a kill continues with exactly the batches an uninterrupted run would have seen. One process at a time
trains in a run directory (runlock.py). SIGTERM or SIGUSR1 stops the run after the step in progress,
with last.pt written (preemption.py); at an epoch's end, that epoch's validation is left to the resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dist_cache.backbone import recorded_weights_source
from dist_cache.devices import resolve_device
from dist_cache.errors import UserError
from dist_cache.mixing import Mixer
from dist_cache.model import DiSTConfig, DiSTSwitches
from dist_cache.recipes import REFERENCE_MIXING, check_training_store
from pipelines.files import check_run_dir
from pipelines.train.branch import amp_dtype, branch_of, build_network, online_precision
from pipelines.train.checkpoint import load_checkpoint, save_checkpoint
from pipelines.train.checks import (
    check_backbone,
    check_evaluation_store,
    check_frames,
    check_store_fits,
    open_store,
    select_layers,
    usable_samples,
)
from pipelines.train.data.loader import BatchLoader, EpochSampler, frame_source
from pipelines.train.data.reaugment import ReaugmentedFrames, check_reaugmentable
from pipelines.train.distributed import LAUNCHER_ENV, Ranks, joined, launch
from pipelines.train.evaluation import Validation
from pipelines.train.optim import make_optimizer, make_scaler, restore_scaler
from pipelines.train.plots import plot_curves
from pipelines.train.preemption import StopRequests, preempted, wait_for_all
from pipelines.train.runlock import RunLock
from pipelines.train.runlog import RunLog
from pipelines.train.selection import store_identity
from pipelines.train.step import Meter, StepModel, train_step
from pipelines.train.tracking import REPORTERS, Tracker
from storage import FeatureStore

# Options a resumed run may change: where things are and how fast they run, never what is computed.
RUNTIME_OPTIONS = frozenset({
    "cache", "video_root", "out", "val_cache", "val_video_root", "resume", "pretrained", "workers", "read_threads",
    "decode_workers", "decode_timeout", "device", "save_every", "log_every", "eval_every", "eval_batch_size",
    "storage_options", "report_to", "decoder",
})


@dataclass
class TrainOptions:
    cache: str
    out: str
    video_root: str | None = None  # where the videos are; not needed when the store holds the dense frames
    val_cache: str | None = None
    val_video_root: str | None = None  # defaults to video_root
    resume: bool = False
    online: bool = False  # run the frozen CLIP live instead of reading cached features
    pretrained: str | None = None  # local copy of the store's backbone weights (online only)
    # augmentation (docs/DESIGN.md, "Augmentation and mixing")
    reaugment: bool = False  # online only: a fresh view of every video every epoch, as the reference trains
    mixup: float | None = None  # online: pixel mixup alpha before CLIP; None: 0.8 with reaugment, else 0
    cutmix: float | None = None  # online: pixel cutmix alpha before CLIP; None: 1.0 with reaugment, else 0
    feature_mixup: float = 0.0  # cached: mixup alpha of cached tokens and dense frames
    feature_cutmix: float = 0.0  # cached: cutmix alpha, boxes on the ViT's patch grid
    # model (DiSTConfig; shapes come from the store's backbone)
    layers: str = "all"  # all (the store's), last:N, or a comma list of CLIP block indices
    switches: DiSTSwitches = field(default_factory=DiSTSwitches)
    recipe: str | None = None  # the preset the switches and options started from (dist_cache.recipes), recorded
    # optimisation
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3.2e-4  # peak: the reference's BASE_LR 3.2e-5 x NEW_NET_LRMULT 10
    warmup_epochs: float = 5.0  # the reference's 6 of 36 epochs, scaled to 30
    warmup_start_lr: float = 8e-7  # WARMUP_START_LR 8e-8 x 10
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    clip_grad: float = 1.0  # max global grad norm; 0 disables (the reference does not clip: its recipes set 0)
    seed: int = 0
    # runtime
    read_threads: int = 8  # threads reading the store into the batch buffers (reads release the GIL)
    decode_workers: int | Literal["auto"] = "auto"  # processes decoding dense frames (0: in the reader threads)
    decode_timeout: float = 120.0  # seconds before a video's decode is killed (and the run stops)
    decoder: str | None = None  # decode the dense frames with this decoder, not the store's (decoder_check.py)
    device: str = "auto"
    save_every: int = 500  # steps between last.pt writes (also written at every epoch end)
    log_every: int = 10
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    eval_batch_size: int | None = None
    report_to: tuple[str, ...] = ()  # tensorboard, wandb (metrics.jsonl is always written)
    storage_options: dict = field(default_factory=dict)

    def recorded(self) -> dict[str, Any]:
        """The options as stored in checkpoints: storage_options may hold credentials, so never."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "storage_options"}
        out["report_to"] = list(self.report_to)
        return out


# Each option's default, for checkpoints written before the option existed.
OPTION_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainOptions) if f.default is not dataclasses.MISSING}


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
    frames: str | None  # where the dense frames came from: "stored", "decoded", "reaugmented", or None (none used)


def check_options(opts: TrainOptions) -> None:
    if opts.epochs < 1 or opts.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    if opts.lr <= 0 or opts.weight_decay < 0 or opts.clip_grad < 0 or opts.warmup_epochs < 0:
        raise UserError("--lr must be positive; --weight-decay, --clip-grad and --warmup-epochs must not be negative")
    if not 0 <= opts.label_smoothing < 1:
        raise UserError(f"--label-smoothing {opts.label_smoothing}: must lie in [0, 1)")
    if opts.save_every < 1 or opts.log_every < 1 or opts.eval_every < 1:
        raise UserError("--save-every, --log-every and --eval-every must be at least 1")
    if opts.read_threads < 1 or opts.decode_timeout <= 0:
        raise UserError("--read-threads must be at least 1 and --decode-timeout positive")
    if opts.decode_workers != "auto" and (not isinstance(opts.decode_workers, int) or opts.decode_workers < 0):
        raise UserError(f"--decode-workers {opts.decode_workers!r}: a count (0: decode in the reader threads) or auto")
    for flag, root in (("--video-root", opts.video_root), ("--val-video-root", opts.val_video_root)):
        if root is not None and not Path(root).is_dir():
            raise UserError(f"{flag} {root}: no such directory")
    check_augmentation(opts)
    unknown = [r for r in opts.report_to if r not in REPORTERS]
    if unknown:
        raise UserError(f"--report-to {unknown[0]}: choose from {', '.join(REPORTERS)}")


def check_augmentation(opts: TrainOptions) -> None:
    """Pixel mixing and fresh views need CLIP run live; token mixing needs cached tokens."""
    alphas = {"--mixup": opts.mixup, "--cutmix": opts.cutmix, "--feature-mixup": opts.feature_mixup,
              "--feature-cutmix": opts.feature_cutmix}
    negative = [flag for flag, alpha in alphas.items() if alpha is not None and alpha < 0]
    if negative:
        raise UserError(f"{negative[0]}: an alpha must not be negative (0 disables)")
    if opts.reaugment and not opts.online:
        raise UserError("--reaugment re-draws views for CLIP run live: add --online (and --video-root)")
    pixel = [flag for flag in ("--mixup", "--cutmix") if alphas[flag]]
    if pixel and not opts.online:
        raise UserError(f"{pixel[0]} mixes pixels before CLIP, which a cached run never runs: add --online, or mix "
                        "the cached features with --feature-mixup / --feature-cutmix")
    tokens = [flag for flag in ("--feature-mixup", "--feature-cutmix") if alphas[flag]]
    if tokens and opts.online:
        raise UserError(f"{tokens[0]} mixes cached tokens, which an --online run does not read: use --mixup / "
                        "--cutmix (pixels before CLIP)")


def make_mixer(opts: TrainOptions, store: FeatureStore) -> Mixer | None:
    """The run's mixing: pixels before CLIP online (the reference's alphas by default with --reaugment), cached
    tokens with their frames otherwise (cutmix boxes on the patch grid); None when nothing mixes."""
    backbone = store.schema.backbone
    if opts.online:
        default_mixup, default_cutmix = REFERENCE_MIXING if opts.reaugment else (0.0, 0.0)
        mixer = Mixer(default_mixup if opts.mixup is None else opts.mixup,
                      default_cutmix if opts.cutmix is None else opts.cutmix, backbone["image_size"], opts.seed)
    else:
        mixer = Mixer(opts.feature_mixup, opts.feature_cutmix, backbone["image_size"], opts.seed,
                      patch=backbone["patch_size"])
    return mixer if mixer.enabled else None


# ---------------------------------------------------------------------------------------------------- preflight
@dataclass
class Checked:
    """What `preflight` opened and checked, for the run to use."""
    store: FeatureStore
    usable: np.ndarray
    failed: int
    layers: list[int]
    config: DiSTConfig
    frames: str | None  # "stored", "decoded", "reaugmented", or None (the model needs no frames)
    val_store: FeatureStore | None
    val_usable: np.ndarray | None
    val_frames: str | None
    ckpt: dict[str, Any] | None
    decoder_note: str | None = None  # what `check_decoder` checked, when --decoder is not the store's


def preflight(opts: TrainOptions, world: int = 1) -> Checked:
    """Every check before the first step, each failing as a one-line UserError. The CLI runs it before anything
    else, `train_ranks` before it spawns the ranks, and every rank again (cheap: no features are read)."""
    check_options(opts)
    out = Path(opts.out)
    last_path = out / "last.pt"
    if opts.resume and not last_path.is_file():
        raise UserError(f"--resume: {last_path} does not exist; drop --resume to start this run")
    if not opts.resume and last_path.exists():
        raise UserError(f"--out {out} already holds a run ({last_path.name}); pass --resume to continue it, "
                        "or another --out")
    if opts.batch_size % world:
        raise UserError(f"--batch-size {opts.batch_size}: must be a multiple of the {world} processes")
    check_run_dir(out, opts.resume)

    store = open_store(opts.cache, "--cache", opts.storage_options)
    usable, failed = usable_samples(store, "--cache")
    if not len(usable):
        raise UserError(f"--cache {store.url}: no sample has features (all {failed} failed at extraction)")
    check_training_store(opts.recipe, store.schema.sampling, store.schema.split, store.url)  # SSv2 flips relabelled
    layers = select_layers(opts.layers, store, opts.online)
    config = DiSTConfig.from_backbone(store.schema.backbone, store.schema.num_frames, layers, switches=opts.switches)
    check_store_fits(store, config, "--cache", online=opts.online)
    if opts.online:
        recorded_weights_source(store.schema.backbone, opts.pretrained)  # loaded in setup, after the first writes
    if opts.reaugment:
        check_reaugmentable(store, "--cache")
        if opts.video_root is None:
            raise UserError("--reaugment decodes a fresh view of every video each epoch: pass --video-root")
    frames, note = check_frames(store, usable, config, opts.video_root, "--video-root", online=opts.online,
                                decode=opts.reaugment, decoder=opts.decoder)
    frames = "reaugmented" if opts.reaugment else frames
    val_store = val_usable = val_frames = None
    if opts.val_cache:
        val_store = open_store(opts.val_cache, "--val-cache", opts.storage_options)
        check_backbone(val_store, store.schema.backbone, "--val-cache", f"--cache {store.url}")
        check_evaluation_store(val_store, "--val-cache")
        check_store_fits(val_store, config, "--val-cache", online=opts.online)
        val_usable, _ = usable_samples(val_store, "--val-cache")
        val_frames, _ = check_frames(val_store, val_usable, config, opts.val_video_root or opts.video_root,
                                     "--val-video-root", online=opts.online, decoder=opts.decoder)
    ckpt = load_checkpoint(last_path) if opts.resume else None
    if ckpt is not None:
        _check_resume(ckpt, opts, store.fingerprint, opts.cache)
    return Checked(store, usable, failed, layers, config, frames, val_store, val_usable, val_frames, ckpt, note)


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
    recipe, and runs from before the augmentation options lack those: an option a checkpoint lacks had its default."""
    flat = {**DiSTSwitches().to_dict(), **OPTION_DEFAULTS}
    flat.update({k: v for k, v in train_config.items() if k != "switches"})
    flat.update(train_config.get("switches", {}))
    return flat


# ---------------------------------------------------------------------------------------------------- entry points
def train(opts: TrainOptions, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in `opts.out`: last.pt, best.pt, metrics.jsonl and curves.png.
    Under a launcher (torchrun, or `train_ranks`) this process is one rank of a data-parallel run."""
    check_options(opts)  # before joining: a bad flag fails every rank alike, without a process group
    # A stop signal from here on stops the run after a step, with its last.pt: never a lost run.
    with StopRequests() as stop, joined(resolve_device(opts.device)) as ranks:
        checked = preflight(opts, ranks.world)
        with contextlib.ExitStack() as held:
            # The process the user started holds the run directory: this one, or `train_ranks`' launcher.
            if ranks.main and LAUNCHER_ENV not in os.environ:
                held.enter_context(RunLock(opts.out))
            return _train(opts, progress and ranks.main, ranks, checked, stop)


def train_ranks(opts: TrainOptions, nproc: int) -> TrainResult:
    """`--nproc N`: N data-parallel ranks on this machine (rank 0's result). The checks run here first, so a bad
    flag or store is one line before any process starts, and this process holds the run directory's lock; the
    ranks die with it."""
    preflight(opts, nproc)
    with RunLock(opts.out):
        return launch(logged_rank, opts, nproc)


def logged_rank(opts: TrainOptions) -> TrainResult:
    """One rank of `--nproc`: rank 0 adds what it prints (the progress bar) to RUN/train.log, which the launcher
    (the CLI) keeps for its own lines."""
    if int(os.environ.get("RANK", "0")):
        return train(opts)
    with RunLog(Path(opts.out) / "train.log"):
        return train(opts)


# ---------------------------------------------------------------------------------------------------- setup
@dataclass
class Run:
    """A run set up to train: everything the loop and the epoch end use."""
    opts: TrainOptions
    ranks: Ranks
    store: FeatureStore
    config: DiSTConfig
    step_model: StepModel
    sampler: EpochSampler
    loader: BatchLoader
    validation: Validation | None
    tracker: Tracker | None  # rank 0 only
    meter: Meter
    frames: str | None
    step: int = 0
    best_top1: float | None = None
    identities: dict[int, dict[str, str]] = field(default_factory=dict)  # store_identity of the stores saved with

    @property
    def out(self) -> Path:
        return Path(self.opts.out)

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.batches_per_epoch

    @property
    def total(self) -> int:
        return self.opts.epochs * self.steps_per_epoch

    def payload(self, chosen_on: FeatureStore | None = None, epoch_end_pending: bool = False) -> dict[str, Any]:
        """A checkpoint. `chosen_on`: the store whose validation made this the best (recorded, so that `eval` can
        warn when it is asked to score the checkpoint on that very store). `epoch_end_pending`: written by a stop
        at an epoch's last step, whose end the resume runs first."""
        m = self.step_model

        def identity(s: FeatureStore | None) -> dict[str, str] | None:
            if s is None:
                return None
            if id(s) not in self.identities:  # the same store at every save: its evaluation set is read once
                self.identities[id(s)] = store_identity(s)
            return self.identities[id(s)]

        return {
            "model": m.branch.state_dict(), "optimizer": m.optimizer.state_dict(),
            "scheduler": m.scheduler.state_dict(),
            "scaler": m.scaler.state_dict(), "step": self.step, "epoch": self.step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "best_top1": self.best_top1, "epoch_loss": self.meter.state(),
            "dist_config": self.config.to_dict(), "train_config": self.opts.recorded(),
            "store": {"fingerprint": self.store.fingerprint, "url": self.store.url,
                      "backbone": self.store.schema.backbone,
                      "class_names": list(self.store.schema.class_names)},
            "val_store": identity(None if self.validation is None else self.validation.store),
            "chosen_on": identity(chosen_on), "epoch_end_pending": epoch_end_pending,
        }

    def save(self, name: str, chosen_on: FeatureStore | None = None, epoch_end_pending: bool = False) -> None:
        save_checkpoint(self.out / name, self.payload(chosen_on, epoch_end_pending))

    def close(self) -> None:
        self.loader.close()
        if self.validation is not None:
            self.validation.close()
        if self.tracker is not None:
            self.tracker.close()


def setup(opts: TrainOptions, ranks: Ranks, checked: Checked) -> Run:
    """The network (from the seed, or the checkpoint), its optimiser, the loaders and the run's record."""
    device, store, config = ranks.device, checked.store, checked.config
    # Rank r's batch b is every world-th sample of the global batch b, so the ranks' batches partition it.
    sampler = EpochSampler(checked.usable, store.schema.views_per_video, opts.batch_size // ranks.world,
                           seed=opts.seed, train=True, rank=ranks.rank, world_size=ranks.world)
    steps_per_epoch = sampler.batches_per_epoch
    total = opts.epochs * steps_per_epoch
    net = build_network(config, online=opts.online, backbone_record=store.schema.backbone, pretrained=opts.pretrained,
                        device=device, seed=opts.seed, precision=online_precision(store.schema.precision, device))
    branch = branch_of(net)
    optimizer, scheduler = make_optimizer(branch, lr=opts.lr, weight_decay=opts.weight_decay, total=total,
                                          warmup=round(opts.warmup_epochs * steps_per_epoch),
                                          warmup_start_lr=opts.warmup_start_lr)
    amp = amp_dtype(device)
    scaler = make_scaler(amp)
    meter = Meter()
    step, best_top1 = 0, None
    ckpt = checked.ckpt
    if ckpt is not None:
        branch.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        restore_scaler(scaler, ckpt["scaler"])
        step, best_top1 = ckpt["step"], ckpt["best_top1"]
        meter.epoch_sum, meter.epoch_steps = ckpt["epoch_loss"]
    # DDP averages the ranks' gradients (each the mean over its equal share of the global batch), which
    # is the gradient of the global batch's mean loss: the update one process would make.
    model = net if ranks.world == 1 else nn.parallel.DistributedDataParallel(net)
    backbone = store.schema.backbone
    step_model = StepModel(net, model, branch, optimizer, scheduler, scaler,
                           torch.as_tensor(store.text_features, device=device), tuple(backbone["mean"]),
                           tuple(backbone["std"]), amp, opts.label_smoothing, opts.clip_grad, make_mixer(opts, store))
    with contextlib.ExitStack() as opened:  # what is opened here is closed again if a later part fails
        frames = None
        if checked.frames == "reaugmented":
            frames = ReaugmentedFrames(store, opts.video_root, config.switches.gamma, seed=opts.seed,
                                       workers=opts.decode_workers, timeout=opts.decode_timeout, decoder=opts.decoder)
        elif checked.frames:
            frames = frame_source(store, config.switches.gamma, opts.video_root, decode_workers=opts.decode_workers,
                                  decode_timeout=opts.decode_timeout, decoder=opts.decoder)
            opened.callback(frames.close)
        loader = BatchLoader(store, sampler, layers=None if opts.online else checked.layers, frames=frames,
                             device=device, read_threads=opts.read_threads)
        opened.callback(loader.close)
        validation = tracker = None
        if checked.val_store is not None and ranks.main:
            validation = Validation.open(net, checked.val_store, checked.val_usable,
                                         video_root=opts.val_video_root or opts.video_root,
                                         batch_size=opts.eval_batch_size or opts.batch_size,
                                         read_threads=opts.read_threads, decode_workers=opts.decode_workers,
                                         decode_timeout=opts.decode_timeout, device=device, decoder=opts.decoder)
            opened.callback(validation.close)
        if ranks.main:
            Path(opts.out).mkdir(parents=True, exist_ok=True)
            tracker = Tracker(Path(opts.out), opts.report_to, resume_step=step if ckpt is not None else None,
                              config=opts.recorded())
        opened.pop_all()  # set up: the Run closes them from now on
    return Run(opts, ranks, store, config, step_model, sampler, loader, validation, tracker, meter, checked.frames,
               step, best_top1)


# ---------------------------------------------------------------------------------------------------- the loop
def _train(opts: TrainOptions, progress: bool, ranks: Ranks, checked: Checked, stop: StopRequests) -> TrainResult:
    run = setup(opts, ranks, checked)
    bar = tqdm(total=run.total, initial=run.step, unit="step", desc="train", disable=not progress, dynamic_ncols=True)
    try:
        if checked.ckpt is not None and checked.ckpt.get("epoch_end_pending"):  # stopped after an epoch's last step
            end_of_epoch(run, run.step // run.steps_per_epoch)  # so that epoch's end comes first
        while run.step < run.total:
            epoch, consumed = divmod(run.step, run.steps_per_epoch)
            run.sampler.set_epoch(epoch, consumed)
            tick = time.monotonic()  # clips/s measures training steps (data wait included), not validation
            for batch in run.loader:
                lr = run.step_model.optimizer.param_groups[0]["lr"]
                loss = train_step(run.step_model, batch, ranks, run.store, run.step)
                run.step += 1
                now = time.monotonic()
                run.meter.add(loss, len(batch) * ranks.world, now - tick)
                tick = now
                bar.update(1)
                if run.tracker is not None and (run.step % opts.log_every == 0 or run.step == run.total):
                    record = {"kind": "train", "step": run.step, "epoch": run.step / run.steps_per_epoch,
                              **run.meter.take_window(), "lr": lr}
                    run.tracker.write(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                    clips_s=f"{record['clips_per_s']:.1f}")
                # An epoch's last step is saved by end_of_epoch, after its validation.
                if ranks.main and run.step % opts.save_every == 0 and run.step % run.steps_per_epoch:
                    run.save("last.pt")
                if stop.agreed(ranks.world, ranks.device):
                    stop_after_step(run, stop.received)
            end_of_epoch(run, epoch + 1)
    finally:
        bar.close()
        run.close()
    out = run.out
    plot = plot_curves(out / "metrics.jsonl", out / "curves.png") if ranks.main else out / "curves.png"
    return TrainResult(out=out, steps=run.step, epochs=run.step // run.steps_per_epoch, last=out / "last.pt",
                       best=out / "best.pt", best_top1=run.best_top1, metrics=out / "metrics.jsonl", plot=plot,
                       skipped_failed_samples=checked.failed, frames=run.frames)


def stop_after_step(run: Run, received: int | None) -> None:
    """Stop on a signal, every rank after the same step: last.pt holds it (at an epoch's last step, with that
    epoch's end left to the resume: validating could outlast the grace before SIGKILL), then `Preempted`."""
    if run.ranks.main:
        run.save("last.pt", epoch_end_pending=run.step % run.steps_per_epoch == 0)
    wait_for_all(run.ranks.world, run.ranks.device)  # no rank exits before last.pt is whole
    raise preempted(received, run.step, run.total, run.opts.out)


def end_of_epoch(run: Run, epoch: int) -> None:
    """Validate, then best.pt, then last.pt (so a resumed run never skips a validation), and the epoch's record."""
    train_loss = run.meter.end_epoch()
    if not run.ranks.main:
        return
    record: dict[str, Any] = {"kind": "epoch", "epoch": epoch, "step": run.step, "train_loss": train_loss}
    if run.validation is not None and (epoch % run.opts.eval_every == 0 or epoch == run.opts.epochs):
        val = run.validation.evaluate(run.step_model.net)
        record.update(val_top1=val["top1"], val_top5=val["top5"], val_mean_class_accuracy=val["mean_class_accuracy"])
        if run.best_top1 is None or val["top1"] > run.best_top1:
            run.best_top1 = val["top1"]
            run.save("best.pt", chosen_on=run.validation.store)
    elif run.validation is None:
        run.save("best.pt")
    run.tracker.write(record)
    run.save("last.pt")
