"""`dist-cache copy` on real stores: layer subsets, int8, resume, a refused mismatching destination,
and pulling a store over HTTP from a loopback server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

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


def run_cli(*args: object) -> "click.testing.Result":
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def assert_copied(src: FeatureStore, dst: FeatureStore, layers: list[int], rtol: float) -> None:
    assert dst.complete and dst.layers == layers and dst.videos == src.videos
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
    assert run_cli("copy", source / "src.zarr", tmp_path / "q.zarr", "--layers", "last:1", "--dtype", "int8").exit_code == 0
    q = FeatureStore.open(tmp_path / "q.zarr")
    assert q.dtype == "int8"
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


def test_copy_from_http(source, tmp_path):
    with serve(source) as (base, _):
        result = run_cli("copy", f"{base}/src.zarr", tmp_path / "local.zarr")
    assert result.exit_code == 0, result.output
    assert_copied(FeatureStore.open(source / "src.zarr"), FeatureStore.open(tmp_path / "local.zarr"), [0, 1, 2], rtol=0)
