"""`dist-cache copy` on real stores: layer subsets, int8, resume, a refused mismatching destination,
and pulling a store over HTTP from a loopback server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import cli
from servers import serve
from storage import FeatureStore, testing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("copy")
    schema = testing.make_schema(num_videos=4, views=2, layers=[0, 1, 2])
    testing.write_videos(str(root / "src.zarr"), schema, [0, 1, 2, 3], fail={2}, finalize=True)
    return root


def run_cli(*args: object) -> Result:
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_copied(src: FeatureStore, dst: FeatureStore, layers: list[int], rtol: float) -> None:
    assert dst.complete and list(dst.schema.layers) == layers and dst.videos == src.videos
    np.testing.assert_array_equal(dst.status, src.status)
    np.testing.assert_array_equal(dst.text_features, src.text_features)
    for i in src.done_indices():
        ref = src.features(int(i), layers).astype(np.float32)
        got = dst.features(int(i), layers).astype(np.float32)
        if rtol == 0:
            np.testing.assert_array_equal(got, ref)
        else:  # int8: per-token absmax error, relative to the token's magnitude
            assert np.abs(got - ref).max() <= rtol * np.abs(ref).max()
        np.testing.assert_array_equal(dst.clip_embeddings(int(i)), src.clip_embeddings(int(i)))
        a, b = src.sample(int(i)), dst.sample(int(i))
        assert a["crop"] == b["crop"] and a["fps"] == b["fps"]
        np.testing.assert_array_equal(a["sparse_indices"], b["sparse_indices"])


def test_copy_layer_subset_fp16_exact_and_int8(source, tmp_path):
    src = FeatureStore.open(source / "src.zarr")
    result = run_cli("copy", source / "src.zarr", tmp_path / "l12.zarr", "--layers", "1,2")
    assert result.exit_code == 0 and "copied 3 videos" in result.output and "failed 1" in result.output
    assert_copied(src, FeatureStore.open(tmp_path / "l12.zarr"), [1, 2], rtol=0)
    assert run_cli("copy", source / "src.zarr", tmp_path / "q.zarr", "--layers", "last:1", "--dtype",
                   "int8").exit_code == 0
    q = FeatureStore.open(tmp_path / "q.zarr")
    assert q.schema.dtype == "int8"
    assert_copied(src, q, [2], rtol=0.02)


def test_copy_resumes_and_refuses_other_options(source, tmp_path):
    dst = tmp_path / "dst.zarr"
    assert run_cli("copy", source / "src.zarr", dst).exit_code == 0
    # What an interrupted copy leaves: shards of some videos without their records, not finalized.
    for v in (1, 3):
        (dst / "records" / f"{v:09d}.json").unlink()
    again = run_cli("copy", source / "src.zarr", dst)
    assert again.exit_code == 0 and "copied 2 videos, skipped 2" in again.output, again.output
    assert_copied(FeatureStore.open(source / "src.zarr"), FeatureStore.open(dst), [0, 1, 2], rtol=0)
    refused = run_cli("copy", source / "src.zarr", dst, "--dtype", "int8")
    assert refused.exit_code == 2 and "dtype" in refused.output and len(refused.output.strip().splitlines()) == 1
    bad = run_cli("copy", source / "src.zarr", tmp_path / "x.zarr", "--layers", "7")
    assert bad.exit_code == 2 and "not in the source" in bad.output


@pytest.mark.parametrize("spec, why", [
    ("last:0", "N must be 1..3"), ("last:-1", "N must be 1..3"), ("last:4", "N must be 1..3"),
    ("last:x", "N must be 1..3"), ("1,5", "[5] are not in the source"), ("a,b", "is not 'all'"), (",", "is not 'all'"),
])
def test_copy_refuses_bad_layers_in_one_line(source, tmp_path, spec, why):
    result = run_cli("copy", source / "src.zarr", tmp_path / "x.zarr", "--layers", spec)
    assert result.exit_code == 2, result.output
    assert "--layers" in result.output and why in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "x.zarr").exists()  # refused before anything is written


def test_copy_layers_follow_the_layers_grammar_over_the_source_layers():
    from pipelines.copy import source_layers

    source = testing.make_schema(num_videos=1, views=1, layers=[2, 5, 7])
    assert source_layers(None, source) == source_layers("all", source) == [2, 5, 7]
    assert source_layers("last:1", source) == [7]
    assert source_layers("last:3", source) == [2, 5, 7]
    assert source_layers(" 7, 2 ,2", source) == [2, 7]


def test_copy_keeps_every_recorded_fact(tmp_path):
    """size_bytes and sha256 survive a copy, so `verify --all-videos` can check the copied store."""
    schema = testing.make_schema(num_videos=3, views=2, layers=[0, 1])
    w = testing.open_writer(str(tmp_path / "src.zarr"), schema)
    for v in (0, 1):
        facts, plans, feats, clip = testing.video_data(schema, v)
        w.write_video(v, {**facts, "size_bytes": 5000 + v, "sha256": f"{v + 1:064x}"}, plans, feats, clip)
    facts = testing.video_data(schema, 2)[0]
    w.write_failure(2, "DecodeError: truncated", {**facts, "size_bytes": 7})  # no sha256: stays unknown
    assert w.finalize()["complete"]
    result = run_cli("copy", tmp_path / "src.zarr", tmp_path / "dst.zarr", "--layers", "last:1")
    assert result.exit_code == 0, result.output
    src, dst = FeatureStore.open(tmp_path / "src.zarr"), FeatureStore.open(tmp_path / "dst.zarr")
    fact_keys = ("num_frames", "fps", "width", "height", "size_bytes", "sha256", "status")
    for i in range(6):
        assert {k: dst.sample(i)[k] for k in fact_keys} == {k: src.sample(i)[k] for k in fact_keys}
    assert dst.sample(2)["size_bytes"] == 5001 and dst.sample(2)["sha256"] == f"{2:064x}"
    assert dst.sample(4)["size_bytes"] == 7 and dst.sample(4)["sha256"] is None
    assert dst.sample(4)["status"] == "failed"


def test_copy_from_http(source, tmp_path):
    with serve(source) as (base, _):
        result = run_cli("copy", f"{base}/src.zarr", tmp_path / "local.zarr")
    assert result.exit_code == 0, result.output
    assert_copied(FeatureStore.open(source / "src.zarr"), FeatureStore.open(tmp_path / "local.zarr"), [0, 1, 2], rtol=0)
