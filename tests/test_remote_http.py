"""Stores read over HTTP from real servers on loopback: a Range-capable one, and python's stock
http.server, which ignores Range and must make reads fail loudly rather than return wrong bytes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from dist_cache.errors import UserError
from pipelines.extract import ExtractOptions, extract
from servers import serve
from storage import FeatureStore, testing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("http")
    testing.write_videos(str(root / "s.zarr"), testing.make_schema(num_videos=3, views=2), [0, 1, 2], finalize=True)
    return root


def test_open_costs_one_request_and_reads_only_the_needed_ranges(tiny_store):
    local = FeatureStore.open(tiny_store / "s.zarr")
    with serve(tiny_store) as (base, requests):
        store = FeatureStore.open(f"{base}/s.zarr")
        assert len(requests) <= 3  # consolidated metadata: the root zarr.json is enough
        assert store.complete and store.fingerprint == local.fingerprint
        assert json.dumps(store.sample(3), default=str) == json.dumps(local.sample(3), default=str)
        before = len(requests)
        got = store.features(3, layers=[1])
        feature_requests = [r for r in requests[before:] if "/features/" in r[0]]
        # The shard's index (a suffix range) and the one inner chunk of layer 1: never the whole shard.
        assert feature_requests and all(rng and rng.startswith("bytes=") for _, rng in feature_requests)
        assert len(feature_requests) == 2
        np.testing.assert_array_equal(got, local.features(3, layers=[1]))
        np.testing.assert_array_equal(store.clip_embeddings(5), local.clip_embeddings(5))


def test_server_without_range_support_fails_loudly(tiny_store):
    with serve(tiny_store, ranges=False) as (base, _):
        store = FeatureStore.open(f"{base}/s.zarr")  # whole small files still work
        with pytest.raises(UserError, match="supports HTTP Range requests"):
            store.features(0)


def test_http_stores_are_read_only(tiny_store):
    with serve(tiny_store) as (base, _):
        with pytest.raises(UserError, match="read-only"):
            testing.write_videos(f"{base}/new.zarr", testing.make_schema(num_videos=3), [0])


def run_cli(*args: object) -> "click.testing.Result":
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_train_and_eval_from_http_stores(motion_dataset, tiny_checkpoint, tmp_path):
    for name, csv, views, split in (("train.zarr", "train.csv", 1, "train"), ("val.zarr", "val.csv", 1, "test")):
        extract(ExtractOptions(manifest=str(motion_dataset / csv), video_root=str(motion_dataset / "videos"),
                               out=str(tmp_path / "share" / name), model="dist-tiny", pretrained=str(tiny_checkpoint),
                               frames=4, views=views, split=split, decode_workers=1, device="cpu"), progress=False)
    videos = motion_dataset / "videos"
    with serve(tmp_path / "share") as (base, _):
        assert "complete" in run_cli("info", f"{base}/train.zarr").output.lower()
        run_cli("verify", f"{base}/val.zarr")
        run_cli("train", "--cache", f"{base}/train.zarr", "--val-cache", f"{base}/val.zarr", "--video-root", videos,
                "--out", tmp_path / "run", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--alpha-dim", "32",
                "--beta-dim", "16", "--pool-blocks", "1", "--warmup-epochs", "1", "--device", "cpu")
        out = run_cli("eval", "--checkpoint", tmp_path / "run" / "best.pt", "--cache", f"{base}/val.zarr",
                      "--video-root", videos, "--workers", "0", "--device", "cpu").output
    assert "top-1" in out.lower()
