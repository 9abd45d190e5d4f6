"""Stores that hold dense frames, for the training tests, written through StoreWriter from real videos.

Each video goes through what extraction does (`prepare.prepare_video`: probe, plan, decode, uint8 render;
the tiny CLIP on the normalised frames) and its views' dense frames are decoded at their plans and rendered
(pipelines.train.data.dense_frames.decode_view, what training decodes). So the store is the one `extract --dense-frames`
makes, and a store of the same videos without frames holds the same features.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from dist_cache.backbone import load_backbone
from dist_cache.backbone_config import resolve_layers
from dist_cache.manifests import load_manifest
from dist_cache.transforms import normalize_frames
from pipelines.extract.extractor import ExtractOptions, build_schema, resolve_precision
from pipelines.extract.prepare import RenderSpec, prepare_video
from pipelines.train.data.dense_frames import decode_view
from storage import StoreWriter


@torch.inference_mode()
def extract_with_frames(manifest: Path, video_root: Path, out: Path, checkpoint: Path, *, views: int, split: str,
                        gamma: int, frames: int = 4, hash_videos: bool = False, **options) -> str:
    opts = ExtractOptions(manifest=str(manifest), video_root=str(video_root), out=str(out), model="dist-tiny",
                          pretrained=str(checkpoint), frames=frames, views=views, split=split,
                          hash_videos=hash_videos, **options)
    # as Extractor.open does: the store records the precision CLIP ran in (here, on the CPU)
    opts = dataclasses.replace(opts, precision=resolve_precision(opts.precision, torch.device("cpu")))
    backbone = load_backbone(opts.model, opts.pretrained)
    layers = resolve_layers(opts.layers, backbone.num_layers)
    listed = load_manifest(opts.manifest, video_root=opts.video_root)
    sparse = build_schema(opts, backbone, layers, listed)
    schema = dataclasses.replace(sparse, dense_frames={"gamma": gamma})
    writer = StoreWriter.open(str(out), schema, listed.videos, listed.labels,
                              backbone.encode_text(listed.class_names, list(opts.templates)))
    encoder = backbone.spatial_encoder(layers)
    spec = RenderSpec.of_schema(sparse)  # CLIP's frames: the dense ones are decoded as training decodes them
    for v, relative in enumerate(listed.videos):
        path = str(video_root / relative)
        prepared = prepare_video(path, v, spec, hash_videos)
        tokens, embeds = encoder(normalize_frames(torch.from_numpy(prepared.images), backbone.mean, backbone.std))
        features = tokens.reshape(len(layers), views, frames, *tokens.shape[2:]).permute(1, 0, 2, 3, 4).numpy()
        dense = np.stack([decode_view(path, plan.to_dict(), gamma, prepared.facts.num_frames, backbone.image_size,
                                      opts.decoder, None, "") for plan in prepared.plans])
        writer.write_video(v, {**prepared.facts.to_dict(), **prepared.file_facts},
                           [p.to_dict() for p in prepared.plans],
                           features.astype(np.float16), embeds.reshape(views, frames, -1).numpy().astype(np.float16),
                           frames=dense)
    writer.finalize()
    return str(out)
