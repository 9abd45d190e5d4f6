"""benchmarks/augmentation_cost.py runs as a module end to end (--quick) and writes its JSON; accuracies are
never asserted (a one-epoch run learns nothing), only that every mode ran through the real pipeline."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_augmentation_cost_quick_trains_and_scores_every_mode(tmp_path):
    out = tmp_path / "aug.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.augmentation_cost", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    results = report["results"]
    assert list(results) == [m["name"] for m in report["parameters"]["modes"]]
    assert len(results) == 6 and any("reaugment" in name for name in results)
    for r in results.values():
        assert len(r["top1"]) == len(report["parameters"]["seeds"])
        assert all(0.0 <= t <= 1.0 for t in r["top1"]) and r["steps"] == results["cached K=1"]["steps"] > 0
