"""Gather benchmarks/gpu.sh's steps into one JSON object and a short table.

Each step left `<name>.rc` (exit status, or "skipped" when the budget had run out), `<name>.out` (stdout) and
`<name>.log` (stderr) in the output folder; extract, train and train_compact (the same on a compact copy of the
store) also wrote `<name>.json`. The demo's accuracy is read from its last report line; the preflight's verdict
from preflight.out. A step that has not run yet has exit null: gpu.sh rewrites the summary after every step, so a
run cut short still reports what it finished.

    python -m benchmarks.gpu_summary OUT_DIR
"""
from __future__ import annotations

import json
import platform
import re
import sys
from pathlib import Path

# gpu.sh order
STEPS = ("data", "extract", "train", "train_compact", "demo", "decode_pool", "store_write", "jpeg_frames")
# Steps whose whole stdout is one (indented) JSON object, as benchmarks._common.report prints it.
REPORTING = ("store_write", "decode_pool", "jpeg_frames")
DEMO_LINE = re.compile(r"val top-1 ([\d.]+)%")


def _json_or_none(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_json_line(path: Path) -> dict | None:
    try:
        lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def _exit(rc_file: Path) -> int | str | None:
    if not rc_file.exists():
        return None
    text = rc_file.read_text().strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _machine() -> dict:
    """benchmarks._common.machine(), or what the standard library tells where torch itself does not import (a
    failed preflight still gets its summary)."""
    try:
        from benchmarks._common import machine
    except ImportError as err:
        return {"host": platform.node(), "python": platform.python_version(), "torch": f"unavailable ({err})"}
    return machine()


def gather(out: Path) -> dict:
    steps = {}
    for name in STEPS:
        entry: dict = {"exit": _exit(out / f"{name}.rc")}
        if name in ("extract", "train", "train_compact"):
            entry["result"] = _json_or_none(out / f"{name}.json")
        elif name in REPORTING:
            entry["result"] = _json_or_none(out / f"{name}.out")
        elif name == "data":
            entry["result"] = _last_json_line(out / "data.out")
        else:
            found = DEMO_LINE.findall((out / "demo.out").read_text()) if (out / "demo.out").exists() else []
            entry["result"] = {"val_top1": float(found[-1]) / 100} if found else None
        if entry["exit"] not in (0, None, "skipped"):
            log = out / f"{name}.log"
            entry["log_tail"] = log.read_text()[-1500:] if log.exists() else ""
        steps[name] = entry
    preflight = out / "preflight.out"
    lines = preflight.read_text().splitlines() if preflight.exists() else []
    return {"machine": _machine(), "preflight": lines[-12:], "steps": steps}


def table(summary: dict) -> str:
    rows = []
    for name, entry in summary["steps"].items():
        result = entry.get("result") or {}
        headline = {k: v for k, v in result.items() if k in ("ratio", "verdict", "val_top1", "rows", "generate_s")}
        if "ratios" in result:
            headline.update(result["ratios"])
        rows.append(f"{name:8s} exit {entry['exit']}  {json.dumps(headline)}")
    return "\n".join(rows)


def main() -> None:
    summary = gather(Path(sys.argv[1]))
    print(json.dumps(summary, indent=1, default=str))
    print(table(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
