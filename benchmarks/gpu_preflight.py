"""Before the one-shot GPU run spends device time: can this Python import everything the run uses?

Two passes, both in this process:
1. every third-party package the run imports is looked up without importing it (`importlib.util.find_spec`: a
   fraction of a second), and each missing one is printed with the distribution that provides it;
2. only if none is missing, every module the run's steps import is imported (a few seconds: torch, open_clip,
   zarr...), so a package that is present but broken (a wheel for another Python, a missing shared library) is
   caught too, each failure printed with its first line.
Exit 0 when all is there; 1 with one `missing: MODULE (pip: DISTRIBUTION)` or `broken: MODULE: why` line each,
so `benchmarks/gpu.sh` aborts within seconds instead of failing a step minutes in. `--cuda` also requires a CUDA
device (the full run measures nothing without one).

    python -m benchmarks.gpu_preflight [--cuda]

The lists below are what benchmarks/gpu.sh's steps import (traced from a QUICK=1 run, every process of it);
`benchmarks.gpu_wheels` fetches the wheels of those the lent machine lacks. Only the standard library is imported at
module level, so a machine without our packages still runs this file.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time

# Top-level module -> the distribution that provides it: every third-party package the run imports directly.
PACKAGES = {
    "torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "PIL": "pillow",
    "open_clip": "open_clip_torch", "timm": "timm", "ftfy": "ftfy", "regex": "regex",
    "huggingface_hub": "huggingface_hub", "safetensors": "safetensors",
    "decord": "decord", "av": "av",
    "zarr": "zarr", "numcodecs": "numcodecs", "donfig": "donfig", "crc32c": "crc32c", "google_crc32c": "google-crc32c",
    "fsspec": "fsspec", "aiohttp": "aiohttp", "yarl": "yarl", "multidict": "multidict",
    "click": "click", "tqdm": "tqdm", "matplotlib": "matplotlib", "yaml": "PyYAML",
}
# The project's modules the steps import (benchmarks.gpu_* and those they run), and the modules they import late
# (inside functions: decoders, the demo's video generator, plots).
MODULES = (
    "cli", "storage", "storage.http", "pipelines.extract.extractor", "pipelines.train.run",
    "pipelines.train.evaluation",
    "pipelines.demo", "pipelines.train.plots", "dist_cache.backbone", "dist_cache.decode_decord",
    "dist_cache.decode_pyav", "dist_cache.synthetic", "benchmarks.gpu_data", "benchmarks.gpu_extract",
    "benchmarks.gpu_train",
    "benchmarks.store_write", "benchmarks.decode_pool", "benchmarks.gpu_summary", "benchmarks.jpeg_frames",
    "pipelines.copy", "storage.frames_codec",
)


def missing_packages() -> list[str]:
    """The PACKAGES modules this Python cannot find, without importing any of them."""
    missing = []
    for module in PACKAGES:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder that refuses the name, a half-installed package
            found = False
        if not found:
            missing.append(module)
    return missing


def broken_modules() -> list[tuple[str, str]]:
    """(module, first line of the error) for each of MODULES that does not import."""
    broken = []
    for module in MODULES:
        try:
            importlib.import_module(module)
        except Exception as err:  # any failure to import is what this pass reports, one line each
            name = getattr(err, "name", None)
            why = f"needs the missing module {name}" if isinstance(err, ModuleNotFoundError) and name else \
                f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            broken.append((module, why[:300]))
    return broken


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true", help="also require a CUDA device")
    args = p.parse_args()
    start = time.perf_counter()
    missing = missing_packages()
    for module in missing:
        print(f"missing: {module} (pip: {PACKAGES[module]})")
    if missing:
        print(f"preflight: {len(missing)} package(s) missing; carry their wheels (python -m benchmarks.gpu_wheels, "
              "benchmarks/RESULTS.md, 'The GPU run')")
        sys.exit(1)
    broken = broken_modules()
    for module, why in broken:
        print(f"broken: {module}: {why}")
    if broken:
        print(f"preflight: {len(broken)} module(s) of the run do not import")
        sys.exit(1)
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print("preflight: no CUDA device: the full run measures the GPU (QUICK=1 runs on the CPU)")
            sys.exit(1)
    print(f"preflight: ok, {len(PACKAGES)} packages and {len(MODULES)} modules in "
          f"{time.perf_counter() - start:.1f} s (python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
