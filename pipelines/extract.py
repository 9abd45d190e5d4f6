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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from dist_cache.backbone import Backbone, load_backbone, resolve_layers
from dist_cache.errors import UserError
from dist_cache.manifests import Manifest, load_manifest
from dist_cache.transforms import PREPROCESS
from dist_cache.video import DECODER, DecodeError, DecodePool
from pipelines.prepare import PreparedVideo, RenderSpec, prepare_video
from storage import StoreWriter
from storage.schema import FORMAT_VERSION

FORMAT_SPLITS = ("train", "test")
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
    device: str = "auto"
    hash_videos: bool = False  # record each file's sha256 so verify can tell a replaced copy
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


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


def build_schema(opts: ExtractOptions, backbone: Backbone, layers: list[int], manifest: Manifest) -> dict:
    """Everything a stranger needs to reuse or reproduce the features, as JSON."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone.describe(),
        "preprocess": {**PREPROCESS, "decoder": DECODER, "image_size": backbone.image_size,
                       "mean": list(backbone.mean), "std": list(backbone.std)},
        "layers": layers,
        "num_frames": opts.frames,
        "views_per_video": opts.views,
        "split": opts.split,
        "dtype": opts.dtype,
        "codec": opts.codec,
        "tokens": backbone.num_tokens,
        "width": backbone.width,
        "embed_dim": backbone.embed_dim,
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
        },
        "num_videos": len(manifest.videos),
        "class_names": manifest.class_names,
        "text": {"templates": list(opts.templates), "source": "backbone text tower, mean of L2-normalised templates"},
    }


def render_spec(opts: ExtractOptions, backbone: Backbone) -> RenderSpec:
    return RenderSpec(
        frames=opts.frames, views=opts.views, split=opts.split, seed=opts.seed, image_size=backbone.image_size,
        mean=backbone.mean, std=backbone.std, scale=tuple(opts.scale), ratio=tuple(opts.ratio),
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

    @classmethod
    def open(cls, opts: ExtractOptions) -> "Extractor":
        """Validate everything, then create or reopen the store. Every user error happens before a write."""
        check_options(opts)
        manifest = load_manifest(opts.manifest, video_root=opts.video_root, classes=opts.classes, fmt=opts.manifest_format)
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
        return cls(opts, backbone, layers, manifest, writer, device)

    def run(self, video_indices: Iterable[int], on_progress: Callable[[int], None] = lambda n: None) -> ExtractSummary:
        """Extract the given videos. `on_progress(clips)` is called as each video is stored or fails."""
        summary = ExtractSummary()
        encoder = self.backbone.spatial_encoder(self.layers).to(self.device)
        spec = render_spec(self.opts, self.backbone)
        root = Path(self.opts.video_root)
        jobs = [(str(root / self.manifest.videos[v]), v, spec, self.opts.hash_videos) for v in video_indices]
        per_video = self.opts.views * self.opts.frames
        batch: list[PreparedVideo] = []
        writes: list[concurrent.futures.Future] = []

        def flush() -> None:
            if batch:
                writes.append(write_pool.submit(self._store_batch, self._forward(encoder, batch), list(batch)))
                batch.clear()
            # Keep at most two batches in flight so memory stays bounded while writing overlaps compute.
            while len(writes) > 2:
                self._collect(writes.pop(0), summary, on_progress)

        with DecodePool(self.opts.decode_workers, self.opts.decode_timeout) as decode_pool, \
                concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-writer") as write_pool:
            for position, future in decode_pool.map_unordered(prepare_video, jobs):
                video_index = jobs[position][1]
                try:
                    batch.append(future.result())
                except DecodeError as err:
                    self.writer.write_failure(video_index, str(err))
                    summary.failed += 1
                    summary.failures.append((self.manifest.videos[video_index], str(err)))
                    on_progress(self.opts.views)
                    continue
                if len(batch) * per_video >= self.opts.batch_frames:
                    flush()
            flush()
            for pending_write in writes:
                self._collect(pending_write, summary, on_progress)
        return summary

    @torch.inference_mode()
    def _forward(self, encoder, batch: list[PreparedVideo]) -> tuple[np.ndarray, np.ndarray]:
        images = torch.from_numpy(np.concatenate([p.images for p in batch])).to(self.device)
        tokens, embeds = encoder(images)
        return tokens.float().cpu().numpy(), embeds.float().cpu().numpy()

    def _store_batch(self, outputs: tuple[np.ndarray, np.ndarray], batch: list[PreparedVideo]) -> list[int]:
        tokens, embeds = outputs
        K, T = self.opts.views, self.opts.frames
        written = []
        for n, prepared in enumerate(batch):
            rows = slice(n * K * T, (n + 1) * K * T)
            # (L, K*T, N+1, C) -> (K, L, T, N+1, C): the store keeps a sample's layers together.
            features = tokens[:, rows].reshape(len(self.layers), K, T, *tokens.shape[2:]).transpose(1, 0, 2, 3, 4)
            written.append(
                self.writer.write_video(
                    prepared.video_index,
                    facts={**prepared.facts.to_dict(), **prepared.file_facts},
                    plans=[p.to_dict() for p in prepared.plans],
                    features=features,
                    clip_embeds=embeds[rows].reshape(K, T, -1),
                )
            )
        return written

    def _collect(self, future: concurrent.futures.Future, summary: ExtractSummary, on_progress) -> None:
        for nbytes in future.result():
            summary.stored += 1
            summary.bytes_written += nbytes
            on_progress(self.opts.views)


def extract(opts: ExtractOptions, progress: bool = True) -> ExtractSummary:
    """Single-process extraction of every pending video, then finalisation of the store."""
    from tqdm import tqdm

    started = time.monotonic()
    extractor = Extractor.open(opts)
    pending = extractor.writer.pending()
    summary = ExtractSummary(skipped=len(extractor.manifest.videos) - len(pending))
    with tqdm(total=len(pending) * opts.views, unit="clip", desc="extract", disable=not progress, dynamic_ncols=True) as bar:
        summary.merge(extractor.run(pending, on_progress=bar.update))
    final = extractor.writer.finalize()
    summary.complete = bool(final["complete"])
    summary.store_failed = int(final["failed"])
    summary.seconds = time.monotonic() - started
    return summary
