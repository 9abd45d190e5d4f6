"""Compact-store formats by name, as the compact-store study (benchmarks.compact) and the augmentation study name
them, and the store of a format made from an fp16 store by `copy`.

A format name: fp16 | int8 | pcaK | pcaF (fp16 codes) | pcaK-int8 | pcaF-int8, optionally followed by "+jpeg"
(JPEG dense frames at the default quality): what `copy --pca ... --dtype ... --frames-format jpeg` makes.
"""

from __future__ import annotations

from pathlib import Path


def parse_format(name: str) -> dict:
    """A format name -> copy_store's options ({} for fp16 with raw frames: the source store itself)."""
    from pipelines.compact import parse_pca

    features, plus, frames = name.partition("+")
    if plus and frames != "jpeg":
        raise SystemExit(f"error: format {name!r}: the only frames suffix is +jpeg")
    options: dict = {"frames_format": "jpeg"} if plus else {}
    base, _, suffix = features.partition("-")
    if base == "fp16" and not suffix:
        return options
    if base == "int8" and not suffix:
        return {**options, "dtype": "int8"}
    if not base.startswith("pca") or suffix not in ("", "int8"):
        raise SystemExit(f"error: format {name!r}: use fp16, int8, pcaK, pcaF, pcaK-int8 or pcaF-int8, "
                         f"optionally +jpeg")
    return {**options, "pca": parse_pca(base[3:]), "dtype": "int8" if suffix else "fp16"}


def format_store(fp16_store: Path, name: str, workdir: Path) -> Path:
    """The store of `name` made from `fp16_store` by `copy` (resumed if already there); fp16 is the store itself."""
    from pipelines.copy import copy_store

    options = parse_format(name)
    if not options:
        return fp16_store
    out = workdir / f"{fp16_store.stem}-{name.replace('+', '-')}.zarr"
    copy_store(str(fp16_store), str(out), progress=False, **options)
    return out
