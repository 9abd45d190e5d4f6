"""Stage one: run the frozen CLIP once over every video's sparse frames and store every layer's tokens.

Each stage has its own flow, so the slowest one sets the pace and the others keep up:
- decode workers (processes, killable on a hang) probe, plan, decode and render each video, running ahead of
  the forward by a bounded number of videos;
- this process's main thread batches rendered videos and enqueues each batch's forward, cast and copy to
  pinned host memory as soon as the batch is full (`pipelines.extract.device`), without waiting for the device;
- writer threads store each video (its shards, then its completion record) straight from those host
  buffers, which return to a bounded ring when the batch's last video is written.
A rerun skips every video that has a record, so kill -9 at any point loses only unrecorded work. A video that
does not decode, or whose activations are not finite, is recorded as failed and the run goes on; a store
that cannot be written (disk full, read-only, I/O error), or a machine that fails (decode workers that keep
dying, memory exhausted: `dist_cache.errors.machine_failure`), stops the run with one line, resumable.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
import string
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dist_cache.backbone import Backbone, load_backbone
from dist_cache.backbone_config import resolve_layers
from dist_cache.decode_pool import DecodePool, InProcessDecoder, open_pool
from dist_cache.decoders import DECODERS, DecodeError, get_decoder
from dist_cache.devices import resolve_device
from dist_cache.errors import UserError, first_line, machine_error, machine_failure
from dist_cache.manifests import FOLDER_FORMAT, Manifest, flip_partners, load_manifest
from dist_cache.sampling import DENSE_GAMMAS, TEST_OFFSETS
from dist_cache.transforms import PREPROCESS
from pipelines.compact import encoding_section, with_encoding
from pipelines.compact_device import DeviceEncoding
from pipelines.extract.device import DeviceForward, LaunchedBatch
from pipelines.extract.prepare import PreparedVideo, RenderSpec, prepare_video
from pipelines.extract.repair import Damage, damaged_videos
from pipelines.video_notes import VideoNotes
from storage import StoreSchema, StoreWriter, frames_codec
from storage.remote import open_location
from storage.root import read_attrs
from storage.schema import ATTR_KEY, DTYPES, FORMAT_VERSION, PRECISIONS, SPLITS

# Views per video when --views is not given: one augmented view to train on; 3 temporal clips x 1 crop to test
# (the reference's evaluation protocol, what `eval` expects).
DEFAULT_VIEWS = {"train": 1, "test": 3}
# Each video owns its shards, so writers never contend. Several keep the disk busy: each one checks and
# checksums a chunk while its I/O thread writes the previous one.
WRITER_THREADS = 4
DECODE_PRELOAD = ("pipelines.extract.prepare",)
# If this many videos fail to decode before any is stored, the input is wrong (a wrong --video-root, a garbage
# manifest): stop before recording hundreds of thousands of failures.
FIRST_FAILURES_LIMIT = 100


def first_failures_error(count: int, first_error: str, then: str = "") -> UserError:
    """The input is wrong: the first `count` videos all failed to decode. `then`: what to do after fixing it."""
    return UserError(f"the first {count} videos all failed to decode (first error: "
                     f"{first_error.splitlines()[0][:300]}): check --video-root and --manifest{then}")
MAX_SEED = 2**63 - 1


def default_decoder(out: str, storage_options: dict | None = None) -> str:
    """--decoder's default: the decoder of the store at `out` if there is one (a rerun resumes it as it was
    extracted), else PyAV: it installs everywhere, and costs the CPU time per video decord does (README, "Decoding
    and rendering"), while decord's FFmpeg 4 cannot open AV1 and ignores some display matrices."""
    if not out:
        return "pyav"
    try:
        attrs = read_attrs(open_location(out, storage_options or None)) or {}
    except Exception:  # a peek: StoreWriter.open, which runs next, says what is wrong with the location
        attrs = {}
    schema = attrs.get(ATTR_KEY)
    preprocess = schema.get("preprocess") if isinstance(schema, dict) else None
    decoder = preprocess.get("decoder") if isinstance(preprocess, dict) else None
    name = decoder.get("name") if isinstance(decoder, dict) else None
    return name if name in DECODERS else "pyav"


@dataclass
class ExtractOptions:
    manifest: str
    video_root: str
    out: str
    model: str = "ViT-B-16"
    pretrained: str = "openai"
    allow_random_weights: bool = False
    layers: str = "all"
    frames: int = 8
    views: int | None = None  # None: DEFAULT_VIEWS[split]
    split: str = "train"
    seed: int = 0
    dtype: str = "fp16"  # fp16, or int8: a compact store (per-channel and per-token scales, fitted)
    pca: int | float | None = None  # a compact store of PCA codes: K components, or a share of the variance
    pca_sample: int | None = None  # videos the fit draws (None: auto, storage/pca.py)
    codec: str = "none"
    classes: str | None = None
    manifest_format: str = "auto"  # or manifests.FOLDER_FORMAT: `manifest` is a folder of class folders (--videos)
    templates: tuple[str, ...] = ("{}",)
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    grayscale_p: float = 0.2
    # Class-name pairs a horizontal flip swaps (dist_cache.manifests.load_flip_label_map); train split only.
    flip_label_map: tuple[tuple[str, str], ...] | None = None
    dense_frames: bool = False  # also store each view's dense frames, rendered, for the largest gamma trained
    dense_gamma: int = 2
    # test split: where the clips sample their segments (dist_cache.sampling.TEST_OFFSETS); reference's at dense_gamma
    test_offsets: str = "centred"
    frames_format: str = "raw"  # how the dense frames are stored: raw uint8, or JPEG (storage.frames_codec)
    jpeg_quality: int | None = None  # with frames_format jpeg; None: frames_codec.DEFAULT_QUALITY
    batch_frames: int = 64
    decode_workers: int | str = "auto"  # a count, or "auto" (dist_cache.decode_pool.auto_workers)
    decode_timeout: float = 120.0
    decoder: str | None = None  # a dist_cache.decoders name; None: default_decoder() (the store's, else pyav)
    precision: str | None = None  # how CLIP runs; None: fp16 on CUDA, fp32 elsewhere
    device: str = "auto"
    hash_videos: bool = False  # record each file's sha256 so verify can tell a replaced copy
    retry_failed: bool = False  # extract videos recorded as failed again (e.g. after fixing the files)
    repair: bool = False  # re-extract done videos whose stored bytes fail the integrity check
    deep: bool = False  # with repair: read every chunk and check its crc32c, not only the shard indexes
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.views is None:
            self.views = DEFAULT_VIEWS.get(self.split, 1)
        if self.decoder is None:
            self.decoder = default_decoder(self.out, self.storage_options)


@dataclass
class ExtractSummary:
    stored: int = 0  # videos written by this run
    skipped: int = 0  # videos already done before this run
    failed: int = 0  # videos that failed in this run
    bytes_written: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video, error), this run
    notes: VideoNotes = field(default_factory=VideoNotes)  # short, variable-rate and turned videos stored by this run
    complete: bool = False
    store_failed: int = 0  # failed videos in the whole store, earlier runs included
    damaged: list[Damage] = field(default_factory=list)  # done videos found damaged (--repair), redone by this run
    repaired: list[str] = field(default_factory=list)  # the store's own arrays or metadata rewritten (--repair)

    def merge(self, other: ExtractSummary) -> None:
        self.stored += other.stored
        self.failed += other.failed
        self.bytes_written += other.bytes_written
        self.failures.extend(other.failures)
        self.notes.merge(other.notes)

    def finalized(self, writer: StoreWriter, started: float) -> ExtractSummary:
        """This run's summary once the store is finalised (complete unless videos are pending)."""
        final = writer.finalize()
        self.complete, self.store_failed = bool(final["complete"]), int(final["failed"])
        self.seconds = time.monotonic() - started
        return self


def check_template(template: str) -> None:
    """A prompt template holds exactly one `{}`, where the class name goes; anything else would give every class
    the same text (no `{}`) or fail on formatting (`{x}`)."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:
        fields = []
    if fields != [("", "", None)]:
        raise UserError(f"--template {template!r}: a template needs exactly one {{}} where the class name goes "
                        f"(write {{{{ and }}}} for literal braces), e.g. 'a video of {{}}.'")


def check_options(opts: ExtractOptions) -> None:
    """Reject bad flag values before anything is loaded or written."""
    choices = {"--split": (opts.split, SPLITS), "--dtype": (opts.dtype, DTYPES), "--decoder": (opts.decoder, DECODERS),
               "--dense-gamma": (opts.dense_gamma, DENSE_GAMMAS), "--test-offsets": (opts.test_offsets, TEST_OFFSETS),
               "--precision": (opts.precision, (None, *PRECISIONS))}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UserError(f"{flag} {value}: must be one of {', '.join(str(a) for a in allowed if a is not None)}")
    if opts.frames < 1 or opts.views < 1 or opts.batch_frames < 1:
        raise UserError("--frames, --views and --batch-frames must be at least 1")
    if not (isinstance(opts.seed, int) and 0 <= opts.seed <= MAX_SEED):
        raise UserError(f"--seed {opts.seed}: must be an integer in [0, 2^63)")
    check_frames_format(opts.frames_format, opts.jpeg_quality, opts.dense_frames)
    if opts.decode_workers != "auto" and not (isinstance(opts.decode_workers, int) and opts.decode_workers >= 0):
        raise UserError(f"--decode-workers {opts.decode_workers}: must be auto, or a count (0: in this process)")
    if opts.pca is not None and not (
            (isinstance(opts.pca, int) and not isinstance(opts.pca, bool) and opts.pca >= 1)
            or (isinstance(opts.pca, float) and 0.0 < opts.pca < 1.0)):
        raise UserError(f"--pca {opts.pca}: give a number of components (e.g. 128) or a share of the variance to "
                        f"keep (e.g. 0.99)")
    if opts.pca_sample is not None and opts.pca_sample < 2:
        raise UserError(f"--pca-sample {opts.pca_sample}: the fit needs at least 2 videos (one is held out)")
    if opts.deep and not opts.repair:
        raise UserError("--deep is a depth of --repair's check: add --repair")
    if not opts.templates:
        raise UserError("--template: give at least one template, e.g. '{}'")
    for template in opts.templates:
        check_template(template)
    if not Path(opts.video_root).is_dir():
        flag = "--videos" if opts.manifest_format == FOLDER_FORMAT else "--video-root"
        raise UserError(f"{flag} {opts.video_root}: no such directory")


def unused_options(opts: ExtractOptions) -> list[str]:
    """Flags given that this split does not use, each as a warning line (not an error: one config file or command
    line often serves both splits). Train views are random crops, so test clips' offsets do not apply to them; test
    views are never flipped, so no label is swapped."""
    unused = []
    if opts.split == "train" and opts.test_offsets != "centred":
        unused.append(f"--test-offsets {opts.test_offsets} places --split test's clips; this --split train store's "
                      "views are random crops, so it had no effect (extract the validation store with it)")
    if opts.split == "test" and opts.flip_label_map:
        unused.append("--flip-label-map relabels flipped training views; --split test never flips a view, so it had "
                      "no effect here")
    return unused


def check_frames_format(frames_format: str, quality: int | None, dense_frames: bool) -> None:
    """--frames-format and --jpeg-quality (extract's; copy checks its own): JPEG stores dense frames, so it needs
    them, and a quality belongs to JPEG."""
    if frames_format not in frames_codec.FORMATS:
        raise UserError(f"--frames-format {frames_format}: must be one of {', '.join(frames_codec.FORMATS)}")
    if frames_format == frames_codec.JPEG and not dense_frames:
        raise UserError("--frames-format jpeg is how the dense frames are stored: add --dense-frames")
    if quality is not None and frames_format != frames_codec.JPEG:
        raise UserError(f"--jpeg-quality {quality} applies to JPEG frames: add --frames-format jpeg")
    if quality is not None and not 1 <= quality <= 100:
        raise UserError(f"--jpeg-quality {quality}: must be 1..100 (default {frames_codec.DEFAULT_QUALITY})")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """--precision's default: fp16 autocast on CUDA (the GPU's fast path), fp32 elsewhere."""
    if precision is not None:
        return precision
    return "fp16" if device.type == "cuda" else "fp32"


def build_schema(opts: ExtractOptions, backbone: Backbone, layers: list[int], manifest: Manifest) -> StoreSchema:
    """Everything a stranger needs to reuse or reproduce the features; the views are planned from its `sampling`
    (RenderSpec.of_schema), where only training views are flipped (test views are centre crops, never mirrored)."""
    described = backbone.describe()
    train = opts.split == "train"
    schema = StoreSchema.from_json({
        "format_version": FORMAT_VERSION,
        "backbone": described,
        "preprocess": {**PREPROCESS, "decoder": get_decoder(opts.decoder).info(), "image_size": backbone.image_size,
                       "mean": list(backbone.mean), "std": list(backbone.std),
                       # Part of the compat schema, so a resume never mixes hashed and unhashed records.
                       "video_hash": "sha256" if opts.hash_videos else "none"},
        "layers": layers,
        "num_frames": opts.frames,
        "views_per_video": opts.views,
        "split": opts.split,
        "dtype": opts.dtype,
        "codec": opts.codec,
        "precision": opts.precision,
        "tokens": backbone.num_tokens,
        "width": backbone.width,
        "sampling": {
            "policy": "tsn-segments" if train else "uniform-clips",
            "seed": opts.seed,
            "scale": list(opts.scale),
            "ratio": list(opts.ratio),
            "flip_p": opts.flip_p if train else 0.0,
            "grayscale_p": opts.grayscale_p if train else 0.0,
            "rng": "numpy default_rng([seed, video_index])",
            "dense_rule": "dense[g*k+j] = min(num_frames-1, sparse[k] + floor(j*gap_k/g)), j < g, "
                          "gap_k = sparse[k+1] - sparse[k], the last slot's gap = window",
            "flip_label_map": [list(p) for p in opts.flip_label_map] if opts.flip_label_map and train else None,
            # Recorded only when not centred, so stores from before the option keep resuming (no key: centred).
            **({"test_offsets": "reference", "test_offsets_gamma": opts.dense_gamma}
               if not train and opts.test_offsets == "reference" else {}),
        },
        "dense_frames": frames_codec.section(opts.dense_gamma, opts.frames_format, opts.jpeg_quality)
        if opts.dense_frames else None,
        "num_videos": len(manifest.videos),
        "class_names": manifest.class_names,
        "text": {"templates": list(opts.templates), "source": backbone.text_source},
    })
    # --dtype int8 or --pca: a compact store (format 3), fitted when the store is created (extract/fit.py)
    return with_encoding(schema, encoding_section(opts.pca, opts.dtype, opts.pca_sample, opts.seed))


def fit_here(opts: ExtractOptions, backbone: Backbone, layers: list[int], manifest: Manifest, device: torch.device,
             pool: DecodePool | None, schema: StoreSchema) -> Any:
    """The fit pass of a compact store, in this process (its decode workers, or a pool made for it)."""
    from pipelines.extract.fit import fit_on_device

    own = pool is None
    pool = pool or DecodePool(opts.decode_workers, opts.decode_timeout, preload=DECODE_PRELOAD)
    try:
        return fit_on_device(opts, backbone, layers, manifest, device, pool, schema, RenderSpec.of_schema(schema))
    finally:
        if own:
            pool.close()


def load_for_fit(options: dict[str, Any]) -> tuple[ExtractOptions, Backbone, list[int], Manifest, torch.device,
                                                  StoreSchema]:
    """What a fit pass needs, loaded from extract's options (a dask worker fitting for its client)."""
    opts = ExtractOptions(**options)
    check_options(opts)
    manifest = load_manifest(opts.manifest, video_root=opts.video_root, classes=opts.classes, fmt=opts.manifest_format)
    device = resolve_device(opts.device)
    opts = dataclasses.replace(opts, precision=resolve_precision(opts.precision, device))
    backbone = load_backbone(opts.model, opts.pretrained, allow_random_weights=opts.allow_random_weights,
                             device=device, precision=opts.precision)
    layers = resolve_layers(opts.layers, backbone.num_layers)
    return opts, backbone, layers, manifest, device, build_schema(opts, backbone, layers, manifest)


class _RunState:
    """What one `Extractor.run` shares between its main thread and its writer threads: the summary, the
    progress callback, the failures held back until the first video is stored, and the error that stops it."""

    def __init__(self, extractor: Extractor, on_progress: Callable[[ExtractSummary], None]):
        self.extractor = extractor
        self.summary = ExtractSummary()
        self.on_progress = on_progress
        self.lock = threading.Lock()
        self.held: list[tuple[int, str]] = []  # decode failures not yet recorded: nothing is stored yet
        self.error: BaseException | None = None

    def stop(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error

    @property
    def stopped(self) -> bool:
        return self.error is not None

    def raise_if_stopped(self) -> None:
        if self.error is not None:
            raise self.error

    def _record(self, video_index: int, message: str) -> None:
        """Write a failure record (lock held)."""
        self.extractor.writer.write_failure(video_index, message)
        self.summary.failed += 1
        self.summary.failures.append((self.extractor.manifest.videos[video_index], message))
        self.on_progress(self.summary)

    def decode_failed(self, video_index: int, err: BaseException) -> None:
        """A video that did not decode. Until one video is stored, failures are held back: if the first
        FIRST_FAILURES_LIMIT all fail, the input is wrong, and the store is left without their records."""
        message = str(err) if isinstance(err, DecodeError) else f"{type(err).__name__}: {first_line(err, 400)}"
        with self.lock:
            if self.summary.stored:
                self._record(video_index, message)
                return
            self.held.append((video_index, message))
            if len(self.held) >= FIRST_FAILURES_LIMIT:
                self.error = self.error or first_failures_error(len(self.held), self.held[0][1])

    def write_failed(self, video_index: int, message: str) -> None:
        with self.lock:
            self._record(video_index, message)

    def stored(self, nbytes: int, facts: dict) -> None:
        with self.lock:
            self.summary.stored += 1
            self.summary.bytes_written += nbytes
            self.summary.notes.add(facts, self.extractor.opts.frames)
            self._release_held()
            self.on_progress(self.summary)

    def _release_held(self) -> None:
        held, self.held = self.held, []
        for video_index, message in held:
            self._record(video_index, message)

    def finish(self) -> ExtractSummary:
        """Record the failures still held (a run that stored nothing, under the limit), or raise what stopped it."""
        self.raise_if_stopped()
        with self.lock:
            self._release_held()
        return self.summary


@dataclass
class Extractor:
    """A loaded backbone bound to one open store: turns video indices into stored samples."""

    opts: ExtractOptions
    backbone: Backbone
    layers: list[int]
    manifest: Manifest
    writer: StoreWriter
    device: torch.device
    # Class index -> the label of its flipped views (--flip-label-map); empty: labels never change.
    flip_partners: dict[int, int] = field(default_factory=dict)
    # Kept for the extractor's life: a dask worker runs many chunks, and each new pool would spawn
    # (and import torch in) fresh decode processes.
    decode_pool: DecodePool | InProcessDecoder | None = field(default=None, repr=False)

    @classmethod
    def open(cls, opts: ExtractOptions, *, decode: bool = True, fit: Any = None) -> Extractor:
        """Validate everything, then create or reopen the store. Every user error happens before a write.

        `decode=False` for a process that only creates the store (a dask client): no decode workers, and CLIP's
        visual tower is never run there (so its precision need not suit this process's device). A compact store
        is fitted (`pipelines.extract.fit`) only if it has to be created: here, or by `fit` (a dask client passes
        one that runs the fit on a worker)."""
        check_options(opts)
        manifest = load_manifest(opts.manifest, video_root=opts.video_root, classes=opts.classes,
                                 fmt=opts.manifest_format)
        partners = flip_partners(opts.flip_label_map, manifest.class_names) if opts.flip_label_map else {}
        # Decode workers spend seconds importing torch: start them now, so that happens while CLIP loads.
        pool = open_pool(opts.decode_workers, opts.decode_timeout, preload=DECODE_PRELOAD) if decode else None
        try:
            device = resolve_device(opts.device)
            opts = dataclasses.replace(opts, precision=resolve_precision(opts.precision, device))
            backbone = load_backbone(opts.model, opts.pretrained, allow_random_weights=opts.allow_random_weights,
                                     device=device, precision=opts.precision if decode else "fp32")
            layers = resolve_layers(opts.layers, backbone.num_layers)
            schema = build_schema(opts, backbone, layers, manifest)
            if fit is None and schema.encoding is not None:
                fit = functools.partial(fit_here, opts, backbone, layers, manifest, device, pool, schema)
            writer = StoreWriter.open(
                opts.out,
                schema=schema,
                videos=manifest.videos,
                labels=manifest.labels,
                text_features=backbone.class_embeddings(manifest.class_names, list(opts.templates)),
                storage_options=opts.storage_options or None,
                repair=opts.repair,
                fit=fit,
            )
        except BaseException:
            if pool is not None:
                pool.close(kill=True)
            raise
        return cls(opts, backbone, layers, manifest, writer, device, partners if opts.split == "train" else {}, pool)

    @property
    def videos_per_batch(self) -> int:
        """Videos per forward pass: at least --batch-frames frames, whole videos."""
        return max(1, math.ceil(self.opts.batch_frames / (self.opts.views * self.opts.frames)))

    @functools.cached_property
    def forward(self) -> DeviceForward:
        schema = self.writer.schema
        compact = schema.encoding is not None
        int8 = self.opts.dtype == "int8" and not compact
        # A compact store is encoded on the device from the encoder's own values (fp16 only where CLIP ran in it).
        fp16_values = (self.opts.dtype == "fp16" and not compact) or self.opts.precision == "fp16"
        encoding = None if not compact else DeviceEncoding(
            self.writer.encoding, range(len(self.layers)), schema.num_frames, schema.tokens, self.device)
        return DeviceForward(
            self.backbone.spatial_encoder(self.layers).to(self.device), self.device, self.backbone.mean,
            self.backbone.std, videos_per_batch=self.videos_per_batch, views=self.opts.views, frames=self.opts.frames,
            tokens=schema.tokens, width=schema.width, embed_dim=schema.embed_dim,
            transfer_dtype=torch.float16 if fp16_values else torch.float32, int8=int8, encoding=encoding)

    def close(self) -> None:
        if self.decode_pool is not None:
            self.decode_pool.close()
            self.decode_pool = None

    def to_extract(self, progress: bool = False) -> tuple[list[int], list[Damage]]:
        """The videos this run extracts, ascending: those without a record (and failed ones with --retry-failed),
        plus, with --repair, done ones whose stored bytes fail the integrity check (also returned)."""
        from tqdm import tqdm

        pending = self.writer.pending(retry_failed=self.opts.retry_failed)
        if not self.opts.repair:
            return pending, []
        todo = set(pending)
        done = [v for v in range(len(self.manifest.videos)) if v not in todo]
        with tqdm(total=len(done), unit="video", desc="check", disable=not progress, dynamic_ncols=True,
                  leave=False) as bar:
            damaged = damaged_videos(self.writer.url, done, deep=self.opts.deep,
                                     storage_options=self.opts.storage_options or None,
                                     on_checked=lambda: bar.update(1))
        return sorted(todo | {d.video_index for d in damaged}), damaged

    def run(self, video_indices: Iterable[int],
            on_progress: Callable[[ExtractSummary], None] = lambda summary: None) -> ExtractSummary:
        """Extract the given videos. `on_progress(summary)` is called as each video is stored or recorded failed
        (from a writer thread). A store write error, or FIRST_FAILURES_LIMIT decode failures before the first
        stored video, stops the run: raised once the writes in flight have ended."""
        state = _RunState(self, on_progress)
        spec = RenderSpec.of_schema(self.writer.schema)
        root = Path(self.opts.video_root)
        jobs = [(str(root / self.manifest.videos[v]), v, spec, self.opts.hash_videos) for v in video_indices]
        if self.decode_pool is None:
            self.decode_pool = open_pool(self.opts.decode_workers, self.opts.decode_timeout, preload=DECODE_PRELOAD)
        # Decoded videos waiting for the forward: a full batch, plus what the workers finish meanwhile.
        ahead = self.videos_per_batch + 2 * self.decode_pool.workers
        batch: list[PreparedVideo] = []
        write_pool = concurrent.futures.ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="store-writer")
        try:
            for position, future in self.decode_pool.map_unordered(prepare_video, jobs, in_flight=ahead):
                state.raise_if_stopped()
                try:
                    batch.append(future.result())
                except Exception as err:  # one video's failure is recorded, never the end of the run...
                    if machine_failure(err):  # ...but the machine's is no video's: stop, and the rerun resumes
                        raise machine_error(jobs[position][0], err) from None
                    state.decode_failed(jobs[position][1], err)
                    continue
                if len(batch) >= self.videos_per_batch:
                    self._launch(batch, write_pool, state)
                    batch = []
            if batch:
                self._launch(batch, write_pool, state)
        except BaseException as err:
            state.stop(err)
            raise
        finally:
            # After an error, writes not yet started are dropped (each returns its ring slot as it is cancelled).
            write_pool.shutdown(wait=True, cancel_futures=state.stopped)
        return state.finish()

    def _launch(self, batch: list[PreparedVideo], write_pool: concurrent.futures.Executor, state: _RunState) -> None:
        """Enqueue the batch on the device and one write per video; the batch's host buffers go back to the
        ring when its last write ends (done, failed or cancelled)."""
        launched = self.forward.launch(batch)
        remaining = [len(batch)]
        lock = threading.Lock()

        def written(_: concurrent.futures.Future) -> None:
            with lock:
                remaining[0] -= 1
                last = remaining[0] == 0
            if last:
                self.forward.ring.release(launched.buffers)

        for n in range(len(batch)):
            write_pool.submit(self._store, launched, n, state).add_done_callback(written)

    def _labels(self, prepared: PreparedVideo) -> list[int]:
        """Each view's label: the video's, or its flip partner's for a flipped view of a class in a pair."""
        label = self.manifest.labels[prepared.video_index]
        return [self.flip_partners.get(label, label) if plan.flip else label for plan in prepared.plans]

    def _store(self, launched: LaunchedBatch, n: int, state: _RunState) -> None:
        """Writer thread: store video n of a launched batch, or record it failed if its activations are not finite."""
        if state.stopped:
            return
        prepared = launched.videos[n]
        try:
            launched.wait()
            if not launched.finite(n):
                state.write_failed(prepared.video_index,
                                   f"CLIP's activations are not finite (NaN or inf) in {self.opts.dtype} at "
                                   f"--precision {self.opts.precision}; the video is recorded failed")
                return
            nbytes = self.writer.write_video(
                prepared.video_index,
                facts={**prepared.facts.to_dict(), **prepared.file_facts},
                plans=[p.to_dict() for p in prepared.plans],
                features=launched.features(n),
                clip_embeds=launched.embeds(n),
                frames=prepared.frames,
                labels=self._labels(prepared),
                finite_checked=True,  # on the device, in the dtypes sent (DeviceForward._finite)
            )
        except BaseException as err:  # a StoreWriteError (disk full...) or a bug: either ends the run
            state.stop(err)
            return
        state.stored(nbytes, prepared.facts.to_dict())


class _Bar:
    """The extraction progress bar: videos done; clips/s and MB/s (shard bytes) of this run in the postfix."""

    def __init__(self, total: int, views: int, enabled: bool):
        from tqdm import tqdm

        self.views = views
        self.bar = tqdm(total=total, unit="video", desc="extract", disable=not enabled, dynamic_ncols=True)
        self.started = time.monotonic()

    def update(self, summary: ExtractSummary) -> None:
        seconds = max(time.monotonic() - self.started, 1e-9)
        self.bar.set_postfix({"stored": summary.stored, "failed": summary.failed,
                              "clips/s": f"{summary.stored * self.views / seconds:.1f}",
                              "MB/s": f"{summary.bytes_written / 1e6 / seconds:.0f}"}, refresh=False)
        self.bar.update(summary.stored + summary.failed - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def extract(opts: ExtractOptions, progress: bool = True) -> ExtractSummary:
    """Single-process extraction of every pending video (and, with --repair, every damaged one), then
    finalisation of the store."""
    started = time.monotonic()
    extractor = Extractor.open(opts)
    try:
        todo, damaged = extractor.to_extract(progress)
        summary = ExtractSummary(skipped=len(extractor.manifest.videos) - len(todo), damaged=damaged,
                                 repaired=extractor.writer.repaired)
        bar = _Bar(len(todo), extractor.opts.views, progress)
        try:
            summary.merge(extractor.run(todo, on_progress=bar.update))
        finally:
            bar.close()
    finally:
        extractor.close()
    return summary.finalized(extractor.writer, started)
