"""Shared helpers for the benchmark scripts: argument parsing and the one-JSON-object report."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from collections.abc import Callable

import torch


def parse(description: str, extra: Callable[[argparse.ArgumentParser], object] | None = None) -> argparse.Namespace:
    """--device and --quick, plus whatever `extra` adds for one script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    if extra is not None:
        extra(p)
    return p.parse_args()


def machine() -> dict:
    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    except OSError:
        pass
    return info


def report(parameters: dict, results: dict, ratio, goal: str, verdict: str, **extra) -> None:
    print(json.dumps({
        "machine": machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + sys.argv),
        "parameters": parameters,
        "results": results,
        "ratio": ratio,
        "goal": goal,
        "verdict": verdict,
        **extra,
    }, indent=1, default=str))
