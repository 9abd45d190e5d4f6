"""The DiST branch (Qing et al., ICCV 2023) over a frozen CLIP spatial encoder."""

from dist_cache.model.config import ConfigError, DiSTConfig
from dist_cache.model.dist import DiST, OnlineDiST

__all__ = ["ConfigError", "DiST", "DiSTConfig", "OnlineDiST"]
