"""Stage one: every video decoded once, its views through the frozen ViT, each layer's tokens into the store.

- `extractor.py`: `ExtractOptions`, `extract`, the `Extractor` that ties the flows together (decode, forward, write).
- `prepare.py`: a video's probe, views, decode and render (in the decode workers).
- `device.py`: the forward on the device, the ring of pinned host buffers.
- `fit.py`: a compact store's fit, on the device, before the store exists.
- `repair.py`: which done videos are damaged (`extract --repair`).
- `dask_runner.py`: the same extraction spread over a dask.distributed cluster.
"""

from __future__ import annotations

import importlib
from typing import Any

# What the CLI uses, imported on first use: a dask worker imports `dask_runner` before the `storage` package can be
# imported safely (dask_runner._import_storage), and `dist-cache info` should not load torch.
_EXPORTS = {"ExtractOptions": "extractor", "extract": "extractor", "unused_options": "extractor",
            "extract_distributed": "dask_runner"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
