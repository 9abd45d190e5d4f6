"""Stores read over HTTP from real servers on loopback: a Range-capable one, one that fails on purpose
(503s, dropped connections, going away mid-copy), and python's stock http.server, which ignores Range and
must make reads fail loudly rather than return wrong bytes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

import cli
from dist_cache.errors import UserError
from pipelines.extract.extractor import ExtractOptions, extract
from servers import Faults, serve, serve_in_process
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


def test_a_server_without_range_support_is_read_whole_once_per_shard(tiny_store, caplog, monkeypatch):
    """python's http.server answers a Range request with the whole object (200): the range is cut from it, never
    the whole body returned as the range, and the shard is kept, so its index and its layers cost one download."""
    from storage import http

    monkeypatch.setattr(http, "WHOLE_OBJECTS", http._WholeObjects())
    local = FeatureStore.open(tiny_store / "s.zarr")
    with serve(tiny_store, ranges=False) as (base, _):
        store = FeatureStore.open(f"{base}/s.zarr")
        for i in range(len(local)):
            np.testing.assert_array_equal(store.features(i, layers=[1]), local.features(i, layers=[1]))
            np.testing.assert_array_equal(store.clip_embeddings(i), local.clip_embeddings(i))
    shards = [url for url in http.WHOLE_OBJECTS.bodies if "/features/" in url]
    assert len(shards) == 3  # one per video, each downloaded once
    warnings = [r.getMessage() for r in caplog.records if "ignores HTTP Range requests" in r.getMessage()]
    assert len(warnings) == 1 and "a Range-capable server" in warnings[0] and "\n" not in warnings[0], warnings


def test_past_the_cache_an_object_is_streamed_up_to_the_range(tiny_store, monkeypatch):
    """An object larger than the cache's budget is never kept: each read streams it, keeping only its range."""
    from storage import http

    monkeypatch.setattr(http, "WHOLE_OBJECTS", http._WholeObjects())
    local = FeatureStore.open(tiny_store / "s.zarr")
    with serve(tiny_store, ranges=False) as (base, _):
        store = FeatureStore.open(f"{base}/s.zarr", storage_options={"whole_object_cache_mb": 0.001})
        for i in (0, 3, 5):
            np.testing.assert_array_equal(store.read_sample(i).features, local.read_sample(i).features)
    assert not [url for url in http.WHOLE_OBJECTS.bodies if "/features/" in url]


def test_http_stores_are_read_only(tiny_store):
    with serve(tiny_store) as (base, _):
        with pytest.raises(UserError, match="read-only"):
            testing.write_videos(f"{base}/new.zarr", testing.make_schema(num_videos=3), [0])


def test_http_headers_pass_through_storage_options(tiny_store, tmp_path):
    """A server that wants an Authorization header: `--storage-options '{"headers": ...}'` gets info and copy
    through (copy's every ranged read carries it); without it, one line and exit 2."""
    token = {"Authorization": "Bearer s3cret"}
    with serve(tiny_store, require=token) as (base, _):
        refused = CliRunner().invoke(cli.main, ["info", f"{base}/s.zarr"])
        assert refused.exit_code == 2 and "401" in refused.output and "--storage-options" in refused.output
        assert len(refused.output.strip().splitlines()) == 1, refused.output
        options = json.dumps({"headers": token})
        info = CliRunner().invoke(cli.main, ["info", f"{base}/s.zarr", "--storage-options", options])
        assert info.exit_code == 0 and "complete" in info.output, info.output
        copy = CliRunner().invoke(cli.main, ["copy", f"{base}/s.zarr", str(tmp_path / "c.zarr"),
                                             "--storage-options", options])
        assert copy.exit_code == 0, copy.output
    copied_equal(tiny_store / "s.zarr", tmp_path / "c.zarr")


def run_cli(*args: object) -> Result:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def share(motion_dataset, tiny_checkpoint, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("share")
    for name, csv, views, split in (("train.zarr", "train.csv", 1, "train"), ("val.zarr", "val.csv", 1, "test")):
        extract(ExtractOptions(manifest=str(motion_dataset / csv), video_root=str(motion_dataset / "videos"),
                               out=str(root / name), model="dist-tiny", pretrained=str(tiny_checkpoint),
                               frames=4, views=views, split=split, decode_workers=1, device="cpu"), progress=False)
    return root


TRAIN_FLAGS = ("--epochs", "1", "--batch-size", "4", "--decode-workers", "0", "--alpha-dim", "32", "--beta-dim", "16",
               "--pool-blocks", "1", "--warmup-epochs", "1", "--device", "cpu")


def test_train_and_eval_from_http_stores(share, motion_dataset, tmp_path):
    videos = motion_dataset / "videos"
    with serve(share) as (base, _):
        assert "complete" in run_cli("info", f"{base}/train.zarr").output.lower()
        run_cli("verify", f"{base}/val.zarr")
        run_cli("train", "--cache", f"{base}/train.zarr", "--val-cache", f"{base}/val.zarr", "--video-root", videos,
                "--out", tmp_path / "run", *TRAIN_FLAGS)
        out = run_cli("eval", "--checkpoint", tmp_path / "run" / "best.pt", "--cache", f"{base}/val.zarr",
                      "--video-root", videos, "--decode-workers", "0", "--device", "cpu").output
    assert "top-1" in out.lower()


def test_train_and_eval_from_pythons_own_http_server(share, motion_dataset, tmp_path, caplog):
    """`python -m http.server`, the most common way to share a folder, ignores Range: a store it serves trains and
    evaluates exactly as the same store read from disk, with one warning naming what Range support would save."""
    videos = motion_dataset / "videos"
    run_cli("train", "--cache", share / "train.zarr", "--video-root", videos, "--out", tmp_path / "local",
            *TRAIN_FLAGS)
    local = run_cli("eval", "--checkpoint", tmp_path / "local" / "best.pt", "--cache", share / "val.zarr",
                    "--video-root", videos, "--decode-workers", "0", "--device", "cpu").stdout
    with serve_in_process(share, stock=True) as (base, _):
        run_cli("train", "--cache", f"{base}/train.zarr", "--video-root", videos, "--out", tmp_path / "http",
                *TRAIN_FLAGS)
        served = run_cli("eval", "--checkpoint", tmp_path / "http" / "best.pt", "--cache", f"{base}/val.zarr",
                         "--video-root", videos, "--decode-workers", "0", "--device", "cpu").stdout
    # (printed on stderr by logging's last-resort handler; pytest's handler takes the records here)
    warning = [r.getMessage() for r in caplog.records if "ignores HTTP Range requests" in r.getMessage()]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "a Range-capable server" in warning[0]
    weights = [torch.load(tmp_path / run / "best.pt", weights_only=True)["model"] for run in ("local", "http")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert [line for line in served.splitlines() if "top-1" in line] == \
        [line for line in local.splitlines() if "top-1" in line]


def test_a_frozen_server_stops_training_at_the_deadline(share, motion_dataset, tmp_path):
    """The server's process stops (SIGSTOP) mid-run: its kernel still accepts connections and nothing answers. Each
    try once waited up to 60 s for an answer, five tries in a row (past 126 s, still retrying); one deadline
    bounds the whole read now, here 3 s (`retry_deadline_s`), and training stops with one line."""
    with serve_in_process(share, freeze_after=30) as (base, _):
        done = subprocess.run(
            [sys.executable, "-m", "cli", "train", "--cache", f"{base}/train.zarr", "--video-root",
             str(motion_dataset / "videos"), "--out", str(tmp_path / "run"), *TRAIN_FLAGS,
             "--storage-options", json.dumps({"retry_deadline_s": 3})],
            capture_output=True, text=True, timeout=300)  # a hang guard: a bounded read ends long before
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"cannot read {base}/train.zarr/" in errors[0] and "the 3 s limit of one read" in errors[0], errors


def test_a_server_that_goes_away_mid_train_is_one_line(share, motion_dataset, tmp_path, quick_retries):
    faults = Faults("stop", range(30, 10**6))  # after opening and checking the store (~23 GETs): mid-epoch
    with serve(share, faults=faults) as (base, _):
        result = CliRunner().invoke(cli.main, ["train", "--cache", f"{base}/train.zarr", "--video-root",
                                               str(motion_dataset / "videos"), "--out", str(tmp_path / "run"),
                                               *TRAIN_FLAGS])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert f"cannot read {base}/train.zarr/" in line and "rerun the command" in line, line


@pytest.fixture
def quick_retries(monkeypatch):
    """The same retries, with waits of milliseconds instead of seconds."""
    from storage import http

    monkeypatch.setattr(http, "RETRY_DELAYS_S", (0.01, 0.02, 0.04))


def copied_equal(src: Path, dst: Path) -> None:
    a, b = FeatureStore.open(src), FeatureStore.open(dst)
    assert b.complete and b.fingerprint == a.fingerprint
    for i in a.done_indices():
        np.testing.assert_array_equal(b.features(int(i)), a.features(int(i)))


@pytest.mark.parametrize("action", ["fail", "drop"])
def test_transient_failures_are_retried(tiny_store, tmp_path, quick_retries, action):
    """503s and connections closed without an answer, three in a row: each GET is tried up to four times."""
    faults = Faults(action, range(3, 6))
    with serve(tiny_store, faults=faults) as (base, _):
        result = CliRunner().invoke(cli.main, ["copy", f"{base}/s.zarr", str(tmp_path / "c.zarr")])
    assert result.exit_code == 0, result.output
    assert faults.count > 6  # the faults happened, and reading went on after them
    copied_equal(tiny_store / "s.zarr", tmp_path / "c.zarr")


def error_lines(result: Result) -> list[str]:
    assert "Traceback" not in result.output and not isinstance(result.exception, Exception) or \
        isinstance(result.exception, SystemExit), result.output
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def test_a_server_that_goes_away_mid_copy_is_one_line_then_the_copy_resumes(tiny_store, tmp_path, quick_retries):
    faults = Faults("stop", range(28, 10**6))  # after the tables and the first video
    with serve(tiny_store, faults=faults) as (base, _):
        result = CliRunner().invoke(cli.main, ["copy", f"{base}/s.zarr", str(tmp_path / "c.zarr")])
    assert result.exit_code == 2, result.output
    [line] = error_lines(result)
    assert f"cannot read {base}/s.zarr/" in line and "4 tries" in line and "rerun the command" in line, line
    partial = FeatureStore.open(tmp_path / "c.zarr")
    done = partial.progress()["done"]
    assert not partial.complete and 0 < done < 3  # stopped mid-copy
    port = int(base.rsplit(":", 1)[1])
    with serve(tiny_store, port=port):
        again = CliRunner().invoke(cli.main, ["copy", f"{base}/s.zarr", str(tmp_path / "c.zarr")])
    assert again.exit_code == 0 and f"skipped {done}" in again.stdout, again.output
    copied_equal(tiny_store / "s.zarr", tmp_path / "c.zarr")


def test_client_sessions_are_closed_at_exit(tiny_store):
    """No "Unclosed client session" from aiohttp: zarr's asynchronous sessions are closed too."""
    with serve(tiny_store) as (base, _):
        for command in (["info", f"{base}/s.zarr"], ["verify", f"{base}/s.zarr"]):
            done = subprocess.run([sys.executable, "-m", "cli", *command], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert "Unclosed" not in done.stderr and "Traceback" not in done.stderr, done.stderr
