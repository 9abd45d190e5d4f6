"""The DiST branch (Qing et al., ICCV 2023) over a frozen CLIP spatial encoder.

The configuration (`DiSTConfig`, `DiSTSwitches`) imports no torch, so the CLI can build its flags from it and
`--help` stays instant; the modules (`DiST`, `OnlineDiST`) are imported on first use.
"""

from typing import Any

from dist_cache.model.config import DiSTConfig
from dist_cache.model.switches import ConfigError, DiSTSwitches

__all__ = ["ConfigError", "DiST", "DiSTConfig", "DiSTSwitches", "OnlineDiST"]


def __getattr__(name: str) -> Any:
    if name in ("DiST", "OnlineDiST"):
        from dist_cache.model import dist

        return getattr(dist, name)
    raise AttributeError(f"module 'dist_cache.model' has no attribute {name!r}")
