"""Stores on S3, written and read through s3fs against moto's S3 server on loopback, on a non-default endpoint
whose credentials are passed explicitly (storage_options, the CLI's --storage-options), never through the
environment: the AWS variables and config files are hidden from every test here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from servers import Faults, faulty_s3_proxy, moto_s3
from storage import FeatureStore, SampleStatus, StoreWriteError, testing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def s3(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
                 "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials
    with moto_s3() as server:
        yield server


def run(*args: object) -> str:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_write_then_read_with_storage_options(s3, tmp_path):
    schema, url, options = testing.make_schema(num_videos=3, views=2), f"s3://{s3['bucket']}/t.zarr", s3["options"]
    testing.write_videos(url, schema, [0, 2], storage_options=options)
    store = FeatureStore.open(url, storage_options=options)
    assert not store.complete and store.progress() == {"done": 2, "failed": 0, "pending": 1}
    testing.write_videos(url, schema, [1], finalize=True, storage_options=options)
    store = FeatureStore.open(url, storage_options=options)  # a reader's state is taken when it opens
    assert store.complete and store.consolidated
    local = testing.write_videos(str(tmp_path / "t.zarr"), schema, [0, 1, 2], finalize=True)
    ref = FeatureStore.open(local.url)
    for i in range(len(store)):
        np.testing.assert_array_equal(store.features(i), ref.features(i))


def test_cli_extract_info_verify_copy_with_storage_options(s3, motion_dataset, tiny_checkpoint, tmp_path):
    url, options = f"s3://{s3['bucket']}/x.zarr", json.dumps(s3["options"])
    run("extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
        "--out", url, "--storage-options", options, "--model", "dist-tiny", "--pretrained", tiny_checkpoint,
        "--frames", "4", "--decode-workers", "1", "--device", "cpu")
    (tmp_path / "options.json").write_text(options)  # @FILE: credentials kept off the command line
    info = json.loads(run("info", url, "--json", "--storage-options", f"@{tmp_path / 'options.json'}"))
    assert info["complete"] and info["measured"] == "listing"
    assert "ok" in run("verify", url, "--storage-options", options, "--video-root", motion_dataset / "videos",
                       "--pretrained", tiny_checkpoint, "--samples", "1").splitlines()[-1]
    run("copy", url, tmp_path / "local.zarr", "--storage-options", options)
    local_info = json.loads(run("info", tmp_path / "local.zarr", "--json"))
    # The same store in a bucket and on disk: the same objects (S3 lists no folders), the same bytes.
    assert (info["objects"], info["bytes"]) == (local_info["objects"], local_info["bytes"])
    packed = f"s3://{s3['bucket']}/packed.zarr"
    run("copy", tmp_path / "local.zarr", packed, "--dst-storage-options", options, "--videos-per-shard", "2")
    store, ref = FeatureStore.open(packed, storage_options=s3["options"]), FeatureStore.open(tmp_path / "local.zarr")
    assert store.videos_per_shard == 2 and store.complete
    for i in ref.done_indices():
        np.testing.assert_array_equal(store.features(int(i)), ref.features(int(i)))


def test_train_and_eval_read_s3_stores_through_storage_options(s3, motion_dataset, tiny_checkpoint, tmp_path):
    """train's --cache and --val-cache and eval's --cache on S3, credentials and endpoint passed only by
    --storage-options: without them the bucket is out of reach, with them both commands read it."""
    url, options = f"s3://{s3['bucket']}/v.zarr", json.dumps(s3["options"])
    run("extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
        "--out", url, "--storage-options", options, "--model", "dist-tiny", "--pretrained", tiny_checkpoint,
        "--frames", "4", "--split", "test", "--views", "1", "--decode-workers", "1", "--device", "cpu")
    small = ["--no-temporal", "--no-integ-to-temp", "--no-temp-to-integ", "--alpha-dim", "32", "--beta-dim", "16",
             "--pool-blocks", "1", "--batch-size", "4", "--epochs", "1", "--device", "cpu", "--read-threads", "2"]
    train = ["train", "--cache", url, "--val-cache", url, "--out", tmp_path / "run", *small]
    refused = CliRunner().invoke(cli.main, [str(a) for a in train])
    assert refused.exit_code == 2 and "refused access" in refused.output and "--storage-options" in refused.output
    assert len(refused.output.strip().splitlines()) == 1 and not (tmp_path / "run" / "last.pt").exists()
    run(*train, "--storage-options", options)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_top1" in row for row in metrics)
    report = tmp_path / "report.json"
    run("eval", "--checkpoint", tmp_path / "run" / "last.pt", "--cache", url, "--storage-options", options,
        "--device", "cpu", "--report", report)
    assert json.loads(report.read_text())["videos"] == len(FeatureStore.open(url, storage_options=s3["options"]).videos)


def test_without_the_options_the_bucket_is_out_of_reach(s3):
    testing.write_videos(f"s3://{s3['bucket']}/y.zarr", testing.make_schema(num_videos=1), [0], finalize=True,
                         storage_options=s3["options"])
    result = CliRunner().invoke(cli.main, ["info", f"s3://{s3['bucket']}/y.zarr", "--storage-options",
                                           json.dumps({**s3["options"], "secret": None, "key": None, "anon": True})])
    # moto's endpoint, but no credentials: the options are what reached it, and the refusal is one line.
    assert result.exit_code == 2 and "refused access" in result.output, result.output


def test_storage_options_are_checked_in_one_line(tmp_path):
    for value, says in (("{nope", "not JSON"), ("[1]", "must be a JSON object"), ("@/no/such/file", "cannot read")):
        result = CliRunner().invoke(cli.main, ["info", "s3://b/s.zarr", "--storage-options", value])
        assert result.exit_code == 2 and says in result.output, result.output
    local = CliRunner().invoke(cli.main, ["info", str(tmp_path), "--storage-options", "{}"])
    assert local.exit_code != 2 or "applies to store URLs" not in local.output  # empty options: nothing to say
    given = CliRunner().invoke(cli.main, ["info", str(tmp_path), "--storage-options", '{"anon": true}'])
    assert given.exit_code == 2 and "applies to store URLs" in given.output


def test_store_creation_is_a_conditional_put(s3):
    """S3 applies If-None-Match: * atomically, so of racing creators exactly one publishes its root."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.remote import FsspecLocation

    loc = FsspecLocation(f"s3://{s3['bucket']}/race.zarr", s3["options"])
    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(lambda n: loc.create_exclusive("zarr.json", b"%d" % n), range(4)))
    assert won.count(True) == 1
    assert loc.read("zarr.json") == b"%d" % won.index(True)


def proxied(s3: dict, proxy: str) -> dict:
    """s3fs options that reach the bucket through `proxy`, botocore retrying nothing itself (s3fs still retries a
    dropped connection a few times), so a fault is met at once."""
    return {**s3["options"], "client_kwargs": {"endpoint_url": proxy},
            "config_kwargs": {"retries": {"max_attempts": 1}}}


def extract(dataset, url: str, ckpt, options: dict):
    # --batch-frames 1: one video per forward, so a video redone by the rerun has the bytes of a clean run's.
    return CliRunner().invoke(cli.main, [str(a) for a in [
        "extract", "--manifest", dataset / "val.csv", "--video-root", dataset / "videos", "--out", url,
        "--storage-options", json.dumps(options), "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4",
        "--batch-frames", "1", "--decode-workers", "1", "--device", "cpu"]])


@pytest.mark.parametrize("fault", ["fail", "stop"])
def test_a_remote_write_error_stops_extract_and_the_rerun_finishes_it(s3, fault, motion_dataset, tiny_checkpoint):
    """The bucket answers 503 to every write (`fail`), or goes away (`stop`: a dropped connection, then refused
    ones) part way through an extraction: one line, exit 2, no video recorded failed; the rerun once the remote is
    back finishes the store, equal to a clean run's."""
    clean_url, url = f"s3://{s3['bucket']}/clean.zarr", f"s3://{s3['bucket']}/x.zarr"
    faults = Faults(fault, range(0))
    with faulty_s3_proxy(s3["endpoint"], faults) as (proxy, requests):
        clean = extract(motion_dataset, clean_url, tiny_checkpoint, proxied(s3, proxy))
        assert clean.exit_code == 0, clean.output
        puts = [path for method, path in requests if method == "PUT"]
        created = next(n for n, path in enumerate(puts) if "/clean.zarr/features/c." in path)  # before: the store's own
        faults.at = range(faults.count + created + 3, 1 << 30)  # armed once the store exists and a video is written
        broken = extract(motion_dataset, url, tiny_checkpoint, proxied(s3, proxy))
    assert broken.exit_code == 2, broken.output
    lines = [line for line in broken.output.strip().splitlines() if not line.startswith("extract:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write store {url}: "), broken.output
    assert lines[0].endswith("rerun") and "Traceback" not in broken.output
    store = FeatureStore.open(url, storage_options=s3["options"])
    assert store.progress()["failed"] == 0 and store.progress()["pending"] > 0  # no video's failure
    assert SampleStatus.FAILED not in store.status

    # The remote is back (moto itself, no proxy): the rerun resumes and finishes the store.
    rerun = extract(motion_dataset, url, tiny_checkpoint, s3["options"])
    assert rerun.exit_code == 0, rerun.output
    store, ref = (FeatureStore.open(u, storage_options=s3["options"]) for u in (url, clean_url))
    assert store.complete and store.progress() == ref.progress() == {"done": len(store.videos), "failed": 0,
                                                                      "pending": 0}
    for i in range(len(store)):
        np.testing.assert_array_equal(store.features(i), ref.features(i))
        np.testing.assert_array_equal(store.clip_embeddings(i), ref.clip_embeddings(i))


@pytest.mark.parametrize("fault", ["fail", "drop"])
def test_remote_write_errors_in_records_and_finalize_are_one_line(s3, fault):
    """A 503 or a dropped connection on a video's record, on a failure record or in finalize (tables, root
    attributes, consolidated metadata): one line naming the store, nothing recorded, and the same calls succeed
    once the remote answers again."""
    schema, url = testing.make_schema(num_videos=3, views=1), f"s3://{s3['bucket']}/f.zarr"
    faults = Faults(fault, range(0))

    def failing(after: int) -> pytest.RaisesContext:
        faults.at = range(faults.count + after + 1, 1 << 30)
        return pytest.raises(StoreWriteError, match=f"^cannot write store {url}: [^\n]*rerun$")

    with faulty_s3_proxy(s3["endpoint"], faults) as (proxy, _):
        w = testing.write_videos(url, schema, [0], storage_options=proxied(s3, proxy))
        with failing(after=2):  # its features' and clip embeddings' shards pass, its record does not
            w.write_video(1, *testing.video_data(schema, 1))
        with failing(after=0):
            w.write_failure(2, "did not decode")
        assert w.pending() == [1, 2]
        faults.at = range(0)
        w.write_video(1, *testing.video_data(schema, 1))
        w.write_failure(2, "did not decode")
        with failing(after=0):
            w.finalize()
        assert not FeatureStore.open(url, storage_options=s3["options"]).complete
        faults.at = range(0)
        assert w.finalize() == {"done": 2, "failed": 1, "pending": 0, "bytes": w.finalize()["bytes"], "complete": True}
