"""`dist-cache`: the command-line entry point. Kept thin: parse flags, call a pipeline, print.

Every error a user can fix is a `UserError`; it prints as one line and exits 2, never a traceback.
Heavy imports (torch, open_clip, zarr) happen inside the commands so `--help` stays instant.

Commands are listed in workflow order, each with a one-line summary and its help ending with an example;
the conventions shared by the commands (--config, --storage-options, renamed options) are in cli_options.py.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys

import click
from click.core import ParameterSource

from cli_options import (
    Workflow,
    check_storage_options,
    config_option,
    example,
    merge_renamed,
    record_run_config,
    renamed_option,
    storage_options_option,
)

# Configuration only (no torch): the flags are generated from it and --help stays instant.
from dist_cache.model.switches import SWITCH_NAMES, DiSTSwitches
from dist_cache.recipes import RECIPES

# The order `dist-cache --help` lists the commands in: the order they are used in.
COMMAND_ORDER = ("extract", "info", "verify", "train", "eval", "copy", "profile", "demo")


class CommandError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turn `UserError` (and file-system errors on user-given paths) into a one-line message and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dist_cache.errors import UserError
        from pipelines.preemption import PREEMPTED_EXIT, Preempted

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise CommandError(str(err)) from None
        except Preempted as stopped:  # train, on SIGTERM or SIGUSR1: last.pt written, every rank stops alike
            if not int(os.environ.get("RANK", "0")):
                click.echo(f"preempted: {stopped}", err=True)
            sys.exit(PREEMPTED_EXIT)
        except KeyboardInterrupt:
            click.echo("interrupted: rerun the same command to resume (train: add --resume)", err=True)
            sys.exit(130)

    return wrapper


def _area_range(ctx, param, text: str) -> tuple[float, float]:
    """`--scale low,high`: the random resized crop's range of area fractions, 0 < low <= high <= 1."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not two numbers LOW,HIGH (e.g. 0.4,1.0)") from None
    if not 0 < low <= high <= 1:
        raise click.BadParameter(f"{text!r} needs 0 < LOW <= HIGH <= 1")
    return low, high


@click.group(cls=Workflow, order=COMMAND_ORDER,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dist-cache")
def main() -> None:
    """DiST on cached CLIP features: extract once, train the temporal branch many times.

    The commands are listed in the order they are used; each one's --help ends with an example.
    """


@main.command(**example("dist-cache extract --manifest train.csv --video-root /data/k400 --out "
                        "k400-train.zarr --views 2"))
@config_option
@click.option("--manifest", required=True, type=click.Path(),
              help="Video list: CSV path,label; Kinetics CSV; SSv2 JSON; or mmaction list.")
@click.option("--video-root", required=True, type=click.Path(), help="Directory the manifest's paths are relative to.")
@click.option("--out", required=True, help="Store to create or resume: a path or an fsspec URL (s3://...).")
@storage_options_option()
@click.option("--model", default="ViT-B-16", show_default=True,
              help="open_clip model name, dist-tiny, or a model-config JSON path.")
@click.option("--pretrained", default="openai", show_default=True,
              help="open_clip tag, local checkpoint path, or none.")
@click.option("--allow-random-weights", is_flag=True, help="Permit --pretrained none (features then mean nothing).")
@click.option("--layers", default="all", show_default=True, help="all, last:N, or comma list of 0-based block indices.")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True,
              help="Sparse (CLIP) frames per view, T.")
@click.option("--views", default=None, type=click.IntRange(min=1),
              help="Views cached per video (train: augmented; test: temporal clips). Default: 1 for train, 3 for test.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="train: TSN + random resized crop + flip; test: uniform clips + centre crop.")
@click.option("--seed", default=0, type=click.IntRange(0, 2**63 - 1), show_default=True,
              help="Seed for frame sampling and crops.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Stored feature type: fp16, or int8 per-token absmax with fp16 scales (2x smaller, ~0.8 % error).")
@click.option("--precision", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="How CLIP runs: fp16/bf16 autocast or fp32. Default: fp16 on CUDA, fp32 on the CPU.")
@click.option("--codec", type=click.Choice(["none", "zstd", "blosc-zstd", "blosc-lz4"]), default="none",
              show_default=True,
              help="Lossless codec; fp16 activations compress by under 10%.")
@click.option("--classes", type=click.Path(), default=None, help="Class names file (txt, one per line, or JSON).")
@click.option("--manifest-format", type=click.Choice(["auto", "csv", "kinetics", "ssv2", "mmaction"]), default="auto",
              show_default=True,
              help="The manifest's format; auto tells them apart by extension and header. In any format, a video "
                   "listed twice is refused.")
@click.option("--template", "templates", multiple=True, default=("{}",), show_default=True,
              help="Prompt template(s) for the class-name text embeddings; exactly one {} is the class name.")
@click.option("--flip-p", default=0.5, type=click.FloatRange(0, 1), show_default=True,
              help="Train flip probability (SSv2: keep it with --flip-label-map, or use 0).")
@click.option("--flip-label-map", type=click.Path(), default=None,
              help='JSON list of class-name pairs a horizontal flip swaps, e.g. [["left", "right"]]: a flipped '
                   "train view of a class in a pair is labelled with its partner (SSv2).")
@click.option("--grayscale-p", default=0.2, type=click.FloatRange(0, 1), show_default=True,
              help="Train grayscale probability.")
@click.option("--scale", default="0.4,1.0", show_default=True, callback=_area_range,
              help="Random resized crop area range.")
@click.option("--dense-frames", is_flag=True,
              help="Also store each view's dense frames (uint8, rendered as training renders them), so training "
                   "decodes no video.")
@click.option("--dense-gamma", default="2", type=click.Choice(["1", "2", "4", "8"]), show_default=True,
              callback=lambda ctx, param, v: int(v),
              help="Dense frames per sparse frame stored with --dense-frames: the largest gamma you will train with.")
@click.option("--batch-frames", default=64, type=click.IntRange(min=1), show_default=True,
              help="Frames per CLIP forward pass.")
@click.option("--decode-workers", default="auto", show_default=True,
              help="Decode processes: a count, or auto (the usable cores less 2 for this process).")
@click.option("--decoder", type=click.Choice(["decord", "pyav"]), default=None,
              help="Video decoder (recorded in the store). Default: decord where installed, else pyav.")
@click.option("--decode-timeout", default=120.0, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Seconds before a video's decode is killed and recorded as failed. (A decode process that "
                   "dies is replaced and its video retried: a video is failed only if it kills two.)")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--hash-videos", is_flag=True,
              help="Record each video file's sha256, so verify can tell a replaced copy.")
@click.option("--retry-failed", is_flag=True,
              help="Extract the videos recorded as failed again (after fixing or replacing them).")
@click.option("--repair", is_flag=True,
              help="Re-extract the done videos whose stored shards are missing or fail their checksums (the shard "
                   "indexes: a few small reads per video), then finalise.")
@click.option("--deep", is_flag=True,
              help="With --repair: read every stored chunk and check its crc32c (reads the whole store).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--dask-workers", type=click.IntRange(min=1), default=None,
              help="Spread videos over a local dask cluster of N worker processes (each loads CLIP once).")
@renamed_option("--workers", "dask_workers", click.IntRange(min=1))
@click.option("--scheduler", default=None,
              help="Spread videos over the dask cluster at this address (tcp://host:8786).")
@user_errors
def extract(**kw) -> None:
    """Run the frozen CLIP over every video once; store each layer's tokens in a zarr store."""
    from dist_cache.manifests import load_flip_label_map
    from pipelines.extract import ExtractOptions, extract as run_extract

    merge_renamed(kw, "dask_workers")
    check_storage_options(kw["storage_options"], kw["out"])
    strict, workers, scheduler = kw.pop("strict"), kw.pop("dask_workers"), kw.pop("scheduler")
    kw["templates"] = tuple(kw["templates"])
    kw["decode_workers"] = int(kw["decode_workers"]) if kw["decode_workers"].isdigit() else kw["decode_workers"]
    if kw["flip_label_map"] is not None:
        kw["flip_label_map"] = load_flip_label_map(kw["flip_label_map"])
    if workers is None and scheduler is None:
        summary = run_extract(ExtractOptions(**kw))
    else:
        from pipelines.extract_dask import extract_distributed

        summary = extract_distributed(ExtractOptions(**kw), workers=workers, scheduler=scheduler)
    for damage in summary.damaged[:5]:
        click.echo(f"repaired {damage.describe()}", err=True)
    if len(summary.damaged) > 5:
        click.echo(f"repaired {len(summary.damaged) - 5} more damaged videos", err=True)
    click.echo(
        f"stored {summary.stored} videos, skipped {summary.skipped} (already done), failed {summary.failed}, "
        f"wrote {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s -> {kw['out']}"
        + (f" ({len(summary.damaged)} damaged, redone)" if kw["repair"] else "")
        + ("" if summary.complete else " (incomplete)")
    )
    if summary.store_failed:
        first = f"; first in this run: {summary.failures[0][1]}" if summary.failures else ""
        click.echo(
            f"warning: {summary.store_failed} video(s) in the store failed to decode and are recorded as failed "
            f"(list them with `dist-cache info {kw['out']} --failed`){first}",
            err=True,
        )
        if strict:
            sys.exit(1)


@main.command(**example("dist-cache info k400-train.zarr --failed"))
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the full schema and counts as JSON.")
@click.option("--failed", is_flag=True, help="List failed videos with their errors.")
@storage_options_option()
@user_errors
def info(store: str, as_json: bool, failed: bool, storage_options: dict) -> None:
    """Summarise a store: backbone, layers, frames, sampling, progress, objects and size."""
    from pipelines.info import format_info, store_info

    check_storage_options(storage_options, store)
    summary = store_info(store, storage_options)
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary, show_failed=failed))


@main.command(**example("dist-cache verify k400-val.zarr --video-root /data/k400 --samples 5"))
@click.argument("store")
@click.option("--deep", is_flag=True,
              help="Read every byte and check every chunk's checksum (default: every shard's index).")
@click.option("--video-root", type=click.Path(), default=None,
              help="Where the videos are; without it, features are not recomputed.")
@click.option("--samples", default=3, type=click.IntRange(min=1), show_default=True,
              help="Random samples to recompute from the videos.")
@click.option("--pretrained", default=None,
              help="The store's CLIP checkpoint, for recomputing (needed when the store was made from a local file; "
                   "a tag needs none).")
@click.option("--seed", default=0, show_default=True, help="Seed for choosing the samples.")
@click.option("--all-videos", is_flag=True,
              help="Check every video under --video-root against the recorded facts (and sha256 if recorded).")
@click.option("--device", default="auto", show_default=True, help="Where to recompute: auto, cpu, cuda, cuda:1 ...")
@storage_options_option()
@user_errors
def verify(store: str, storage_options: dict, **kw) -> None:
    """Check a store is whole: completeness, every sample's integrity, the videos, recomputed samples."""
    from pipelines.verify import format_report, verify_store

    check_storage_options(storage_options, store)
    report = verify_store(store, storage_options=storage_options, progress=True, **kw)
    click.echo(format_report(report))
    if not report.ok:
        sys.exit(1)


def switch_options(fn):
    """The DiST switches as flags (the paper's ablations), generated from DiSTSwitches' fields: shared by train and
    profile. A boolean switch is on by default and becomes `--no-NAME`."""
    for f in reversed(dataclasses.fields(DiSTSwitches)):
        meta = f.metadata
        if not meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            option = click.option(f"--no-{flag[2:]}", f.name, flag_value=False, default=True, help=meta["help"])
        elif meta["choices"] is not None:
            kind = type(f.default)
            option = click.option(flag, type=click.Choice([str(c) for c in meta["choices"]]), default=str(f.default),
                                  show_default=True, callback=lambda ctx, param, v, kind=kind: kind(v),
                                  help=meta["help"])
        else:
            option = click.option(flag, type=click.IntRange(meta["min"], meta["max"]), default=f.default,
                                  show_default=True, help=meta["help"])
        fn = option(fn)
    return fn


def _switch_values(kw: dict) -> dict:
    """Take the switch flags out of a command's keyword arguments."""
    return {name: kw.pop(name) for name in SWITCH_NAMES if name in kw}


def _count_or_auto(ctx, param, value):
    """`--decode-workers`: a process count (0: decode in the reader threads) or auto (the usable cores less 2)."""
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a count nor auto") from None
    if count < 0:
        raise click.BadParameter(f"{value!r} must not be negative")
    return count


def loader_options(fn):
    """How train and eval read their input: reader threads, decode processes (and the old --workers spelling)."""
    for option in reversed([
        click.option("--read-threads", default=8, type=click.IntRange(min=1), show_default=True,
                     help="Threads reading features and stored frames into the batch buffers."),
        click.option("--decode-workers", default="auto", show_default=True, callback=_count_or_auto,
                     help="Processes decoding dense frames when the store holds none (auto: the cores less 2; "
                          "0: in the reader threads)."),
        click.option("--workers", "decode_workers_old_spelling", default=None, hidden=True, callback=_count_or_auto,
                     help="Old spelling of --decode-workers."),
        click.option("--decode-timeout", default=120.0, type=click.FloatRange(min=0, min_open=True),
                     show_default=True, help="Seconds before a video's decode is killed (the run then stops)."),
    ]):
        fn = option(fn)
    return fn


@main.command(**example("dist-cache train --cache k400-train.zarr --val-cache k400-val.zarr --video-root "
                        "/data/k400 --out runs/b16"))
@config_option
@click.option("--cache", required=True, help="Training store (path or fsspec URL).")
@click.option("--video-root", default=None, type=click.Path(),
              help="Where the store's videos are: needed only when the store holds no dense frames for --gamma "
                   "(they are decoded from the videos then).")
@click.option("--out", required=True, type=click.Path(), help="Run directory: checkpoints, metrics.jsonl, curves.")
@click.option("--val-cache", default=None, help="Validation store; best.pt is chosen by its top-1.")
@click.option("--val-video-root", default=None, type=click.Path(),
              help="Video root of the validation store (default: --video-root).")
@storage_options_option()
@click.option("--resume", is_flag=True,
              help="Continue the run in --out exactly where it stopped: killed, or preempted (SIGTERM or SIGUSR1, "
                   "e.g. SLURM's --signal=USR1@90, stop a run after its step with last.pt written: exit status 75).")
@click.option("--online", is_flag=True,
              help="Run the frozen CLIP live on the sparse frames instead of reading cached features.")
@click.option("--pretrained", default=None,
              help="The store's CLIP checkpoint, for --online (needed when the store was made from a local file; a tag "
                   "needs none).")
@click.option("--reaugment", is_flag=True,
              help="With --online: train as the reference does, on a fresh view of every video each epoch (TSN "
                   "offsets, crop, flip, grayscale drawn with the store's recorded sampling, seeded by --seed, epoch "
                   "and video), decoded from --video-root; the store gives the manifest, classes, text embeddings "
                   "and backbone. Mixup 0.8 and cutmix 1.0 are on unless --mixup/--cutmix say otherwise.")
@click.option("--mixup", default=None, type=click.FloatRange(min=0),
              help="With --online: alpha of pixel mixup before CLIP (0 disables). Default: 0.8 with --reaugment "
                   "(the reference's), else 0. With --cutmix too, each batch is one or the other (p 0.5).")
@click.option("--cutmix", default=None, type=click.FloatRange(min=0),
              help="With --online: alpha of pixel cutmix before CLIP (0 disables). Default: 1.0 with --reaugment "
                   "(the reference's), else 0.")
@click.option("--feature-mixup", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="Cached runs: alpha of mixup of pairs within a batch: the cached tokens of every layer, the dense "
                   "frames and the labels with one lambda (0 disables). Not what CLIP would give on mixed pixels: "
                   "a cheap stand-in for --online --mixup.")
@click.option("--feature-cutmix", default=0.0, type=click.FloatRange(min=0), show_default=True,
              help="Cached runs: alpha of cutmix on the ViT's patch grid: the frames' box and the patch tokens under "
                   "it come from the partner, the class token is mixed by area (0 disables). Not what CLIP would "
                   "give on cut-mixed pixels.")
@click.option("--layers", default="all", show_default=True,
              help="CLIP layers to integrate: all (the store's), last:N, or a comma list.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Start from the reference's settings for this dataset (k400: 4 AdaPooling blocks; ssv2: 2); "
                   "flags given explicitly override it. Default: none, i.e. the defaults below (the SSv2 head).")
@switch_options
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True,
              help="Passes over the training store.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), show_default=True,
              help="Global batch: clips per optimiser step, split among the --nproc processes.")
@click.option("--lr", default=3.2e-4, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Peak learning rate.")
@click.option("--warmup-epochs", default=5.0, type=click.FloatRange(min=0), show_default=True,
              help="Epochs of linear warm-up to --lr (then a cosine to 0).")
@click.option("--weight-decay", default=1e-4, type=click.FloatRange(min=0), show_default=True,
              help="AdamW weight decay, on weight matrices only.")
@click.option("--label-smoothing", default=0.1, type=click.FloatRange(0, 1, max_open=True), show_default=True,
              help="Label smoothing of the cross-entropy.")
@click.option("--clip-grad", default=1.0, type=click.FloatRange(min=0), show_default=True,
              help="Max gradient norm; 0 disables.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the initial weights and of every epoch's view choice and order.")
@loader_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--save-every", default=500, type=click.IntRange(min=1), show_default=True,
              help="Steps between last.pt writes.")
@click.option("--log-every", default=10, type=click.IntRange(min=1), show_default=True,
              help="Steps between lines of metrics.jsonl.")
@click.option("--eval-every", default=1, type=click.IntRange(min=1), show_default=True,
              help="Epochs between validations on --val-cache (the last epoch is always validated).")
@click.option("--eval-batch-size", default=None, type=click.IntRange(min=1),
              help="Validation batch size (default: --batch-size).")
@click.option("--report-to", "report_to", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Also log to TensorBoard (event files in RUN/tensorboard) or Weights & Biases (WANDB_MODE=offline "
                   "works); repeatable. metrics.jsonl and curves.png are always written.")
@click.option("--nproc", default=1, type=click.IntRange(min=1), show_default=True,
              help="Data-parallel processes on this machine (--batch-size is split among them).")
@user_errors
def train(nproc: int, recipe: str | None, **kw) -> None:
    """Train DiST's temporal encoder and integration branch from a feature store."""
    from dist_cache.recipes import effective_switches
    from pipelines.distributed import quiet_unless_main
    from pipelines.train import TrainOptions, preflight, train as run_train, train_ranks

    quiet_unless_main()  # under torchrun, rank 0 alone reports
    merge_renamed(kw, "decode_workers")
    check_storage_options(kw["storage_options"], kw["cache"], kw["val_cache"])
    ctx = click.get_current_context()
    typed = {k: v for k, v in _switch_values(kw).items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    switches, line = effective_switches(recipe, typed)
    opts = TrainOptions(switches=switches, recipe=recipe, **{**kw, "report_to": tuple(kw["report_to"])})
    checked = preflight(opts, nproc)  # a bad flag or store is the only line printed
    record_run_config(ctx, opts, dataclasses.asdict(switches))
    click.echo(line)
    gamma = switches.gamma
    if checked.frames == "stored":
        click.echo(f"dense frames: read from the store (gamma {gamma} of its stored {checked.store.dense_gamma})")
    elif checked.frames in ("decoded", "reaugmented"):
        fresh = "a fresh view each epoch, " if checked.frames == "reaugmented" else ""
        click.echo(f"dense frames: {fresh}decoded from {opts.video_root} with "
                   f"{checked.store.schema.preprocess['decoder']['name']}")
    result = run_train(opts) if nproc == 1 else train_ranks(opts, nproc)
    best = f", best val top-1 {result.best_top1:.2%}" if result.best_top1 is not None else ""
    click.echo(f"trained {result.steps} steps over {result.epochs} epochs{best}; checkpoints in {result.out}")
    if result.skipped_failed_samples:
        click.echo(f"skipped {result.skipped_failed_samples} failed samples of the store", err=True)


@main.command(name="eval",
              **example("dist-cache eval --checkpoint runs/b16/best.pt --cache k400-val.zarr --video-root /data/k400 "
                        "--json report.json"))
@config_option
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A checkpoint written by train (best.pt or last.pt).")
@click.option("--cache", required=True, help="Evaluation store (test split: 3 clips x 1 crop by default).")
@storage_options_option()
@click.option("--video-root", default=None, type=click.Path(),
              help="Where the store's videos are: needed only when the store holds no dense frames.")
@click.option("--classes", default=None, type=click.Path(), help="Zero-shot: class names file of a new label set.")
@click.option("--pretrained", default=None, help="Local copy of the store's CLIP weights (for --classes and --online).")
@click.option("--json", "json_path", default=None, type=click.Path(),
              help="Write the full report (and a confusion PNG beside it).")
@click.option("--online", is_flag=True, help="Run the frozen CLIP live instead of reading cached features.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), show_default=True, help="Clips per forward pass.")
@loader_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@user_errors
def evaluate(json_path: str | None, **kw) -> None:
    """Score a checkpoint: multi-view top-1/top-5, per-class accuracy, zero-shot with --classes."""
    from pipelines.evaluate import EvalOptions, evaluate as run_eval, format_report

    merge_renamed(kw, "decode_workers")
    check_storage_options(kw["storage_options"], kw["cache"])
    report = run_eval(EvalOptions(json=json_path, **kw))
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_report(report))


@main.command(**example("dist-cache profile --model ViT-B-16 --frames 8 --gamma 4"))
@click.option("--model", default="ViT-B-16", show_default=True,
              help="open_clip model name or dist-tiny (random weights; only shapes matter).")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True,
              help="Sparse (CLIP) frames per view.")
@switch_options
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@user_errors
def profile(model: str, frames: int, as_json: bool, **switches) -> None:
    """Parameters and GFLOPs (1 multiply-add = 1 FLOP) of one view's DiST forward, split by part."""
    from dist_cache.flops import format_profile, profile_dist

    result = profile_dist(model, frames=frames, switches=DiSTSwitches(**_switch_values(switches)))
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result))


@main.command(**example("dist-cache demo --workdir /tmp/dist-demo --epochs 10"))
@click.option("--workdir", default="demo-run", show_default=True, type=click.Path(),
              help="Where data, stores and the run go.")
@click.option("--videos-per-class", default=48, type=click.IntRange(min=2), show_default=True,
              help="Generated clips per class (4 classes); fewer run faster and learn less.")
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True, help="Training epochs.")
@click.option("--seed", default=0, show_default=True,
              help="Seed of the generated videos, the extraction and the training.")
@user_errors
def demo(workdir: str, videos_per_class: int, epochs: int, seed: int) -> None:
    """Generate motion-defined videos, extract with a tiny CLIP, train, evaluate: all on this CPU."""
    from pipelines.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=workdir, videos_per_class=videos_per_class, epochs=epochs, seed=seed), say=click.echo)


@main.command(**example("dist-cache copy https://host/k400-train.zarr k400-train.zarr --layers last:4 --dtype int8"))
@click.argument("src")
@click.argument("dst")
@click.option("--layers", default="all", show_default=True,
              help="Layers to keep: all, last:N, or a comma list of block indices.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default=None,
              help="Store features as this (default: the source's).")
@click.option("--frames", type=click.Choice(["keep", "drop"]), default="keep", show_default=True,
              help="Keep the source's dense frames, or drop them (training then decodes them from the videos).")
@click.option("--videos-per-shard", default=1, type=click.IntRange(min=1), show_default=True,
              help="Pack N videos into each shard (and one record per N): ~3/N objects per video, read-only. "
                   "Written to an object store, a shard is one upload held in memory.")
@storage_options_option(help="fsspec options for SRC and DST where they are URLs, as JSON or @FILE (see "
                             "--src-storage-options, --dst-storage-options to give each its own).")
@storage_options_option(help="fsspec options for SRC alone (JSON or @FILE).", name="--src-storage-options")
@storage_options_option(help="fsspec options for DST alone (JSON or @FILE).", name="--dst-storage-options")
@user_errors
def copy(src: str, dst: str, storage_options: dict, src_storage_options: dict, dst_storage_options: dict,
         **kw) -> None:
    """Copy a store to DST: a layer subset, int8, without frames, or packed; a rerun resumes."""
    from pipelines.copy import copy_store
    from storage.location import is_local

    check_storage_options(storage_options, src, dst)
    check_storage_options(src_storage_options, src, flag="--src-storage-options")
    check_storage_options(dst_storage_options, dst, flag="--dst-storage-options")
    src_options = src_storage_options or ({} if is_local(src) else storage_options)
    dst_options = dst_storage_options or ({} if is_local(dst) else storage_options)
    s = copy_store(src, dst, src_options=src_options, dst_options=dst_options, **kw)
    held = f", {s.held_back} more wait for them to fill their shards" if s.held_back else ""
    click.echo(f"copied {s.copied} videos, skipped {s.skipped} (already there), failed {s.failed} -> {dst}"
               + ("" if s.complete else f" (incomplete: {s.pending_in_source} not extracted in the source yet{held})"))


def run() -> None:
    """The `dist-cache` console script: `main`, with bad flags reported like every other user error, in one line."""
    try:
        code = main(standalone_mode=False, prog_name="dist-cache")
    except click.UsageError as err:
        where = err.ctx.command_path if err.ctx else "dist-cache"
        click.echo(f"error: {err.format_message()} (see {where} --help)", err=True)
        sys.exit(2)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    run()
