"""benchmarks/compact.py runs as a module end to end (--quick: every part, the timing too) and reports one JSON
object. Accuracies and timings are never asserted (a one-epoch run learns nothing; timings are the benchmark's), only
that each part measured what it says: bytes from the layout and the JPEG frames measured, per-layer errors of every
format with the outliers making per-token absmax worse on the ordinary channels, every format trained on every
seed and paired against fp16 (and probed, on the appearance task), the equal-bytes runs on compact copies, and the
timing's sides."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("compact")
    out = work / "compact.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.compact", "--quick", "--out", str(out), "--workdir",
                           str(work / "work")], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one JSON object on stdout, the same as --out
    assert report == json.loads(out.read_text())
    return report, work / "work"


def test_bytes_per_view_and_per_k400_store(quick_report):
    report, _ = quick_report
    table = report["bytes"]
    formats = table["per_format"]
    assert {"fp16", "int8", "pca128", "pca128-int8", "pca0.99-int8"} <= set(formats)
    # ViT-B/16, 8 frames, 12 layers: 29.05 MB of fp16 tokens, uint8 frames at gamma 2 (16 x 224 x 224 x 3).
    assert 29.0e6 < formats["fp16"]["features"] < 29.1e6
    assert table["raw_frames_per_view"] >= 16 * 224 * 224 * 3
    assert formats["pca128-int8"]["components"] == [128] * 12
    assert formats["pca128-int8"]["features"] < formats["pca128"]["features"] < formats["int8"]["features"]
    for row in formats.values():
        for frames, entry in row.items():
            if isinstance(entry, dict) and "per_view" in entry:
                assert entry["k400"]["2"] == pytest.approx(entry["per_view"] * table["k400_videos"] * 2)
                if frames.startswith("jpeg"):  # measured on real frames: far below the raw frames' bytes
                    assert entry["per_view"] < row["raw"]["per_view"] - table["raw_frames_per_view"] / 2
    assert any(name.startswith("k400_like/") for name in table["jpeg_bytes_per_view"])


def test_errors_per_layer_and_the_outliers_absmax_cannot_hold(quick_report):
    report, _ = quick_report
    tiny, outliers = report["error"]["tiny_random"], report["error"]["tiny_random_outliers"]
    absmax = "int8 per-token absmax (format 2)"
    for table in (tiny, outliers):
        assert {absmax, "int8", "pca16", "pca16-int8", "pca0.99-int8"} <= set(table)
        for name, r in table.items():
            if not name.startswith("_"):
                assert len(r["relative"]) == len(r["cosine_mean"]) == 2  # the tiny CLIP's two layers
                assert all(0 <= e < 1 for e in r["relative"])
    # Fewer components, more error; massive activations crush per-token absmax on the ordinary channels only.
    assert max(tiny["pca8"]["relative"]) > max(tiny["pca32"]["relative"])
    assert max(outliers[absmax]["relative_inliers"]) > 2 * max(outliers["int8"]["relative_inliers"])


def test_accuracy_is_paired_by_seed_against_fp16(quick_report):
    report, work = quick_report
    for task in ("appearance", "motion"):
        results = report["accuracy"][task]["results"]
        assert list(results) == report["accuracy"][task]["parameters"]["formats"]
        fp16 = results["fp16"]["top1"]
        for name, r in results.items():
            assert len(r["top1"]) == len(fp16) == 1
            assert r["paired_vs_fp16"]["per_seed"] == pytest.approx([a - b for a, b in zip(r["top1"], fp16)])
            if name != "fp16":  # the fp16-trained model scored on this format's test store, paired the same way
                read = r["fp16_model"]
                assert read["paired_vs_fp16"]["per_seed"] == pytest.approx([a - b for a, b in zip(read["top1"], fp16)])
    appearance = report["accuracy"]["appearance"]["parameters"]
    assert appearance["clip"]["width"] == 768 and appearance["switches"]["temporal"] is False
    # The convex probe beside the training: fitted per seed on each format's training store, paired the same way.
    results = report["accuracy"]["appearance"]["results"]
    for r in results.values():
        probe = r["probe"]
        assert len(probe["top1"]) == len(probe["train_top1"]) == 1 and probe["converged"]
        assert probe["paired_vs_fp16"]["per_seed"] == pytest.approx(
            [a - b for a, b in zip(probe["top1"], results["fp16"]["probe"]["top1"])])
    from storage import FeatureStore

    jpeg = FeatureStore.open(next(work.glob("motion/motion-train-k2-s0-*jpeg.zarr")))
    assert jpeg.schema.frames_format[0] == "jpeg" and jpeg.schema.encoding["fit"]["components"]


def test_equal_bytes_trains_compact_copies_beside_online(quick_report):
    report, work = quick_report
    part = report["equal_bytes"]
    names = list(part["results"])
    assert names[0] == "cached K=1 (fp16)" and any("K=8" in n for n in names) and any("online" in n for n in names)
    from storage import FeatureStore

    k8 = FeatureStore.open(next(work.glob("equal_bytes/train-k8-s0-*.zarr")))
    assert k8.schema.views_per_video == 8 and k8.schema.encoding is not None


def test_timing_sides(quick_report):
    report, _ = quick_report
    loader, step = report["timing"]["loader"]["formats"], report["timing"]["step"]
    assert set(loader) == {"fp16", "int8", "pca128-int8", "pca128-int8+jpeg"}
    assert loader["pca128-int8"]["MB_per_clip_read"] < loader["int8"]["MB_per_clip_read"] < \
        loader["fp16"]["MB_per_clip_read"]
    assert set(step["over_fp16"]) == {"int8", "pca128", "pca128-int8"}
    assert set(report["summary"]) >= {"MB_per_view", "accuracy", "equal_bytes", "loader_over_plain"}
