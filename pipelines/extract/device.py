"""The device side of extraction: CLIP on a batch of videos, the store's layout, dtype and finiteness check made on
the device, and the copy to host memory into a ring of pinned buffers that the store writers hand back.

On CUDA three things overlap: batch n+1's forward (on its own stream), batch n's device-to-host copy (on a copy
stream, into pinned memory: on an H200 box pinned copies ran at 55 GB/s against 1.6 GB/s pageable), and the
writes of earlier batches (writer threads, straight from the pinned buffers). The main thread only enqueues work
and never waits for the device; the ring's size bounds both host and device memory, since a batch's buffers
return to the ring only when its last video is written (`docs/DESIGN.md`, "extract.py"). On the CPU the same code
runs synchronously into plain buffers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Sequence

import numpy as np
import torch

from dist_cache.transforms import normalize_frames
from pipelines.compact_device import DeviceEncoding
from pipelines.extract.prepare import PreparedVideo
from storage.encoding import Encoded
from storage.quantize import GROUPS

# Host buffers per ring: one filling from the device, one or two being written while the next forward runs.
RING_SLOTS = 3
# The largest finite fp16: an int8 store's per-token scale (absmax / 127) is kept in fp16 and must fit.
_FP16_MAX = float(torch.finfo(torch.float16).max)
_QMAX = 127  # storage/quantize.py's int8 range


@dataclasses.dataclass
class HostBuffers:
    """One ring slot: room for a whole batch, in the layout and dtypes the store writer takes."""

    # (V, K, L, T, N+1, C): fp16, or fp16/fp32 for a format-2 int8 store (the writer quantises); a compact store's
    # codes as stored: (V, K, T*(N+1)*sum K_l) fp16 or int8 with PCA, else (V, K, L, T, N+1, C) int8
    features: torch.Tensor
    embeds: torch.Tensor  # (V, K, T, E) fp16
    finite: torch.Tensor  # (V,) bool: whether video n's features and embeddings may be stored
    scales: torch.Tensor | None = None  # (V, K, L, T, N+1, 2) fp16: a compact int8 store's token scales


class HostRing:
    """A bounded set of HostBuffers, made on first use: `acquire` blocks while every slot is in flight."""

    def __init__(self, slots: int, shape: Sequence[int], embed_shape: Sequence[int], dtype: torch.dtype, pinned: bool,
                 scales_shape: Sequence[int] | None = None):
        self._free: queue.SimpleQueue[HostBuffers] = queue.SimpleQueue()
        self._unmade = slots
        self._lock = threading.Lock()
        self._make = lambda: HostBuffers(
            torch.empty(tuple(shape), dtype=dtype, pin_memory=pinned),
            torch.empty(tuple(embed_shape), dtype=torch.float16, pin_memory=pinned),
            torch.empty(shape[0], dtype=torch.bool, pin_memory=pinned),
            None if scales_shape is None else torch.empty(tuple(scales_shape), dtype=torch.float16, pin_memory=pinned),
        )

    def acquire(self) -> HostBuffers:
        with self._lock:
            make = self._unmade > 0 and self._free.empty()
            self._unmade -= make
        return self._make() if make else self._free.get()

    def release(self, buffers: HostBuffers) -> None:
        self._free.put(buffers)


@dataclasses.dataclass
class LaunchedBatch:
    """A batch whose forward and copy are enqueued: its host buffers are valid once `wait()` returns."""

    videos: list[PreparedVideo]
    buffers: HostBuffers
    ready: torch.cuda.Event | None  # None on the CPU: the copy has happened already
    encoded: bool = False  # the buffers hold a compact store's codes

    def wait(self) -> None:
        if self.ready is not None:
            self.ready.synchronize()

    def features(self, n: int) -> np.ndarray | Encoded:
        """Video n's features as the store writer takes them: float tokens, or a compact store's codes."""
        if self.encoded:
            scales = self.buffers.scales
            return Encoded(self.buffers.features[n].numpy(), None if scales is None else scales[n].numpy())
        return self.buffers.features[n].numpy()

    def embeds(self, n: int) -> np.ndarray:
        return self.buffers.embeds[n].numpy()

    def finite(self, n: int) -> bool:
        return bool(self.buffers.finite[n])


class DeviceForward:
    """Runs the spatial encoder on batches of prepared videos and lands its outputs in host ring buffers.

    `transfer_dtype` is what crosses to the host: fp16 for an fp16 store. A format-2 int8 store is quantised by the
    store writer, so it gets the encoder's own values: fp16 under fp16 autocast (lossless), else fp32. A compact
    store (`encoding`) is encoded here, on the device, from the encoder's values in `transfer_dtype`: only its
    codes and scales cross to the host."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device, mean: Sequence[float], std: Sequence[float], *,
                 videos_per_batch: int, views: int, frames: int, tokens: int, width: int, embed_dim: int,
                 transfer_dtype: torch.dtype, int8: bool, slots: int = RING_SLOTS,
                 encoding: DeviceEncoding | None = None):
        self.encoder = encoder
        self.device = device
        self.mean, self.std = tuple(mean), tuple(std)
        self.views, self.frames = views, frames
        self.layers = len(encoder.layers)
        self.transfer_dtype = transfer_dtype
        self.int8 = int8
        cuda = device.type == "cuda"
        self.compute_stream = torch.cuda.Stream(device) if cuda else None
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.encoding = encoding
        shape: tuple[int, ...] = (videos_per_batch, views, self.layers, frames, tokens, width)
        ring_dtype, scales_shape = transfer_dtype, None
        if encoding is not None:
            enc = encoding.encoding
            ring_dtype = torch.int8 if enc.quantized else torch.float16
            if enc.projected:
                shape = (videos_per_batch, views, enc.code_size(range(self.layers), frames, tokens))
            scales_shape = (*shape[:2], self.layers, frames, tokens, GROUPS) if enc.quantized else None
        self.ring = HostRing(slots, shape, (videos_per_batch, views, frames, embed_dim), ring_dtype, pinned=cuda,
                             scales_shape=scales_shape)

    def _on(self, stream: torch.cuda.Stream | None) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _upload(self, videos: list[PreparedVideo]) -> torch.Tensor:
        """The batch's uint8 frames on the device: gathered once into (pinned, on CUDA) host memory, then one
        asynchronous copy. torch's pinned allocator keeps the staging memory until that copy has run."""
        first = videos[0].images
        staging = torch.empty((len(videos) * first.shape[0], *first.shape[1:]), dtype=torch.uint8,
                              pin_memory=self.device.type == "cuda")
        flat = staging.numpy()
        for n, video in enumerate(videos):
            images = video.images
            flat[n * len(images):(n + 1) * len(images)] = images
        return staging.to(self.device, non_blocking=True)

    def _finite(self, features: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """(V,) bool, on the device: the video's values are all finite (and, for int8, every token's scale fits
        fp16): a video that fails is recorded failed instead of written. Reductions, not an elementwise isfinite:
        max and min propagate NaN, and on a CPU they cost a fifth of isfinite on fp16."""
        V = features.shape[0]
        ok = torch.isfinite(embeds).view(V, -1).all(1)
        if self.int8:
            scales = (features.abs().amax(-1).float() / _QMAX).to(torch.float16)  # inf or NaN if any value is
            return ok & torch.isfinite(scales).view(V, -1).all(1)
        flat = features.view(V, -1)
        high, low = flat.amax(1), flat.amin(1)
        ok = ok & torch.isfinite(high) & torch.isfinite(low)
        if self.encoding is not None:  # a compact store's tokens are read back as fp16 (FeatureStore.features)
            ok = ok & (high <= _FP16_MAX) & (low >= -_FP16_MAX)
        return ok

    @torch.inference_mode()
    def launch(self, videos: list[PreparedVideo]) -> LaunchedBatch:
        """Enqueue the batch's forward, cast and copy; blocks only while the ring has no free buffers."""
        buffers = self.ring.acquire()
        V, K, T, L = len(videos), self.views, self.frames, self.layers
        with self._on(self.compute_stream):
            images = normalize_frames(self._upload(videos), self.mean, self.std)
            tokens, embeds = self.encoder(images)  # (L, V*K*T, N+1, C), (V*K*T, E) in the autocast dtype
            # Cast and permute to the stored layout in one copy: (V, K, L, T, N+1, C), contiguous. On the CPU
            # that copy lands in the host buffer itself.
            on_host = self.device.type == "cpu" and self.encoding is None
            features = buffers.features[:V] if on_host else \
                torch.empty((V, K, L, T, *tokens.shape[2:]), dtype=self.transfer_dtype, device=self.device)
            features.copy_(tokens.view(L, V, K, T, *tokens.shape[2:]).permute(1, 2, 0, 3, 4, 5))
            embeds = embeds.reshape(V, K, T, -1).to(torch.float16)
            finite = self._finite(features, embeds)
            scales = None
            if self.encoding is not None:
                features, scales, ok = self._encode(features)
                finite = finite & ok
        pairs = [(features, buffers.features), (embeds, buffers.embeds), (finite, buffers.finite)]
        if scales is not None:
            pairs.append((scales, buffers.scales))
        encoded = self.encoding is not None
        if self.copy_stream is None:  # the CPU, or a device without streams: copies that return when done
            for source, target in pairs[int(on_host):]:
                target[:V].copy_(source)
            return LaunchedBatch(videos, buffers, None, encoded)
        self.copy_stream.wait_stream(self.compute_stream)
        with self._on(self.copy_stream):
            for source, target in pairs:
                target[:V].copy_(source, non_blocking=True)
                source.record_stream(self.copy_stream)  # the allocator keeps it until this copy has run
            ready = torch.cuda.Event()
            ready.record(self.copy_stream)
        return LaunchedBatch(videos, buffers, ready, encoded)

    def _encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(V, K, L, T, N+1, C) tokens -> a compact store's (codes, scales or None) in the host buffers' layout, and
        (V,) whether every code and scale is finite (fp16 codes or scales can overflow)."""
        enc = self.encoding
        assert enc is not None
        V, K, L, T, N1, _C = features.shape
        quantized, projected = enc.encoding.quantized, enc.encoding.projected
        width = enc.encoding.code_size(range(L), T, N1) if projected else None
        codes = torch.empty((V, K, width) if projected else (V, K, L, T, N1, features.shape[-1]),
                            dtype=torch.int8 if quantized else torch.float16, device=features.device)
        scales = torch.empty((V, K, L, T, N1, GROUPS), dtype=torch.float16, device=features.device) \
            if quantized else None
        ok = torch.ones(V, dtype=torch.bool, device=features.device)
        at = 0
        for n in range(L):  # layer by layer: float32 temporaries of one layer only
            layer_codes, layer_scales = enc.encode_layer(n, features[:, :, n])
            if projected:
                size = T * N1 * enc.dims[n]
                codes[:, :, at:at + size] = layer_codes.reshape(V, K, size)
                at += size
            else:
                codes[:, :, n] = layer_codes
            checked = layer_scales if layer_scales is not None else layer_codes
            flat = checked.reshape(V, -1)
            ok &= torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1))
            if scales is not None:
                scales[:, :, n] = layer_scales
        return codes, scales, ok
