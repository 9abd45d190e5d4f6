"""Stage one: run the frozen CLIP once over every video's sparse frames and store every layer's tokens.

The work is split so each piece runs where it is cheapest and a failure stays local:
- decode workers (processes, killable on a hang) probe, plan, decode and render each video;
- this process batches rendered frames through CLIP's visual tower;
- a writer thread stores each finished video (its shard, then its completion record), overlapped
  with the next forward pass.
A rerun skips every video that has a record, so kill -9 at any point loses only unrecorded work.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from dist_cache.backbone import Backbone, load_backbone, resolve_layers
from dist_cache.decode_pool import DecodePool
from dist_cache.decoders import DecodeError, get_decoder
from dist_cache.devices import resolve_device
from dist_cache.errors import UserError
from dist_cache.manifests import Manifest, load_manifest
from dist_cache.transforms import PREPROCESS, normalize_frames
from pipelines.prepare import PreparedVideo, RenderSpec, prepare_video
from storage import StoreSchema, StoreWriter
from storage.schema import FORMAT_VERSION

FORMAT_SPLITS = ("train", "test")
# Each video owns its shards, so writers never contend; two overlap one slow write with the next.
WRITER_THREADS = 2
DECODE_PRELOAD = ("pipelines.prepare",)
DTYPES = ("fp16", "int8")


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
    views: int = 1
    split: str = "train"
    seed: int = 0
    dtype: str = "fp16"
    codec: str = "none"
    classes: str | None = None
    manifest_format: str = "auto"
    templates: tuple[str, ...] = ("{}",)
    scale: tuple[float, float] = (0.4, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    grayscale_p: float = 0.2
    batch_frames: int = 64
    decode_workers: int = 2
    decode_timeout: float = 120.0
    decoder: str = "decord"  # a dist_cache.decoders name
    device: str = "auto"
    hash_videos: bool = False  # record each file's sha256 so verify can tell a replaced copy
    retry_failed: bool = False  # extract videos recorded as failed again (e.g. after fixing the files)
    storage_options: dict = field(default_factory=dict)


@dataclass
class ExtractSummary:
    stored: int = 0  # videos written by this run
    skipped: int = 0  # videos already done before this run
    failed: int = 0  # videos that failed in this run
    bytes_written: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (video, error), this run
    complete: bool = False
    store_failed: int = 0  # failed videos in the whole store, earlier runs included

    def merge(self, other: "ExtractSummary") -> None:
        self.stored += other.stored
        self.failed += other.failed
        self.bytes_written += other.bytes_written
        self.failures.extend(other.failures)


def check_options(opts: ExtractOptions) -> None:
    """Reject bad flag values before anything is loaded or written."""
    if opts.split not in FORMAT_SPLITS:
        raise UserError(f"--split {opts.split}: must be one of {', '.join(FORMAT_SPLITS)}")
    if opts.dtype not in DTYPES:
        raise UserError(f"--dtype {opts.dtype}: must be one of {', '.join(DTYPES)}")
    if opts.frames < 1 or opts.views < 1:
        raise UserError("--frames and --views must be at least 1")
    if not Path(opts.video_root).is_dir():
        raise UserError(f"--video-root {opts.video_root}: no such directory")


def build_schema(opts: ExtractOptions, backbone: Backbone, layers: list[int], manifest: Manifest) -> StoreSchema:
    """Everything a stranger needs to reuse or reproduce the features."""
    described = backbone.describe()
    # The activation CLIP ran with: open_clip's configs say "quick_gelu" when the weights need it.
    described.setdefault("activation", "quick_gelu" if described["model_config"].get("quick_gelu") else "gelu")
    return StoreSchema.from_json({
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
        "precision": "fp32",  # CLIP runs in fp32 (see SpatialEncoder)
        "tokens": backbone.num_tokens,
        "width": backbone.width,
        "sampling": {
            "policy": "tsn-segments" if opts.split == "train" else "uniform-clips",
            "seed": opts.seed,
            "scale": list(opts.scale),
            "ratio": list(opts.ratio),
            "flip_p": opts.flip_p if opts.split == "train" else 0.0,
            "grayscale_p": opts.grayscale_p if opts.split == "train" else 0.0,
            "rng": "numpy default_rng([seed, video_index])",
            "dense_rule": "dense[g*k+j] = min(num_frames-1, sparse[k] + floor(j*gap_k/g)), j < g, "
                          "gap_k = sparse[k+1] - sparse[k], the last slot's gap = window",
            "flip_label_map": None,  # no label swaps on flip
        },
        "dense_frames": None,  # no dense frames stored
        "num_videos": len(manifest.videos),
        "class_names": manifest.class_names,
        "text": {"templates": list(opts.templates), "source": "backbone text tower, mean of L2-normalised templates"},
    })


def render_spec(opts: ExtractOptions, backbone: Backbone) -> RenderSpec:
    return RenderSpec(
        frames=opts.frames, views=opts.views, split=opts.split, seed=opts.seed, image_size=backbone.image_size,
        scale=tuple(opts.scale), ratio=tuple(opts.ratio), decoder=opts.decoder,
        flip_p=opts.flip_p if opts.split == "train" else 0.0,
        grayscale_p=opts.grayscale_p if opts.split == "train" else 0.0,
    )


@dataclass
class Extractor:
    """A loaded backbone bound to one open store: turns video indices into stored samples."""

    opts: ExtractOptions
    backbone: Backbone
    layers: list[int]
    manifest: Manifest
    writer: StoreWriter
    device: torch.device
    # Kept for the extractor's life: a dask worker runs many chunks, and each new pool would spawn
    # (and import torch in) fresh decode processes.
    decode_pool: DecodePool | None = field(default=None, repr=False)

    @classmethod
    def open(cls, opts: ExtractOptions, *, decode: bool = True) -> "Extractor":
        """Validate everything, then create or reopen the store. Every user error happens before a write.

        `decode=False` for a process that only creates the store (a dask client): no decode workers."""
        check_options(opts)
        manifest = load_manifest(opts.manifest, video_root=opts.video_root, classes=opts.classes, fmt=opts.manifest_format)
        # Decode workers spend seconds importing torch: start them now, so that happens while CLIP loads.
        pool = DecodePool(opts.decode_workers, opts.decode_timeout, preload=DECODE_PRELOAD) if decode else None
        try:
            device = resolve_device(opts.device)
            backbone = load_backbone(opts.model, opts.pretrained, allow_random_weights=opts.allow_random_weights, device=device)
            layers = resolve_layers(opts.layers, backbone.num_layers)
            schema = build_schema(opts, backbone, layers, manifest)
            writer = StoreWriter.open(
                opts.out,
                schema=schema,
                videos=manifest.videos,
                labels=manifest.labels,
                text_features=backbone.encode_text(manifest.class_names, list(opts.templates)),
                storage_options=opts.storage_options or None,
            )
        except BaseException:
            if pool is not None:
                pool.close(kill=True)
            raise
        return cls(opts, backbone, layers, manifest, writer, device, pool)

    @functools.cached_property
    def encoder(self) -> torch.nn.Module:
        return self.backbone.spatial_encoder(self.layers).to(self.device)

    def close(self) -> None:
        if self.decode_pool is not None:
            self.decode_pool.close()
            self.decode_pool = None

    def run(self, video_indices: Iterable[int], on_progress: Callable[[int], None] = lambda n: None) -> ExtractSummary:
        """Extract the given videos. `on_progress(clips)` is called as each video is stored or fails."""
        summary = ExtractSummary()
        spec = render_spec(self.opts, self.backbone)
        root = Path(self.opts.video_root)
        jobs = [(str(root / self.manifest.videos[v]), v, spec, self.opts.hash_videos) for v in video_indices]
        per_video = self.opts.views * self.opts.frames
        batch: list[PreparedVideo] = []
        writes: list[concurrent.futures.Future] = []

        def flush() -> None:
            if batch:
                writes.append(write_pool.submit(self._store_batch, self._forward(batch), list(batch)))
                batch.clear()
            # Bounded in-flight batches keep memory flat while writing overlaps compute.
            while len(writes) > 2 * WRITER_THREADS:
                self._collect(writes.pop(0), summary, on_progress)

        with concurrent.futures.ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="store-writer") as write_pool:
            if self.decode_pool is None:
                self.decode_pool = DecodePool(self.opts.decode_workers, self.opts.decode_timeout, preload=DECODE_PRELOAD)
            for position, future in self.decode_pool.map_unordered(prepare_video, jobs):
                try:
                    batch.append(future.result())
                except Exception as err:  # any one video's failure is recorded, never the end of the run
                    self._record_failure(jobs[position][1], err, summary, on_progress)
                    continue
                if len(batch) * per_video >= self.opts.batch_frames:
                    flush()
            flush()
            for pending_write in writes:
                self._collect(pending_write, summary, on_progress)
        return summary

    @torch.inference_mode()
    def _forward(self, batch: list[PreparedVideo]) -> tuple[np.ndarray, np.ndarray]:
        """CLIP on a batch of videos -> features (V, K, L, T, N+1, C) and embeddings (V, K, T, E), ready to store.

        The layout change and the cast to the stored precision happen on the device: on a GPU the host
        side would otherwise spend longer converting than the forward pass takes.
        """
        images = torch.from_numpy(np.concatenate([p.images for p in batch])).to(self.device)  # uint8
        images = normalize_frames(images, self.backbone.mean, self.backbone.std)
        tokens, embeds = self.encoder(images)  # (L, V*K*T, N+1, C), (V*K*T, E)
        V, K, T = len(batch), self.opts.views, self.opts.frames
        store_dtype = torch.float16 if self.opts.dtype == "fp16" else torch.float32  # int8 quantises from fp32
        features = tokens.reshape(len(self.layers), V, K, T, *tokens.shape[2:]).permute(1, 2, 0, 3, 4, 5)
        features = features.to(store_dtype).contiguous().cpu().numpy()
        return features, embeds.reshape(V, K, T, -1).to(torch.float16).cpu().numpy()

    def _store_batch(self, outputs: tuple[np.ndarray, np.ndarray], batch: list[PreparedVideo]) -> list[tuple[int, int | Exception]]:
        """Store each video of a batch; returns (video index, bytes written or the error that stopped it)."""
        features, embeds = outputs
        results: list[tuple[int, int | Exception]] = []
        for n, prepared in enumerate(batch):
            try:
                nbytes = self.writer.write_video(
                    prepared.video_index,
                    facts={**prepared.facts.to_dict(), **prepared.file_facts},
                    plans=[p.to_dict() for p in prepared.plans],
                    features=features[n],
                    clip_embeds=embeds[n],
                )
                results.append((prepared.video_index, nbytes))
            except Exception as err:  # e.g. non-finite activations: that video fails, the rest go on
                results.append((prepared.video_index, err))
        return results

    def _record_failure(self, video_index: int, err: Exception, summary: ExtractSummary, on_progress) -> None:
        message = str(err) if isinstance(err, DecodeError) else f"{type(err).__name__}: {err}"
        self.writer.write_failure(video_index, message)
        summary.failed += 1
        summary.failures.append((self.manifest.videos[video_index], message))
        on_progress(self.opts.views)

    def _collect(self, future: concurrent.futures.Future, summary: ExtractSummary, on_progress) -> None:
        for video_index, outcome in future.result():
            if isinstance(outcome, Exception):
                self._record_failure(video_index, outcome, summary, on_progress)
                continue
            summary.stored += 1
            summary.bytes_written += outcome
            on_progress(self.opts.views)


def extract(opts: ExtractOptions, progress: bool = True) -> ExtractSummary:
    """Single-process extraction of every pending video, then finalisation of the store."""
    from tqdm import tqdm

    started = time.monotonic()
    extractor = Extractor.open(opts)
    pending = extractor.writer.pending(retry_failed=opts.retry_failed)
    summary = ExtractSummary(skipped=len(extractor.manifest.videos) - len(pending))
    try:
        with tqdm(total=len(pending) * opts.views, unit="clip", desc="extract", disable=not progress, dynamic_ncols=True) as bar:
            summary.merge(extractor.run(pending, on_progress=bar.update))
    finally:
        extractor.close()
    final = extractor.writer.finalize()
    summary.complete = bool(final["complete"])
    summary.store_failed = int(final["failed"])
    summary.seconds = time.monotonic() - started
    return summary
