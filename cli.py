"""`dist-cache`: the command-line entry point. Kept thin: parse flags, call a pipeline, print.

Every error a user can fix is a `UserError`; it prints as one line and exits 2, never a traceback.
Heavy imports (torch, open_clip, zarr) happen inside the commands so `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys

import click
from click.core import ParameterSource

# Configuration only (no torch): the flags are generated from it and --help stays instant.
from dist_cache.model.switches import SWITCH_NAMES, DiSTSwitches
from dist_cache.recipes import RECIPES


class CommandError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


def user_errors(fn):
    """Turn `UserError` (and file-system errors on user-given paths) into a one-line message and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dist_cache.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as err:
            raise CommandError(str(err)) from None
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dist-cache")
def main() -> None:
    """DiST on cached CLIP features: extract once, train the temporal branch many times."""


@main.command()
@click.option("--manifest", required=True, type=click.Path(), help="Video list: CSV path,label; Kinetics CSV; SSv2 JSON; or mmaction list.")
@click.option("--video-root", required=True, type=click.Path(), help="Directory the manifest's paths are relative to.")
@click.option("--out", required=True, help="Store to create or resume: a path or an fsspec URL (s3://...).")
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model name, dist-tiny, or a model-config JSON path.")
@click.option("--pretrained", default="openai", show_default=True, help="open_clip tag, local checkpoint path, or none.")
@click.option("--allow-random-weights", is_flag=True, help="Permit --pretrained none (features then mean nothing).")
@click.option("--layers", default="all", show_default=True, help="all, last:N, or comma list of 0-based block indices.")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True, help="Sparse (CLIP) frames per view, T.")
@click.option("--views", default=1, type=click.IntRange(min=1), show_default=True, help="Views cached per video (train: augmented; test: temporal clips).")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="train: TSN + random resized crop + flip; test: uniform clips + centre crop.")
@click.option("--seed", default=0, show_default=True, help="Seed for frame sampling and crops.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True)
@click.option("--codec", type=click.Choice(["none", "zstd", "blosc-zstd", "blosc-lz4"]), default="none", show_default=True,
              help="Lossless codec; fp16 activations compress by under 10%.")
@click.option("--classes", type=click.Path(), default=None, help="Class names file (txt, one per line, or JSON).")
@click.option("--manifest-format", type=click.Choice(["auto", "csv", "kinetics", "ssv2", "mmaction"]), default="auto", show_default=True)
@click.option("--template", "templates", multiple=True, default=("{}",), show_default=True,
              help="Prompt template(s) for the class-name text embeddings; {} is the class name.")
@click.option("--flip-p", default=0.5, type=click.FloatRange(0, 1), show_default=True, help="Train flip probability (use 0 for SSv2: left/right labels).")
@click.option("--grayscale-p", default=0.2, type=click.FloatRange(0, 1), show_default=True, help="Train grayscale probability.")
@click.option("--scale", default="0.4,1.0", show_default=True, callback=_area_range, help="Random resized crop area range.")
@click.option("--batch-frames", default=64, type=click.IntRange(min=1), show_default=True, help="Frames per CLIP forward pass.")
@click.option("--decode-workers", default=2, type=click.IntRange(min=1), show_default=True, help="Decode processes.")
@click.option("--decode-timeout", default=120.0, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Seconds before a video's decode is killed and recorded as failed.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@click.option("--hash-videos", is_flag=True, help="Record each video file's sha256, so verify can tell a replaced copy.")
@click.option("--retry-failed", is_flag=True, help="Extract the videos recorded as failed again (after fixing or replacing them).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--workers", type=int, default=None, help="Spread videos over a local dask cluster of N worker processes.")
@click.option("--scheduler", default=None, help="Spread videos over the dask cluster at this address (tcp://host:8786).")
@user_errors
def extract(**kw) -> None:
    """Run the frozen CLIP over every video once; store each layer's tokens in a zarr store."""
    from pipelines.extract import ExtractOptions, extract as run_extract

    strict, workers, scheduler = kw.pop("strict"), kw.pop("workers"), kw.pop("scheduler")
    kw["templates"] = tuple(kw["templates"])
    if workers is None and scheduler is None:
        summary = run_extract(ExtractOptions(**kw))
    else:
        from pipelines.extract_dask import extract_distributed

        summary = extract_distributed(ExtractOptions(**kw), workers=workers, scheduler=scheduler)
    click.echo(
        f"stored {summary.stored} videos, skipped {summary.skipped} (already done), failed {summary.failed}, "
        f"wrote {summary.bytes_written / 1e6:.1f} MB in {summary.seconds:.1f} s -> {kw['out']}"
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


@main.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the full schema and counts as JSON.")
@click.option("--failed", is_flag=True, help="List failed videos with their errors.")
@user_errors
def info(store: str, as_json: bool, failed: bool) -> None:
    """Summarise a store: backbone, layers, sampling, progress, size."""
    from pipelines.info import format_info, store_info

    summary = store_info(store)
    click.echo(json.dumps(summary, indent=2) if as_json else format_info(summary, show_failed=failed))


@main.command()
@click.argument("store")
@click.option("--video-root", type=click.Path(), default=None, help="Where the videos are; without it, features are not recomputed.")
@click.option("--samples", default=3, type=click.IntRange(min=1), show_default=True, help="Random samples to recompute from the videos.")
@click.option("--pretrained", default=None, help="Checkpoint path, if the store's recorded one is elsewhere on this machine.")
@click.option("--seed", default=0, show_default=True, help="Seed for choosing the samples.")
@click.option("--all-videos", is_flag=True, help="Check every video under --video-root against the recorded facts (and sha256 if recorded).")
@user_errors
def verify(store: str, video_root: str | None, samples: int, pretrained: str | None, seed: int, all_videos: bool) -> None:
    """Check schema and completeness, the videos on this machine, and recompute random samples from them."""
    from pipelines.verify import format_report, verify_store

    report = verify_store(store, video_root=video_root, samples=samples, pretrained=pretrained, seed=seed,
                          all_videos=all_videos)
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
                                  show_default=True, callback=lambda ctx, param, v, kind=kind: kind(v), help=meta["help"])
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
        click.option("--workers", "workers_old_spelling", default=None, hidden=True, callback=_count_or_auto,
                     help="Old spelling of --decode-workers."),
        click.option("--decode-timeout", default=120.0, type=click.FloatRange(min=0, min_open=True),
                     show_default=True, help="Seconds before a video's decode is killed (the run then stops)."),
    ]):
        fn = option(fn)
    return fn


def _merge_workers(kw: dict) -> None:
    old = kw.pop("workers_old_spelling")
    if old is not None:
        kw["decode_workers"] = old


@main.command()
@click.option("--cache", required=True, help="Training store (path or fsspec URL).")
@click.option("--video-root", default=None, type=click.Path(),
              help="Where the store's videos are: needed only when the store holds no dense frames for --gamma "
                   "(they are decoded from the videos then).")
@click.option("--out", required=True, type=click.Path(), help="Run directory: checkpoints, metrics.jsonl, curves.")
@click.option("--val-cache", default=None, help="Validation store; best.pt is chosen by its top-1.")
@click.option("--val-video-root", default=None, type=click.Path(), help="Video root of the validation store (default: --video-root).")
@click.option("--resume", is_flag=True, help="Continue the run in --out exactly where it stopped.")
@click.option("--online", is_flag=True, help="Run the frozen CLIP live on the sparse frames instead of reading cached features.")
@click.option("--pretrained", default=None, help="Local copy of the store's CLIP weights (needed by --online if not at the recorded path).")
@click.option("--layers", default="all", show_default=True, help="CLIP layers to integrate: all (the store's), last:N, or a comma list.")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=None,
              help="Start from the reference's settings for this dataset (k400: 4 AdaPooling blocks; ssv2: 2); "
                   "flags given explicitly override it. Default: none, i.e. the defaults below (the SSv2 head).")
@switch_options
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True)
@click.option("--batch-size", default=32, type=click.IntRange(min=1), show_default=True)
@click.option("--lr", default=3.2e-4, type=click.FloatRange(min=0, min_open=True), show_default=True, help="Peak learning rate.")
@click.option("--warmup-epochs", default=5.0, type=click.FloatRange(min=0), show_default=True)
@click.option("--weight-decay", default=1e-4, type=click.FloatRange(min=0), show_default=True)
@click.option("--label-smoothing", default=0.1, type=click.FloatRange(0, 1, max_open=True), show_default=True)
@click.option("--clip-grad", default=1.0, type=click.FloatRange(min=0), show_default=True, help="Max gradient norm; 0 disables.")
@click.option("--seed", default=0, show_default=True)
@loader_options
@click.option("--device", default="auto", show_default=True)
@click.option("--save-every", default=500, type=click.IntRange(min=1), show_default=True, help="Steps between last.pt writes.")
@click.option("--report-to", "report_to", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              help="Also log to TensorBoard (event files in RUN/tensorboard) or Weights & Biases (WANDB_MODE=offline "
                   "works); repeatable. metrics.jsonl and curves.png are always written.")
@click.option("--nproc", default=1, type=click.IntRange(min=1), show_default=True, help="Data-parallel processes on this machine (--batch-size is split among them).")
@user_errors
def train(nproc: int, recipe: str | None, **kw) -> None:
    """Train DiST's temporal encoder and integration branch from a feature store."""
    from dist_cache.recipes import effective_switches
    from pipelines.distributed import quiet_unless_main
    from pipelines.train import TrainOptions, preflight, train as run_train, train_ranks

    quiet_unless_main()  # under torchrun, rank 0 alone reports
    _merge_workers(kw)
    ctx = click.get_current_context()
    typed = {k: v for k, v in _switch_values(kw).items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    switches, line = effective_switches(recipe, typed)
    opts = TrainOptions(switches=switches, recipe=recipe, **{**kw, "report_to": tuple(kw["report_to"])})
    checked = preflight(opts, nproc)  # a bad flag or store is the only line printed
    click.echo(line)
    gamma = switches.gamma
    if checked.frames == "stored":
        click.echo(f"dense frames: read from the store (gamma {gamma} of its stored {checked.store.dense_gamma})")
    elif checked.frames == "decoded":
        click.echo(f"dense frames: decoded from {opts.video_root} with {checked.store.schema.preprocess['decoder']['name']}")
    result = run_train(opts) if nproc == 1 else train_ranks(opts, nproc)
    best = f", best val top-1 {result.best_top1:.2%}" if result.best_top1 is not None else ""
    click.echo(f"trained {result.steps} steps over {result.epochs} epochs{best}; checkpoints in {result.out}")
    if result.skipped_failed_samples:
        click.echo(f"skipped {result.skipped_failed_samples} failed samples of the store", err=True)


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A checkpoint written by train (best.pt or last.pt).")
@click.option("--cache", required=True, help="Evaluation store (test split: 3 clips x 1 crop by default).")
@click.option("--video-root", default=None, type=click.Path(),
              help="Where the store's videos are: needed only when the store holds no dense frames.")
@click.option("--classes", default=None, type=click.Path(), help="Zero-shot: class names file of a new label set.")
@click.option("--pretrained", default=None, help="Local copy of the store's CLIP weights (for --classes and --online).")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the full report (and a confusion PNG beside it).")
@click.option("--online", is_flag=True, help="Run the frozen CLIP live instead of reading cached features.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), show_default=True)
@loader_options
@click.option("--device", default="auto", show_default=True)
@user_errors
def evaluate(json_path: str | None, **kw) -> None:
    """Score a checkpoint: multi-view top-1/top-5, per-class accuracy, zero-shot with --classes."""
    from pipelines.evaluate import EvalOptions, evaluate as run_eval, format_report

    _merge_workers(kw)
    report = run_eval(EvalOptions(json=json_path, **kw))
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_report(report))


@main.command()
@click.option("--model", default="ViT-B-16", show_default=True, help="open_clip model name or dist-tiny (random weights; only shapes matter).")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True, help="Sparse (CLIP) frames per view.")
@switch_options
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@user_errors
def profile(model: str, frames: int, as_json: bool, **switches) -> None:
    """Parameters and GFLOPs (1 multiply-add = 1 FLOP) of one view's DiST forward, split by part."""
    from dist_cache.flops import format_profile, profile_dist

    result = profile_dist(model, frames=frames, switches=DiSTSwitches(**_switch_values(switches)))
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result))


@main.command()
@click.option("--workdir", default="demo-run", show_default=True, type=click.Path(), help="Where data, stores and the run go.")
@click.option("--videos-per-class", default=48, type=click.IntRange(min=2), show_default=True)
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True)
@click.option("--seed", default=0, show_default=True)
@user_errors
def demo(workdir: str, videos_per_class: int, epochs: int, seed: int) -> None:
    """Generate motion-defined videos, extract with a tiny CLIP, train, evaluate: all on this CPU."""
    from pipelines.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=workdir, videos_per_class=videos_per_class, epochs=epochs, seed=seed), say=click.echo)


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--layers", default="all", show_default=True, help="Layers to keep: all, last:N, or a comma list of block indices.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default=None, help="Store features as this (default: the source's).")
@user_errors
def copy(src: str, dst: str, layers: str, dtype: str | None) -> None:
    """Copy a store (path or URL) to DST, optionally a layer subset or int8; a rerun resumes."""
    from pipelines.copy import copy_store

    s = copy_store(src, dst, layers=layers, dtype=dtype)
    click.echo(f"copied {s.copied} videos, skipped {s.skipped} (already there), failed {s.failed} -> {dst}"
               + ("" if s.complete else f" (incomplete: {s.pending_in_source} not extracted in the source yet)"))


def run() -> None:
    """The `dist-cache` console script: `main`, with bad flags reported like every other user error, in one line."""
    try:
        code = main(standalone_mode=False)
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
