"""benchmarks/augmentation_cost.py runs as a module end to end (--quick) and writes its JSON; accuracies are
never asserted (a one-epoch run learns nothing), only that every mode ran through the real pipeline, that the
differences are paired per seed against the online baseline, and that compute is counted from the profile."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_augmentation_cost_quick_trains_and_scores_every_mode(tmp_path):
    out = tmp_path / "aug.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.augmentation_cost", "--quick", "--out", str(out),
                           "--workdir", str(tmp_path / "work")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    results, baseline = report["results"], report["parameters"]["baseline"]
    assert list(results) == [m["name"] for m in report["parameters"]["modes"]]
    assert len(results) == 6 and baseline in results
    seeds = report["parameters"]["seeds"]
    for name, r in results.items():
        assert len(r["top1"]) == len(seeds)
        assert all(0.0 <= t <= 1.0 for t in r["top1"]) and r["steps"] == results["cached K=1"]["steps"] > 0
        if name != baseline:  # mode minus online, seed by seed
            assert r["paired_vs_online"]["per_seed"] == pytest.approx(
                [a - b for a, b in zip(r["top1"], results[baseline]["top1"])])
    # Each seed extracted its own cached views; the test split scores 3 clips per video.
    work = tmp_path / "work"
    assert sorted(p.name for p in work.glob("train-k*-s*.zarr")) == [f"train-k{k}-s{s}.zarr" for k in (1, 2, 4)
                                                                     for s in seeds]
    from storage import FeatureStore

    assert FeatureStore.open(work / "train-k2-s0.zarr").schema.sampling["seed"] == 0
    assert FeatureStore.open(work / "test.zarr").schema.views_per_video == report["parameters"]["test_clips"] == 3
    # Compute: a cached run paid K CLIP passes over its videos at extraction; online pays CLIP at every step.
    per_clip = report["gflops_per_clip"]
    assert per_clip["clip"] > 0 and per_clip["branch"] > 0
    k4, online = results["cached K=4"]["gflops"], results[baseline]["gflops"]
    assert k4["extraction"] == pytest.approx(4 * 8 * per_clip["clip"]) and online["extraction"] == 0
    assert online["training"] > k4["training"]
    equal = report["equal_compute"]
    assert set(equal) == {name for name in results if not name.startswith("online")}
    for eq in equal.values():
        assert eq["online_epochs"] >= 1 and len(eq["online"]["top1"]) == len(seeds)
        assert len(eq["paired_cached_minus_online"]["per_seed"]) == len(seeds)
