"""`extract --pca` / `--dtype int8`: the fit pass that runs before a compact store exists.

The sample's videos are decoded as extraction decodes them (their recorded views) and run through CLIP on the
extraction's device and precision; the fit videos' tokens are reduced on the device to float64 sums and Gram
matrices (plus a strided reservoir for the int8 scales) and then dropped, so the full-size features never exist on
disk and only one video's at a time in memory. The held-out videos are then encoded and decoded exactly as the store
will, on the host, to measure the error the store records (storage/pca.py). The store is created after this, with
the fitted parameters; the extraction proper then writes codes (storage/README.md, "Compact stores").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_cache.backbone import Backbone
from dist_cache.decode_pool import DecodePool
from dist_cache.errors import UserError, first_line
from dist_cache.manifests import Manifest
from dist_cache.transforms import normalize_frames
from pipelines.compact import sample_size
from pipelines.extract.prepare import PreparedVideo, RenderSpec, prepare_video
from storage import StoreSchema
from storage.encoding import Encoding
from storage.pca import ErrorStats, FitAccumulator, draw_sample, fit, fit_record


class DeviceFit:
    """CLIP on the sample's videos, one video at a time, with the fit's moments accumulated on the device."""

    def __init__(self, backbone: Backbone, layers: list[int], device: torch.device, pool: DecodePool,
                 spec: RenderSpec, root: str):
        self.backbone, self.layers, self.device, self.pool, self.spec = backbone, layers, device, pool, spec
        self.root = Path(root)
        self.encoder = backbone.spatial_encoder(layers).to(device)
        self.failures: list[str] = []

    def prepared(self, manifest: Manifest, videos: list[int]) -> Iterator[PreparedVideo]:
        """The videos decoded and rendered as extraction renders them (failures skipped and remembered)."""
        jobs = [(str(self.root / manifest.videos[v]), v, self.spec, False) for v in videos]
        for _position, future in self.pool.map_unordered(prepare_video, jobs, in_flight=2 * self.pool.workers):
            try:
                yield future.result()
            except Exception as err:  # noqa: BLE001 - a video that fails here is simply not in the sample
                self.failures.append(first_line(err, 300))

    @torch.inference_mode()
    def tokens(self, video: PreparedVideo) -> torch.Tensor:
        """(L, K*T, N+1, C) tokens of the video's views, float32, on the device."""
        images = torch.from_numpy(video.images).to(self.device)
        tokens, _ = self.encoder(normalize_frames(images, self.backbone.mean, self.backbone.std))
        return tokens.float()


def fit_on_device(opts: Any, backbone: Backbone, layers: list[int], manifest: Manifest, device: torch.device,
                  pool: DecodePool, schema: StoreSchema, spec: RenderSpec) -> tuple[dict[str, Any], Encoding]:
    """Fit the (unfitted) compact `schema`'s encoding on a seeded sample of the manifest's videos."""
    section = schema.encoding
    assert section is not None
    sample = draw_sample(range(len(manifest.videos)), sample_size(section, schema), section["sample"]["seed"])
    run = DeviceFit(backbone, layers, device, pool, spec, opts.video_root)
    L, C = len(layers), schema.width
    per_video = schema.views_per_video * schema.num_frames * schema.tokens
    acc = FitAccumulator(L, C, FitAccumulator.stride_for(len(sample.fit) * per_video))
    sums = torch.zeros((L, C), dtype=torch.float64, device=device)
    grams = torch.zeros((L, C, C), dtype=torch.float64, device=device)
    count = 0
    for video in run.prepared(manifest, sample.fit):
        x = run.tokens(video).reshape(L, -1, C)
        x64 = x.double()
        sums += x64.sum(1)
        grams += x64.transpose(1, 2) @ x64  # float64 on the device: the covariance of 64k tokens stays exact
        count += x.shape[1]
        acc.add_moments(0, np.zeros((L, C)), np.zeros((L, C, C)), x[:, ::acc.stride].cpu().numpy())
    if count < 2:
        first = f" (first error: {run.failures[0]})" if run.failures else ""
        raise UserError(f"no video of the fit sample decoded{first}: check --video-root and --manifest")
    acc.add_moments(count, sums.cpu().numpy(), grams.cpu().numpy(), np.zeros((L, 0, C), np.float32))
    result = fit(acc, None if section["pca"] is None else section["pca"]["request"],
                 quantize=section["quantization"] is not None)
    stats = ErrorStats(L, result.outlier_channels)
    K, T = schema.views_per_video, schema.num_frames
    for video in run.prepared(manifest, sample.holdout):
        features = run.tokens(video).reshape(L, K, T, schema.tokens, C).transpose(0, 1).cpu().numpy()
        stats.add_sample(result.encoding, features)
    return fit_record(result, sample, stats.summary(), "extract"), result.encoding
