"""`dist-cache copy --videos-per-shard N` and `--drop-dense-frames`: a packed copy holds the source's features,
embeddings and frames exactly, read through FeatureStore and through zarr itself; it resumes a group at a time,
waits for groups whose videos the source has not extracted yet, is never written into otherwise, and trains and
evaluates like its source."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner, Result

import cli
from pipelines.extract.extractor import ExtractOptions, extract
from storage import FeatureStore, StoreMismatchError, StoreWriter, layout
from storage.testing import make_schema, manifest, write_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(*args: object) -> Result:
    result = CliRunner().invoke(cli.main, list(map(str, args)))
    assert result.exit_code == 0, result.output
    return result


def copy(*args: object) -> Result:
    return run("copy", *args)


def files(root: Path) -> list[str]:
    return sorted(str(Path(d, f).relative_to(root)) for d, _, names in os.walk(root) for f in names)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """7 videos x 2 views, int8 with dense frames, video 2 failed: 3 groups of 3, the last one short."""
    root = tmp_path_factory.mktemp("packed") / "src.zarr"
    write_videos(str(root), make_schema(num_videos=7, views=2, dtype="int8", dense_gamma=2, layers=[0, 1, 2]),
                 range(7), fail={2}, finalize=True)
    return root


def test_a_packed_copy_holds_the_source_exactly(source, tmp_path):
    dst = tmp_path / "p.zarr"
    copy(source, dst, "--videos-per-shard", "3")
    src, packed = FeatureStore.open(source), FeatureStore.open(dst)
    assert packed.complete and packed.videos_per_shard == 3 and packed.fingerprint == src.fingerprint
    np.testing.assert_array_equal(packed.status, src.status)
    group = zarr.open_group(dst, mode="r")  # zarr's own reader, its own checksum checks
    for i in map(int, src.done_indices()):
        raw, ref = packed.read_sample(i), src.read_sample(i)
        np.testing.assert_array_equal(raw.features, ref.features)
        np.testing.assert_array_equal(raw.scales, ref.scales)
        np.testing.assert_array_equal(packed.read_sample(i, layers=[2, 0]).features, ref.features[[2, 0]])
        np.testing.assert_array_equal(packed.clip_embeddings(i), src.clip_embeddings(i))
        np.testing.assert_array_equal(packed.frames(i, gamma=1), src.frames(i, gamma=1))
        a, b = packed.sample(i), src.sample(i)
        np.testing.assert_array_equal(a.pop("sparse_indices"), b.pop("sparse_indices"))
        assert a == b
        np.testing.assert_array_equal(group["features"][i], ref.features)
        np.testing.assert_array_equal(group["feature_scales"][i], ref.scales)
        np.testing.assert_array_equal(group["clip_embeddings"][i], src.clip_embeddings(i))
        np.testing.assert_array_equal(group["frames"][i], src.frames(i))
    assert not group["features"][4:6].any()  # the failed video's rows: missing chunks, zarr's fill value
    try:
        import xarray
    except ImportError:
        pass  # a test dependency (pyproject's [test] extra); zarr alone above is the check without it
    else:
        ds = xarray.open_zarr(dst, consolidated=True, mask_and_scale=False)
        np.testing.assert_array_equal(ds["features"].values[6:], group["features"][6:])
        np.testing.assert_array_equal(ds["frames"][13].values, src.frames(13))
    # 3 groups: one shard per array and group, one record per group.
    shards = [f for f in files(dst) if "/c." in f and not f.startswith(("samples", "videos", "text"))]
    assert len(shards) == 4 * 3 and files(dst / "records") == [f"group-00000000{g}.json" for g in range(3)]
    assert len(files(dst)) < len(files(source))
    assert all(packed.check_video(v, deep=True) == [] for v in range(7))


def test_a_packed_copy_resumes_a_group_at_a_time(source, tmp_path):
    dst = tmp_path / "p.zarr"
    copy(source, dst, "--videos-per-shard", "3")
    before = {f: (dst / f).read_bytes() for f in files(dst) if not f.startswith(("samples", "videos", "zarr.json"))}
    (dst / layout.group_record_key(1)).unlink()  # what a copy killed before recording group 1 leaves
    again = copy(source, dst, "--videos-per-shard", "3")
    assert "copied 3 videos, skipped 4 (already there), failed 0" in again.stdout
    assert {f: (dst / f).read_bytes() for f in before} == before  # the same bytes again
    refused = CliRunner().invoke(cli.main, ["copy", str(source), str(dst), "--videos-per-shard", "2"])
    assert refused.exit_code == 2 and "packed copy (3 videos per shard), which is read-only" in refused.output
    with pytest.raises(StoreMismatchError, match="read-only"):  # extract's writer (one video per shard)
        StoreWriter.open(str(dst), FeatureStore.open(source).schema, *manifest(FeatureStore.open(source).schema))


def test_groups_wait_for_videos_the_source_has_not_extracted(tmp_path):
    schema = make_schema(num_videos=5, views=1)
    write_videos(str(tmp_path / "src.zarr"), schema, [0, 1, 3])
    first = copy(tmp_path / "src.zarr", tmp_path / "p.zarr", "--videos-per-shard", "2")
    assert "copied 2 videos" in first.stdout
    assert "2 not extracted in the source yet, 1 more wait for them" in first.stdout
    progress = FeatureStore.open(tmp_path / "p.zarr")
    assert progress.progress() == {"done": 2, "failed": 0, "pending": 3} and progress.sample(1)["status"] == "done"
    write_videos(str(tmp_path / "src.zarr"), schema, [2, 4], finalize=True)
    copy(tmp_path / "src.zarr", tmp_path / "p.zarr", "--videos-per-shard", "2")
    done = FeatureStore.open(tmp_path / "p.zarr")
    assert done.complete
    for i in range(5):
        np.testing.assert_array_equal(done.features(i), FeatureStore.open(tmp_path / "src.zarr").features(i))


def test_frames_can_be_dropped(source, tmp_path):
    copy(source, tmp_path / "n.zarr", "--drop-dense-frames", "--layers", "last:1")
    dropped, src = FeatureStore.open(tmp_path / "n.zarr"), FeatureStore.open(source)
    assert not dropped.has_frames and not (tmp_path / "n.zarr" / "frames").exists()
    np.testing.assert_array_equal(dropped.features(1), src.features(1, [2]))
    kept = copy(source, tmp_path / "k.zarr")
    assert "copied 6 videos" in kept.stdout and FeatureStore.open(tmp_path / "k.zarr").dense_gamma == 2


def test_training_and_evaluation_read_packed_copies(motion_dataset, tiny_checkpoint, tmp_path):
    """The same checkpoint scores the same on a packed copy as on its source; training runs from packed copies."""
    videos = str(motion_dataset / "videos")
    for name, csv, views, split in (("train", "train.csv", 2, "train"), ("val", "val.csv", 2, "test")):
        extract(ExtractOptions(manifest=str(motion_dataset / csv), video_root=videos,
                               out=str(tmp_path / f"{name}.zarr"),
                               model="dist-tiny", pretrained=str(tiny_checkpoint), frames=4, views=views, split=split,
                               decode_workers=1, device="cpu"), progress=False)
        copy(tmp_path / f"{name}.zarr", tmp_path / f"{name}-packed.zarr", "--videos-per-shard", "3")
    run("train", "--cache", tmp_path / "train-packed.zarr", "--val-cache", tmp_path / "val-packed.zarr",
        "--video-root", videos, "--out", tmp_path / "run", "--alpha-dim", "32", "--beta-dim", "16", "--pool-blocks",
        "1", "--batch-size", "4", "--decode-workers", "0", "--warmup-epochs", "1", "--epochs", "1", "--device", "cpu")
    for store in ("val", "val-packed"):
        run("eval", "--checkpoint", tmp_path / "run" / "best.pt", "--cache", tmp_path / f"{store}.zarr",
            "--video-root", videos, "--decode-workers", "0", "--device", "cpu", "--report", tmp_path / f"{store}.json")
    reports = [json.loads((tmp_path / f"{store}.json").read_text()) for store in ("val", "val-packed")]
    for key in ("top1", "top5", "per_class_accuracy", "confusion_matrix", "views"):
        assert reports[0][key] == reports[1][key], key
