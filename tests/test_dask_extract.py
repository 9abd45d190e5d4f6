"""Extraction on a real dask LocalCluster (2 worker processes, loopback): the store equals a single-process
one, also when a worker process is SIGKILLed mid-run and its task is rerun elsewhere."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from pipelines.extract.dask_runner import TASK_PREFIX, extract_on_cluster
from pipelines.extract.extractor import ExtractOptions, extract
from storage import FeatureStore, SampleStatus

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def options(dataset: Path, out: Path, ckpt: Path) -> ExtractOptions:
    return ExtractOptions(manifest=str(dataset / "val.csv"), video_root=str(dataset / "videos"), out=str(out),
                          model="dist-tiny", pretrained=str(ckpt), frames=4, views=2, split="train", seed=3,
                          decode_workers=1, device="cpu")


@pytest.fixture(scope="module")
def client():
    with dask.config.set({"distributed.worker.daemon": False}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def reference(tmp_path_factory, motion_dataset, tiny_checkpoint) -> FeatureStore:
    out = tmp_path_factory.mktemp("single") / "store.zarr"
    extract(options(motion_dataset, out, tiny_checkpoint), progress=False)
    return FeatureStore.open(out)


def assert_same_store(store: FeatureStore, reference: FeatureStore) -> None:
    assert store.complete and reference.complete
    np.testing.assert_array_equal(store.status, reference.status)
    assert (store.status == SampleStatus.DONE).all()
    for i in range(len(reference)):
        np.testing.assert_array_equal(store.features(i), reference.features(i))
        np.testing.assert_array_equal(store.clip_embeddings(i), reference.clip_embeddings(i))
        mine, theirs = store.sample(i), reference.sample(i)
        assert mine.keys() == theirs.keys()
        for key in mine:
            np.testing.assert_array_equal(mine[key], theirs[key])


def test_cluster_store_equals_single_process_store(client, reference, motion_dataset, tiny_checkpoint, tmp_path):
    out = tmp_path / "dask.zarr"
    summary = extract_on_cluster(options(motion_dataset, out, tiny_checkpoint), client, chunk_videos=2, progress=False)
    assert summary.complete and summary.stored == 4 and summary.failed == 0
    assert_same_store(FeatureStore.open(out), reference)


class KillOnce(WorkerPlugin):
    """SIGKILLs the worker process as it starts its first extraction task, once per marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        name = key if isinstance(key, str) else str(key)
        if finish == "executing" and name.startswith(TASK_PREFIX) and not os.path.exists(self.marker):
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGKILL)


def test_killed_worker_is_retried_and_the_store_still_matches(client, reference, motion_dataset, tiny_checkpoint,
                                                              tmp_path):
    marker = tmp_path / "killed"
    pids = set(client.run(os.getpid).values())
    client.register_plugin(KillOnce(str(marker)), name="kill-once")
    try:
        out = tmp_path / "dask.zarr"
        summary = extract_on_cluster(options(motion_dataset, out, tiny_checkpoint), client, chunk_videos=1,
                                     progress=False)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert marker.exists()  # a worker really died...
    client.wait_for_workers(2)
    assert pids - set(client.run(os.getpid).values())  # ...and the nanny replaced it with a new process
    assert summary.complete and summary.failed == 0
    assert_same_store(FeatureStore.open(out), reference)


def test_a_killed_decode_worker_fails_no_video(client, motion_dataset, tiny_checkpoint, tmp_path):
    """kill -9 of a dask worker's decode process mid-run: it is replaced, its videos retried, and no healthy
    video is recorded failed."""
    import dataclasses
    import threading

    from test_extract_recovery import decode_workers, many_videos, wait_for

    manifest = many_videos(motion_dataset, tmp_path, 16)
    out = tmp_path / "dask.zarr"
    opts = dataclasses.replace(options(motion_dataset, out, tiny_checkpoint), manifest=str(manifest),
                               video_root=str(tmp_path / "videos"), views=1)
    workers = list(client.run(os.getpid).values())
    stored_at_kill: list[int] = []

    def kill_one() -> None:
        records = out / "records"
        wait_for(lambda: records.is_dir() and any(records.iterdir()))
        victim = wait_for(lambda: [p for pid in workers for p in decode_workers(pid)])[0]
        victim.kill()
        stored_at_kill.append(len(list(records.iterdir())))

    killer = threading.Thread(target=kill_one)
    killer.start()
    summary = extract_on_cluster(opts, client, chunk_videos=4, progress=False)
    killer.join()
    assert stored_at_kill and stored_at_kill[0] < 16  # the kill came mid-run
    assert summary.complete and summary.stored == 16 and summary.failed == 0
    assert FeatureStore.open(out).progress() == {"done": 16, "failed": 0, "pending": 0}


def test_cli_extract_with_local_workers(reference, motion_dataset, tiny_checkpoint, tmp_path):
    from click.testing import CliRunner

    import cli

    out = tmp_path / "cli.zarr"
    args = ["extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
            "--out", out, "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--frames", "4", "--views", "2",
            "--seed", "3", "--decode-workers", "1", "--device", "cpu", "--dask-workers", "2"]
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "stored 4 videos" in result.output and "failed 0" in result.output
    assert_same_store(FeatureStore.open(out), reference)


def test_cluster_stores_dense_frames_and_swapped_labels_and_repairs(client, motion_dataset, tiny_checkpoint, tmp_path):
    import dataclasses

    opts = dataclasses.replace(options(motion_dataset, tmp_path / "single.zarr", tiny_checkpoint), dense_frames=True,
                               dense_gamma=2, flip_label_map=(("left", "right"),))
    extract(opts, progress=False)
    single = FeatureStore.open(tmp_path / "single.zarr")
    out = tmp_path / "dask.zarr"
    summary = extract_on_cluster(dataclasses.replace(opts, out=str(out)), client, chunk_videos=2, progress=False)
    assert summary.complete and summary.stored == 4
    store = FeatureStore.open(out)
    assert_same_store(store, single)
    assert store.schema.sampling["flip_label_map"] == [["left", "right"]] and store.schema.precision == "fp32"
    for i in range(len(store)):
        np.testing.assert_array_equal(store.frames(i), single.frames(i))
        assert store.label(i) == single.label(i)

    (out / "frames" / "c.1.0.0.0.0").unlink()
    repaired = extract_on_cluster(dataclasses.replace(opts, out=str(out), repair=True), client, progress=False)
    assert [d.video_index for d in repaired.damaged] == [1] and repaired.stored == 1 and repaired.complete
    assert_same_store(FeatureStore.open(out), single)
    np.testing.assert_array_equal(FeatureStore.open(out).frames(2), single.frames(2))


def test_a_compact_store_is_fitted_once_on_a_worker_and_equals_a_single_process_one(client, motion_dataset,
                                                                                   tiny_checkpoint, tmp_path):
    """--pca under dask: the client has the fit run on one worker before any chunk, the workers encode with the
    stored parameters, and the result is the single-process store (the same sample, fitted on the same CPU)."""
    import dataclasses

    compact = dict(pca=16, dtype="int8")
    single = tmp_path / "single.zarr"
    extract(dataclasses.replace(options(motion_dataset, single, tiny_checkpoint), **compact), progress=False)
    out = tmp_path / "dask.zarr"
    summary = extract_on_cluster(dataclasses.replace(options(motion_dataset, out, tiny_checkpoint), **compact),
                                 client, chunk_videos=2, progress=False)
    assert summary.complete and summary.stored == 4
    store, reference = FeatureStore.open(out), FeatureStore.open(single)
    assert store.schema.encoding["fit"]["sha256"] == reference.schema.encoding["fit"]["sha256"]
    for i in range(len(reference)):
        np.testing.assert_array_equal(store.read_sample(i).features, reference.read_sample(i).features)
