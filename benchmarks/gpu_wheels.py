"""The wheels the one-shot GPU run carries to a lent machine that has no network: derived, then fetched in one command.

Derived from pyproject.toml's dependencies: less torch (the machine's own CUDA build), less those the run never
imports (RUN_SKIPS, each with its reason; benchmarks.gpu_preflight imports everything the run does), each with its
whole dependency tree as installed here (so the versions are the ones this checkout is tested with), less the tree of
what the lent machine already has (MACHINE_HAS, read off such a machine). Fetched for CPython 3.12 on x86-64 Linux,
binary wheels only, into .whl/ (ignored by git), replacing any wheels there (two versions of one package stop the
install), and checked against the 64 MiB a device call may carry, the repository's tracked files included:

    python -m benchmarks.gpu_wheels              # fetch into .whl/ and report the size
    python -m benchmarks.gpu_wheels --print      # only print the pip command
    python -m benchmarks.gpu_wheels --machine-has aiohttp   # trust the machine with more (if over the limit)

benchmarks/gpu.sh installs them with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` where its
preflight finds a package missing.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import subprocess
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
# What the lent machine's python3 had when it was last probed (benchmarks/RESULTS.md, "The GPU run"); the rest of a
# consistent install of these (their own dependencies) is there too.
MACHINE_HAS = ("torch", "numpy", "fsspec", "click", "tqdm", "matplotlib", "torchvision", "regex", "PyYAML", "timm")
# pyproject.toml dependencies the run never imports (benchmarks.gpu_preflight's lists are what it does import).
RUN_SKIPS = {
    "torch": "the machine's own CUDA build; a PyPI wheel would be ~900 MB",
    "dask": "extraction on a dask cluster (--dask-workers, --scheduler); the run extracts in-process",
    "s3fs": "s3:// stores (with botocore, 16 MB); the run's stores are local",
    "requests": "weight downloads; nothing can be downloaded there",
    "tomli": "--config FILE.toml on Python 3.10; the machine runs 3.12",
}
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
LIMIT_BYTES = 64 * 2**20  # what one device call carries: tracked files, untracked ones and carried paths together


def _applies(req: Requirement, extras: set[str]) -> bool:
    if req.marker is None:
        return True
    environment = {**default_environment(), **TARGET}
    return any(req.marker.evaluate({**environment, "extra": extra}) for extra in extras | {""})


def dependency_tree(requirements: list[Requirement]) -> dict[str, str]:
    """Canonical name -> installed version of every distribution `requirements` need on the target, recursively,
    as installed in this environment (the one the project is developed and tested in)."""
    extras: dict[str, set[str]] = {}
    todo = [(req, set()) for req in requirements]
    while todo:
        req, parent_extras = todo.pop()
        if not _applies(req, parent_extras):
            continue
        name = canonicalize_name(req.name)
        wanted = set(req.extras)
        if name in extras and wanted <= extras[name]:
            continue
        extras[name] = extras.get(name, set()) | wanted
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {name} is not installed here: install the project first "
                             "(pip install -e .), whose versions the wheels pin") from None
        todo.extend((Requirement(text), extras[name]) for text in requires)
    return {name: metadata.version(name) for name in sorted(extras)}


def project_dependencies() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return [Requirement(text) for text in tomllib.load(f)["project"]["dependencies"]]


def wheel_set(machine_has: tuple[str, ...] = MACHINE_HAS) -> dict[str, str]:
    """name -> version of the wheels to carry (module docstring)."""
    skipped = {canonicalize_name(name) for name in RUN_SKIPS}
    run = [req for req in project_dependencies() if canonicalize_name(req.name) not in skipped]
    there = dependency_tree([Requirement(name) for name in machine_has])
    return {name: version for name, version in dependency_tree(run).items() if name not in there}


def pip_command(wheels: dict[str, str], dest: Path) -> list[str]:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
            TARGET["python_version"], "--implementation", "cp", *platforms, "-d", str(dest),
            *(f"{name}=={version}" for name, version in wheels.items())]


def tracked_bytes() -> int:
    """The repository's tracked files, which travel with every device call."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / name.decode()).stat().st_size for name in names if name and (ROOT / name.decode()).is_file())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dest", type=Path, default=ROOT / ".whl")
    p.add_argument("--print", dest="print_only", action="store_true", help="print the pip command, fetch nothing")
    p.add_argument("--machine-has", nargs="*", default=[],
                   help="more distributions to count on the machine (e.g. aiohttp, which the image listed in 2026-11)")
    args = p.parse_args()
    machine_has = (*MACHINE_HAS, *args.machine_has)
    wheels = wheel_set(machine_has)
    command = pip_command(wheels, args.dest)
    if args.print_only:
        print(" ".join(command))
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):
        old.unlink()
    subprocess.run(command, check=True)
    files = sorted(args.dest.glob("*.whl"))
    wheel_bytes, tree = sum(f.stat().st_size for f in files), tracked_bytes()
    report = {"wheels": {f.name: round(f.stat().st_size / 2**20, 2) for f in files},
              "wheels_MiB": round(wheel_bytes / 2**20, 2), "tracked_files_MiB": round(tree / 2**20, 2),
              "carried_MiB": round((wheel_bytes + tree) / 2**20, 2), "limit_MiB": LIMIT_BYTES / 2**20,
              "skipped": RUN_SKIPS, "machine_has": list(machine_has)}
    print(json.dumps(report, indent=1))
    if len(files) != len(wheels):
        sys.exit(f"error: {len(files)} wheels for {len(wheels)} packages in {args.dest}: one is missing or doubled")
    if wheel_bytes + tree > LIMIT_BYTES:
        sys.exit(f"error: the wheels and the tracked files come to {report['carried_MiB']} MiB, over the "
                 f"{LIMIT_BYTES / 2**20:g} MiB a device call carries: skip more (RUN_SKIPS) or trust MACHINE_HAS more")


if __name__ == "__main__":
    main()
