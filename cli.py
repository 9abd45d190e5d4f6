"""`dist-cache`: the command-line entry point. Kept thin: parse flags, call a pipeline, print.

Every error a user can fix is a `UserError`; it prints as one line and exits 2, never a traceback.
Heavy imports (torch, open_clip, zarr) happen inside the commands so `--help` stays instant.

Commands are listed in workflow order, each with a one-line summary and its help ending with an example;
the conventions shared by the commands (--config, --storage-options, --seed, moved options) are in cli_options.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from cli_options import (
    GroupedOptions,
    Workflow,
    check_storage_options,
    config_option,
    example,
    moved_option,
    record_run_config,
    seed_option,
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
        from pipelines.train import PREEMPTED_EXIT, Preempted

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


def _count_or_auto(ctx, param, value):
    """`--decode-workers` (extract, train, eval): a process count, 0 (decode in this process, without the timeout),
    or auto (the usable cores less 2)."""
    if value is None or value == "auto":
        return value
    try:
        count = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is neither a count nor auto") from None
    if count < 0:
        raise click.BadParameter(f"{value!r} must not be negative")
    return count


# extract --help: its options under these headings (cli_options.GroupedOptions), the declarations left in any order.
EXTRACT_GROUPS = (
    ("Input", ("manifest", "classes", "manifest_format", "videos", "video_root", "decoder")),
    ("Model", ("model", "pretrained", "allow_random_weights", "layers", "precision", "templates", "device",
               "batch_frames")),
    ("Sampling", ("frames", "views", "split", "test_offsets", "seed", "scale", "flip_p", "flip_label_map",
                  "grayscale_p")),
    ("Storage", ("out", "storage_options", "dtype", "pca", "pca_sample", "codec", "dense_frames", "dense_gamma",
                 "frames_format", "jpeg_quality", "hash_videos")),
    ("Run", ("config", "decode_workers", "decode_timeout", "retry_failed", "repair", "deep", "strict",
             "dask_workers", "scheduler", "help")),
)
# `extract --videos DIR`: the files it takes (any case), in class folders as torchvision's ImageFolder has them.
VIDEO_FOLDER_HELP = ("A folder of videos, no manifest: DIR/<class>/.../<video>, each labelled with its class "
                     "folder (torchvision's ImageFolder convention), sorted by path; takes .mp4 .m4v .mov .mkv "
                     ".webm .avi .mpg .mpeg .wmv .flv .3gp .ogv. Instead of --manifest and --video-root.")


@click.group(cls=Workflow, order=COMMAND_ORDER,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="dist-cache")
def main() -> None:
    """DiST on cached CLIP features: extract once, train the temporal branch many times.

    The commands are listed in the order they are used; each one's --help ends with an example.
    """


@main.command(cls=GroupedOptions, option_groups=EXTRACT_GROUPS,
              **example("dist-cache extract --manifest train.csv --video-root /data/k400 --out k400-train.zarr "
                        "--views 2"))
@config_option
@click.option("--manifest", type=click.Path(),
              help="Video list: CSV path,label; Kinetics CSV; SSv2 JSON; or mmaction list (or --videos DIR).")
@click.option("--videos", type=click.Path(file_okay=False), default=None, metavar="DIR", help=VIDEO_FOLDER_HELP)
@click.option("--video-root", type=click.Path(), help="Directory the manifest's paths are relative to.")
@click.option("--out", required=True,
              help="Store to create or resume: a path or an fsspec URL (s3://...); new, empty, or an existing store.")
@storage_options_option()
@click.option("--model", default="ViT-B-16", show_default=True,
              help="Image tower: an open_clip ViT (ViT-B-16, ViT-B-16-SigLIP, EVA02-B-16, ViT-SO400M-14-SigLIP-384, "
                   "...), timm:NAME for a timm ViT (timm:vit_base_patch14_reg4_dinov2), dist-tiny, or a JSON config "
                   "(open_clip's, or {\"timm_model_name\": ..., \"timm_model_kwargs\": {\"img_size\": 224}}).")
@click.option("--pretrained", default="openai", show_default=True,
              help="The model's tag (open_clip's, e.g. webli; timm's, e.g. lvd142m), a local checkpoint path, or "
                   "none.")
@click.option("--allow-random-weights", is_flag=True, help="Permit --pretrained none (features then mean nothing).")
@click.option("--layers", default="all", show_default=True, help="all, last:N, or comma list of 0-based block indices.")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True,
              help="Sparse (CLIP) frames per view, T.")
@click.option("--views", default=None, type=click.IntRange(min=1),
              help="Views cached per video (train: augmented; test: temporal clips). Default: 1 for train, 3 for test.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="train: TSN + random resized crop + flip; test: uniform clips + centre crop.")
@seed_option("Seed for frame sampling and crops.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default="fp16", show_default=True,
              help="Stored feature (or PCA code) type: fp16, or int8 with per-channel scales fitted on a sample of "
                   "the videos and per-token scales (a compact store: 2x smaller, ~0.8 % error, robust to outlier "
                   "channels and tokens).")
@click.option("--pca", default=None, metavar="K|F",
              help="Compact store of PCA codes: per layer the top K components (e.g. 128) or the fewest keeping a "
                   "share F of the variance (e.g. 0.99), fitted first on a seeded sample of the videos (nothing "
                   "full-size is written); with --dtype int8, int8 codes. Training folds the projection into the "
                   "model. See `dist-cache copy --dry-run` to choose K on an existing store.")
@click.option("--pca-sample", default=None, type=click.IntRange(min=2),
              help="Videos the fit draws for --pca / --dtype int8 (20 % held out to measure the error). Default: "
                   "enough for 64 tokens per channel (about 40 ViT-B/16 videos).")
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
              help="Train flip probability (SSv2: keep it with --flip-label-map ssv2, as the reference, or use 0).")
@click.option("--flip-label-map", default=None, metavar="ssv2|FILE",
              help="Class pairs a horizontal flip swaps: a flipped train view of a class in a pair is labelled with "
                   "its partner. ssv2: the reference's three SSv2 pairs (left/right pulling, pushing, turning the "
                   'camera); or a JSON file listing class-name pairs, e.g. [["left", "right"]].')
@click.option("--test-offsets", type=click.Choice(["centred", "reference"]), default="centred", show_default=True,
              help="--split test: where clip c of K samples each of the T segments. centred: (c+0.5)/K, the clips "
                   "spread over the video; reference: DiST's code, (c+1)/K of each of the gamma*T dense segments "
                   "(gamma = --dense-gamma), rounded, the last clamped: 1/6, 1/3, 1/2 of each segment for 3 clips at "
                   "gamma 2, for numbers comparable with the paper's (docs/MODEL.md). Recorded in the store.")
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
@click.option("--frames-format", type=click.Choice(["raw", "jpeg"]), default="raw", show_default=True,
              help="How --dense-frames are stored: raw uint8 (2.4 MB per ViT-B/16 clip at gamma 2), or one JPEG per "
                   "frame (several times smaller; encoded by the store's writer threads, decoded by the loader's "
                   "reader threads or on the GPU).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None,
              help="JPEG quality of --frames-format jpeg, 1..100, recorded in the store. Default: 90.")
@click.option("--batch-frames", default=64, type=click.IntRange(min=1), show_default=True,
              help="Frames per CLIP forward pass.")
@click.option("--decode-workers", default="auto", show_default=True, callback=_count_or_auto,
              help="Decode processes: a count, auto (the usable cores less 2 for this process), or 0 (decode in "
                   "this process, one video at a time: no processes to start, and no --decode-timeout).")
@click.option("--decoder", type=click.Choice(["decord", "pyav"]), default=None,
              help="Video decoder (recorded in the store). Default: the decoder of the store at --out if there is "
                   "one, else pyav (it installs everywhere; README, \"Decoding and rendering\").")
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
                   "indexes: a few small reads per video), rewrite damaged metadata documents, video paths, labels "
                   "and text embeddings, then finalise (which rewrites the other tables).")
@click.option("--deep", is_flag=True,
              help="With --repair: read every stored chunk and check its crc32c (reads the whole store).")
@click.option("--strict", is_flag=True, help="Exit non-zero if any video failed.")
@click.option("--dask-workers", type=click.IntRange(min=1), default=None,
              help="Spread videos over a local dask cluster of N worker processes (each loads CLIP once).")
@moved_option("--workers", "--dask-workers (extract's local dask cluster)")
@click.option("--scheduler", default=None,
              help="Spread videos over the dask cluster at this address (tcp://host:8786).")
@user_errors
def extract(**kw) -> None:
    """Run the frozen CLIP over every video once; store each layer's tokens in a zarr store."""
    from dist_cache.manifests import load_flip_label_map
    from dist_cache.recipes import FLIP_LABEL_MAPS
    from pipelines.compact import parse_pca
    from pipelines.extract import ExtractOptions, extract as run_extract, unused_options

    check_storage_options(kw["storage_options"], kw["out"])
    _video_list(kw)
    kw["pca"] = parse_pca(kw["pca"])
    strict, workers, scheduler = kw.pop("strict"), kw.pop("dask_workers"), kw.pop("scheduler")
    kw["templates"] = tuple(kw["templates"])
    if kw["flip_label_map"] in FLIP_LABEL_MAPS:  # a built-in name wins over a file of that name
        kw["flip_label_map"] = FLIP_LABEL_MAPS[kw["flip_label_map"]]
    elif kw["flip_label_map"] is not None:
        kw["flip_label_map"] = load_flip_label_map(kw["flip_label_map"])
    opts = ExtractOptions(**kw)
    if workers is None and scheduler is None:
        summary = run_extract(opts)
    else:
        from pipelines.extract import extract_distributed

        summary = extract_distributed(opts, workers=workers, scheduler=scheduler)
    for what in summary.repaired:
        click.echo(f"repaired the store's {what}", err=True)
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
    if summary.notes.videos:
        click.echo(f"of the {summary.notes.videos} videos stored: {summary.notes.describe(kw['frames'])}")
    for unused in unused_options(opts):  # after the run: a flag that failed its own check was that one error
        click.echo(f"warning: {unused}", err=True)
    if summary.store_failed:
        first = f"; first in this run: {summary.failures[0][1]}" if summary.failures else ""
        click.echo(
            f"warning: {summary.store_failed} video(s) in the store failed to decode and are recorded as failed "
            f"(list them with `dist-cache info {kw['out']} --failed`){first}",
            err=True,
        )
        if strict:
            sys.exit(1)


def _video_list(kw: dict) -> None:
    """extract's videos: --manifest with --video-root, or --videos DIR (a folder manifest, its own root)."""
    from dist_cache.manifests import FOLDER_FORMAT

    folder = kw.pop("videos")
    if folder is None:
        if kw["manifest"] is None or kw["video_root"] is None:
            raise click.UsageError("pass --manifest FILE with --video-root DIR, or --videos DIR (a folder of "
                                   "class folders)")
        return
    if kw["manifest"] is not None or kw["video_root"] is not None:
        given = "--manifest" if kw["manifest"] is not None else "--video-root"
        raise click.UsageError(f"--videos {folder} is the list of videos and their root: drop {given}")
    if kw["manifest_format"] != "auto":
        raise click.UsageError(f"--videos {folder} is a folder of class folders, not a manifest: drop "
                               f"--manifest-format")
    kw.update(manifest=folder, video_root=folder, manifest_format=FOLDER_FORMAT)


@main.command(**example("dist-cache info k400-train.zarr --failed"))
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the full schema and counts as JSON.")
@click.option("--failed", is_flag=True, help="List failed videos with their errors.")
@storage_options_option()
@user_errors
def info(store: str, as_json: bool, failed: bool, storage_options: dict) -> None:
    """Summarise a store: backbone, layers, frames, sampling, progress, objects and size; DAMAGED if found so.

    On the way it checks the store's metadata, tables and text embeddings (not the videos' shards: verify does)."""
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
@seed_option("Seed for choosing the samples.")
@click.option("--all-videos", is_flag=True,
              help="Check every video under --video-root against the recorded facts (and sha256 if recorded).")
@click.option("--device", default="auto", show_default=True, help="Where to recompute: auto, cpu, cuda, cuda:1 ...")
@storage_options_option()
@user_errors
def verify(store: str, storage_options: dict, **kw) -> None:
    """Check a store is whole: metadata, tables, every sample's integrity; the videos and recomputed samples.

    Completeness, every metadata document, the tables and text embeddings, every sample's shards (--deep: every
    byte); with --video-root, the videos against their recorded facts and random samples recomputed."""
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


def loader_options(fn):
    """How train and eval read their input: reader threads, decode processes (and the moved --workers)."""
    for option in reversed([
        click.option("--decoder", type=click.Choice(["decord", "pyav"]), default=None,
                     help="Decode the dense frames with this decoder instead of the one the store records (e.g. pyav "
                          "where decord does not install). Checked first: the first videos must have the recorded "
                          "frame counts and sizes, and, where the store's decoder is installed too, frames within the "
                          "decoders' tolerance (README, \"Decoding and rendering\"); else refused with one line."),
        click.option("--read-threads", default=8, type=click.IntRange(min=1), show_default=True,
                     help="Threads reading features and stored frames into the batch buffers."),
        click.option("--decode-workers", default="auto", show_default=True, callback=_count_or_auto,
                     help="Processes decoding dense frames when the store holds none (auto: the cores less 2; "
                          "0: in the reader threads, without --decode-timeout)."),
        moved_option("--workers", "--decode-workers"),
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
@click.option("--out", required=True, type=click.Path(),
              help="Run directory: checkpoints, config.toml, metrics.jsonl, train.log, curves.")
@click.option("--val-cache", default=None,
              help="Validation store (test split; a train split is refused, as by eval); best.pt is chosen by its "
                   "top-1, and eval warns when best.pt is scored on it or a copy of it.")
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
              help="Start from everything the reference sets for this dataset: 36 epochs, 6 of warm-up, lr 3.2e-4, "
                   "weight decay 1e-4, batch 32, label smoothing 0.1, no gradient clipping, and 4 AdaPooling blocks "
                   "(k400) or 2 (ssv2). Flags given explicitly override it; the recipe line printed names every "
                   "deviation from the reference (flags, the store's views, what caching changes). ssv2 refuses a "
                   "store flipped without --flip-label-map. Default: none, i.e. the defaults below.")
@switch_options
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True,
              help="Passes over the training store.")
@click.option("--batch-size", default=32, type=click.IntRange(min=1), show_default=True,
              help="Global batch: clips per optimiser step, split among the --nproc processes.")
@click.option("--lr", default=3.2e-4, type=click.FloatRange(min=0, min_open=True), show_default=True,
              help="Peak learning rate.")
@click.option("--warmup-epochs", default=5.0, type=click.FloatRange(min=0), show_default=True,
              help="Epochs of linear warm-up (then the reference's cosine to 0 over all epochs).")
@click.option("--weight-decay", default=1e-4, type=click.FloatRange(min=0), show_default=True,
              help="AdamW weight decay, on weight matrices only.")
@click.option("--label-smoothing", default=0.1, type=click.FloatRange(0, 1, max_open=True), show_default=True,
              help="Label smoothing of the cross-entropy.")
@click.option("--clip-grad", default=1.0, type=click.FloatRange(min=0), show_default=True,
              help="Max gradient norm; 0 disables (the reference does not clip; --recipe sets 0).")
@seed_option("Seed of the initial weights and of every epoch's view choice and order.")
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
    from dist_cache.recipes import REFERENCE_OPTIONS, check_training_store, effective_settings, method_deviations
    from pipelines.train import (
        TrainOptions,
        online_jpeg_warning,
        preflight,
        quiet_unless_main,
        train as run_train,
        train_ranks,
    )

    quiet_unless_main()  # under torchrun, rank 0 alone reports
    check_storage_options(kw["storage_options"], kw["cache"], kw["val_cache"])
    ctx = click.get_current_context()
    typed = {k: v for k, v in _switch_values(kw).items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    given = [k for k in REFERENCE_OPTIONS if ctx.get_parameter_source(k) != ParameterSource.DEFAULT]
    settings = effective_settings(recipe, typed, {k: kw[k] for k in REFERENCE_OPTIONS}, given)
    kw.update(settings.options)
    switches = settings.switches
    opts = TrainOptions(switches=switches, recipe=recipe, **{**kw, "report_to": tuple(kw["report_to"])})
    checked = preflight(opts, nproc)  # a bad flag or store is the only line printed; nothing is written before
    record_run_config(ctx, opts, {**dataclasses.asdict(switches), **settings.options})
    schema = checked.store.schema
    more = [] if recipe is None else [
        *check_training_store(recipe, schema.sampling, schema.split, checked.store.url),
        *method_deviations(online=opts.online, reaugment=opts.reaugment, mixup=opts.mixup, cutmix=opts.cutmix,
                           feature_mixup=opts.feature_mixup, feature_cutmix=opts.feature_cutmix)]
    with _run_log(opts):
        click.echo(settings.line(more))
        if opts.warmup_epochs >= opts.epochs and _main_rank():
            click.echo(f"warning: --warmup-epochs {opts.warmup_epochs:g} >= --epochs {opts.epochs}: the learning rate "
                       f"rises for the whole run and never reaches --lr {opts.lr:g}; use fewer warm-up epochs",
                       err=True)
        gamma = switches.gamma
        if checked.frames == "stored":
            click.echo(f"dense frames: read from the store (gamma {gamma} of its stored {checked.store.dense_gamma})")
            lossy = online_jpeg_warning(checked.store, opts.online, checked.frames)
            if lossy:
                click.echo(f"warning: {lossy}", err=True)
        elif checked.frames in ("decoded", "reaugmented"):
            fresh = "a fresh view each epoch, " if checked.frames == "reaugmented" else ""
            click.echo(f"dense frames: {fresh}decoded from {opts.video_root} with "
                       f"{opts.decoder or checked.store.schema.preprocess['decoder']['name']}")
            if checked.decoder_note:
                click.echo(checked.decoder_note)
        result = run_train(opts) if nproc == 1 else train_ranks(opts, nproc)
        best = f", best val top-1 {result.best_top1:.2%}" if result.best_top1 is not None else ""
        click.echo(f"trained {result.steps} steps over {result.epochs} epochs{best}; checkpoints in {result.out}")
        if result.skipped_failed_samples:
            click.echo(f"skipped {result.skipped_failed_samples} failed samples of the store", err=True)


def _main_rank() -> bool:
    """This process reports: the one the user started, or rank 0 under torchrun (whose other ranks keep quiet)."""
    return not int(os.environ.get("RANK", "0"))


def _run_log(opts) -> contextlib.AbstractContextManager:
    """RUN/train.log, appended to by the process that reports."""
    from pipelines.train import RunLog, run_heading

    if not _main_rank():
        return contextlib.nullcontext()
    return RunLog(Path(opts.out) / "train.log", run_heading(opts.resume))


@main.command(name="eval",
              **example("dist-cache eval --checkpoint runs/b16/best.pt --cache k400-val.zarr --video-root /data/k400 "
                        "--report report.json"))
@config_option
@click.option("--checkpoint", required=True, type=click.Path(),
              help="A checkpoint written by train (best.pt or last.pt).")
@click.option("--cache", required=True,
              help="Evaluation store: a test split (3 clips x 1 crop by default). A train-split store is refused: its "
                   "views are random crops, some relabelled by a flip, which per-video scoring would count as wrong.")
@storage_options_option()
@click.option("--video-root", default=None, type=click.Path(),
              help="Where the store's videos are: needed only when the store holds no dense frames.")
@click.option("--zero-shot-classes", default=None, type=click.Path(),
              help="Zero-shot: class names file of a new label set (txt, one per line, or JSON), embedded with "
                   "the tower's text side and scored as the tower's model scores (CLIP: softmax; SigLIP: sigmoid "
                   "with its bias); refused for a tower without a text side (DINOv2).")
@moved_option("--classes", "--zero-shot-classes (eval's; --classes is extract's class list)")
@click.option("--pretrained", default=None,
              help="Local copy of the store's CLIP weights (for --zero-shot-classes and --online).")
@click.option("--report", default=None, type=click.Path(dir_okay=False),
              help="Write the full report as JSON (and a confusion PNG beside it).")
@moved_option("--json", "--report FILE (--json is info's and profile's flag for JSON on stdout)")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Write each video's prediction as a line of JSON (JSONL): its video, label, and top-5 classes "
                   "with their scores (softmax averaged over its views).")
@click.option("--online", is_flag=True, help="Run the frozen CLIP live instead of reading cached features.")
@click.option("--batch-size", default=16, type=click.IntRange(min=1), show_default=True, help="Clips per forward pass.")
@loader_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
@user_errors
def evaluate(report: str | None, zero_shot_classes: str | None, **kw) -> None:
    """Score a checkpoint: multi-view top-1/top-5, per-class accuracy, zero-shot with --zero-shot-classes."""
    from pipelines.train import EvalOptions, evaluate as run_eval, format_report

    check_storage_options(kw["storage_options"], kw["cache"])
    report = run_eval(EvalOptions(json=report, classes=zero_shot_classes, **kw))
    for warning in report["warnings"]:
        click.echo(f"warning: {warning}", err=True)
    click.echo(format_report(report))


@main.command(**example("dist-cache profile --model ViT-B-16 --frames 8 --gamma 4"))
@click.option("--model", default="ViT-B-16", show_default=True,
              help="Image tower, as extract's --model: an open_clip ViT (ViT-L-14, ViT-B-16-SigLIP, EVA02-B-16, "
                   "...), timm:NAME, dist-tiny or a JSON config (built on the meta device: only shapes matter).")
@click.option("--frames", default=8, type=click.IntRange(min=1), show_default=True,
              help="Sparse (CLIP) frames per view.")
@switch_options
@click.option("--pca-k", default=None, type=click.IntRange(min=1),
              help="Also count the cached branch on a compact store's PCA codes of K components per layer (the "
                   "projection folded into FC_l and the class-token Linear) against the branch on tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@user_errors
def profile(model: str, frames: int, as_json: bool, pca_k: int | None, **switches) -> None:
    """Parameters and GFLOPs (1 multiply-add = 1 FLOP) of one view's DiST forward, split by part."""
    from dist_cache.flops import format_profile, profile_dist

    result = profile_dist(model, frames=frames, switches=DiSTSwitches(**_switch_values(switches)), pca_k=pca_k)
    click.echo(json.dumps(result, indent=2) if as_json else format_profile(result))


@main.command(**example("dist-cache demo --workdir /tmp/dist-demo --epochs 10"))
@click.option("--workdir", default="demo-run", show_default=True, type=click.Path(),
              help="Where data, stores and the run go.")
@click.option("--videos-per-class", default=48, type=click.IntRange(min=2), show_default=True,
              help="Generated clips per class (4 classes); fewer run faster and learn less.")
@click.option("--epochs", default=30, type=click.IntRange(min=1), show_default=True, help="Training epochs.")
@seed_option("Seed of the generated videos, the extraction and the training.")
@user_errors
def demo(workdir: str, videos_per_class: int, epochs: int, seed: int) -> None:
    """Generate motion-defined videos, extract with a tiny CLIP, train, evaluate: all on this CPU."""
    from pipelines.demo import DemoOptions, run_demo

    run_demo(DemoOptions(workdir=workdir, videos_per_class=videos_per_class, epochs=epochs, seed=seed), say=click.echo)


@main.command(**example("dist-cache copy k400-train.zarr k400-pca.zarr --pca 0.99 --dtype int8 --dry-run"))
@click.argument("src")
@click.argument("dst", required=False)
@click.option("--layers", default="all", show_default=True,
              help="Layers to keep: all, last:N, or a comma list of block indices.")
@click.option("--dtype", type=click.Choice(["fp16", "int8"]), default=None,
              help="Store features (or PCA codes) as this (default: the source's). int8 is a compact store: "
                   "per-channel and per-token scales fitted on a sample of SRC (about 1 % error, 2x smaller).")
@click.option("--pca", default=None, metavar="K|F",
              help="Compact store of PCA codes: per layer the top K components (e.g. 128), or the fewest keeping a "
                   "share F of the variance (e.g. 0.99), fitted on a sample of SRC; with --dtype int8, int8 codes. "
                   "Training folds the projection into the model. Without --pca and --dtype a compact SRC's codes "
                   "are copied as stored.")
@click.option("--pca-sample", default=None, type=click.IntRange(min=2),
              help="Videos of SRC the fit draws (20 % held out to measure the error). Default: enough for 64 tokens "
                   "per channel (about 40 ViT-B/16 videos).")
@click.option("--dry-run", is_flag=True,
              help="Fit on a sample of SRC and print bytes per clip view, the size of a Kinetics-400-sized store and "
                   "the per-layer error on held-out videos; write nothing (DST is not touched).")
@click.option("--drop-dense-frames", is_flag=True,
              help="Leave the source's dense frames out of the copy (training then decodes them from the videos).")
@moved_option("--frames", "--drop-dense-frames (copy's; --frames is a frame count in extract and profile)")
@click.option("--frames-format", type=click.Choice(["raw", "jpeg"]), default=None,
              help="Store the kept dense frames as this (default: as the source does). raw -> jpeg encodes each frame "
                   "(several times smaller); JPEG frames of the same quality are copied as stored; JPEG is never "
                   "turned back into raw (decoding does not restore the frames).")
@click.option("--jpeg-quality", type=click.IntRange(1, 100), default=None,
              help="JPEG quality of the copy's frames, 1..100. Default: the source's, or 90 for raw frames. Another "
                   "quality than a JPEG source's decodes and encodes again, losing more.")
@click.option("--videos-per-shard", default=1, type=click.IntRange(min=1), show_default=True,
              help="Pack N videos into each shard (and one record per N): ~3/N objects per video, read-only. "
                   "Written to an object store, a shard is one upload held in memory.")
@storage_options_option(help="fsspec options for SRC and DST where they are URLs, as JSON or @FILE (see "
                             "--src-storage-options, --dst-storage-options to give each its own).")
@storage_options_option(help="fsspec options for SRC alone (JSON or @FILE).", name="--src-storage-options")
@storage_options_option(help="fsspec options for DST alone (JSON or @FILE).", name="--dst-storage-options")
@user_errors
def copy(src: str, dst: str, storage_options: dict, src_storage_options: dict, dst_storage_options: dict,
         drop_dense_frames: bool, **kw) -> None:
    """Copy a store to DST: some layers, compact (int8, PCA codes), JPEG or no frames, or packed; resumable."""
    from pipelines.compact import parse_pca
    from pipelines.copy import copy_dry_run, copy_store
    from storage.location import is_local

    kw["pca"] = parse_pca(kw["pca"])
    kw["frames"] = "drop" if drop_dense_frames else "keep"
    src_options = src_storage_options or ({} if is_local(src) else storage_options)
    if kw.pop("dry_run"):
        check_storage_options(src_storage_options or storage_options, src)
        kw.pop("videos_per_shard")
        click.echo(copy_dry_run(src, src_options=src_options, **kw))
        return
    if dst is None:
        raise CommandError("copy needs DST (or --dry-run)")
    check_storage_options(storage_options, src, dst)
    check_storage_options(src_storage_options, src, flag="--src-storage-options")
    check_storage_options(dst_storage_options, dst, flag="--dst-storage-options")
    dst_options = dst_storage_options or ({} if is_local(dst) else storage_options)
    s = copy_store(src, dst, src_options=src_options, dst_options=dst_options, **kw)
    held = f", {s.held_back} more wait for them to fill their shards" if s.held_back else ""
    click.echo(f"copied {s.copied} videos, skipped {s.skipped} (already there), failed {s.failed} -> {dst}"
               + ("" if s.complete else f" (incomplete: {s.pending_in_source} not extracted in the source yet{held})"))


def run() -> None:
    """The `dist-cache` console script: `main`, with bad flags reported like every other user error, in one line."""
    from dist_cache.logs import warnings_above_bars

    warnings_above_bars()
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
