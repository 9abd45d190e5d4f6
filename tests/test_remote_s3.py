"""Stores on S3, written and read through s3fs against moto's S3 server on loopback. The CLI has no
storage-options flag: s3fs/botocore read AWS_ENDPOINT_URL and the credentials from the environment."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from click.testing import CliRunner

import cli
from storage import FeatureStore, testing

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def s3(monkeypatch) -> dict:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    for name, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_ENDPOINT_URL": endpoint}.items():
        monkeypatch.setenv(name, value)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached per options, endpoints change per test
    options = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": endpoint}}
    # moto keeps its buckets per process, not per server: each test gets its own.
    bucket = f"bucket-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    yield {"options": options, "bucket": bucket}
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_write_then_read_with_storage_options(s3, tmp_path):
    schema, url, options = testing.make_schema(num_videos=3, views=2), f"s3://{s3['bucket']}/t.zarr", s3["options"]
    testing.write_videos(url, schema, [0, 2], storage_options=options)
    store = FeatureStore.open(url, storage_options=options)
    assert not store.complete and store.progress() == {"done": 2, "failed": 0, "pending": 1}
    testing.write_videos(url, schema, [1], finalize=True, storage_options=options)
    store.refresh()
    assert store.complete and store.consolidated
    local = testing.write_videos(str(tmp_path / "t.zarr"), schema, [0, 1, 2], finalize=True)
    ref = FeatureStore.open(local.url)
    for i in range(len(store)):
        np.testing.assert_array_equal(store.features(i), ref.features(i))


def test_cli_extract_to_s3_then_info(s3, motion_dataset, tiny_checkpoint):
    url = f"s3://{s3['bucket']}/x.zarr"

    def run(*args: object) -> str:
        result = CliRunner().invoke(cli.main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    run("extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
        "--out", url, "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--frames", "4",
        "--decode-workers", "1", "--device", "cpu")
    assert "complete" in run("info", url).lower()
    store = FeatureStore.open(url)  # credentials and endpoint from the environment
    assert store.complete and store.features(int(store.done_indices()[0])).shape[0] == len(store.schema.layers)


def test_store_creation_is_a_conditional_put(s3):
    """S3 applies If-None-Match: * atomically, so of racing creators exactly one publishes its root."""
    from concurrent.futures import ThreadPoolExecutor

    from storage.remote import FsspecLocation

    loc = FsspecLocation(f"s3://{s3['bucket']}/race.zarr", s3["options"])
    with ThreadPoolExecutor(4) as pool:
        won = list(pool.map(lambda n: loc.create_exclusive("zarr.json", b"%d" % n), range(4)))
    assert won.count(True) == 1
    assert loc.read("zarr.json") == b"%d" % won.index(True)
