"""Feature store under interruption and concurrency: resume, mismatch refusal, kill -9, parallel writers.

Writers run as real OS processes (WRITER: storage.testing.write_videos), killed with SIGKILL where the test says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from storage import FeatureStore, SampleNotDoneError, StoreMismatchError, StoreNotFoundError, StoreWriter
from storage.location import temp_name
from storage.testing import make_schema, manifest, open_writer, video_data, write_videos

REPO = Path(__file__).resolve().parents[1]
# `python -c WRITER URL JSON`: a writer process for kill/concurrency tests.
WRITER = r"""
import json, sys, time
from storage.schema import StoreSchema
from storage.testing import write_videos

args = json.loads(sys.argv[2])
# A shared wall-clock start lets concurrent-writer tests make processes race on creation too.
time.sleep(max(0.0, args.get("start_at", 0.0) - time.time()))
started = time.time()
w = write_videos(sys.argv[1], StoreSchema.from_json(args["schema"]), args["indices"], fail=set(args.get("fail", [])),
                 delay_s=args.get("delay_s", 0.0))
wrote = time.time()
summary = w.finalize() if args.get("finalize") else None
print(json.dumps({"started": started, "wrote": wrote, "summary": summary}))
"""


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root with its bytes and mtime: 'nothing changed' means this is equal."""
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {k: v[0] for k, v in snapshot(root).items()}


def spawn_writer(url: str, schema: dict, indices: list[int], **kw) -> subprocess.Popen:
    url = str(Path(url).resolve()) if "://" not in url else url  # the child runs in the repo root
    args = json.dumps({"schema": schema.to_json(), "indices": list(indices), **kw})
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", WRITER, url, args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def records_on_disk(root: Path) -> set[int]:
    return {int(p.name[:9]) for p in (root / "records").glob("*.json")} if (root / "records").exists() else set()


# ------------------------------------------------------------------ resume and refusal


def test_resume_lists_exactly_the_rest(tmp_path):
    root = str(tmp_path / "s.zarr")
    schema = make_schema(num_videos=7, views=2)
    write_videos(root, schema, [0, 2, 5], fail={2})
    w = open_writer(root, schema)
    assert w.pending() == [1, 3, 4, 6]
    for v in w.pending():
        w.write_video(v, *video_data(schema, v))
    assert w.pending() == [] and w.finalize()["complete"]


@pytest.mark.parametrize("change, field", [
    (dict(layers=[1]), "layers [0, 1], not [1]"),
    (dict(num_frames=8), "num_frames 4, not 8"),
    (dict(seed=7), "sampling.seed 0, not 7"),
    (dict(model="ViT-B-16"), "backbone.model 'dist-tiny', not 'ViT-B-16'"),
    (dict(dtype="int8"), "dtype 'fp16', not 'int8'"),
    (dict(views=3), "views_per_video 2, not 3"),
])
def test_mismatched_rerun_is_refused_and_writes_nothing(tmp_path, change, field):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=4, views=2)
    write_videos(str(root), schema, [0, 1])
    before = snapshot(root)
    with pytest.raises(StoreMismatchError) as err:
        open_writer(str(root), make_schema(num_videos=4, **{"views": 2, **change}))
    message = str(err.value)
    assert field in message and "use another --out or the same flags" in message and "\n" not in message
    assert snapshot(root) == before


def test_other_manifest_is_refused(tmp_path):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=3, views=1)
    write_videos(str(root), schema, [0])
    before = snapshot(root)
    videos, labels, text = manifest(schema)
    with pytest.raises(StoreMismatchError, match=r"row 1 is 'class1/video_001.mp4' \(label 1\) there"):
        StoreWriter.open(str(root), schema, [videos[0], "other.mp4", videos[2]], labels, text)
    with pytest.raises(StoreMismatchError, match="label 2"):
        StoreWriter.open(str(root), schema, videos, [labels[0], labels[1], 2 if labels[2] != 2 else 0], text)
    assert snapshot(root) == before


def test_crashed_creation_is_completed_on_rerun(tmp_path):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=3, views=1)
    write_videos(str(root), schema, [])
    # Simulate a creator killed after publishing the root, before its arrays and tables were all there.
    meta = json.loads((root / "zarr.json").read_text())
    (root / "zarr.json").write_text(json.dumps({**meta, "attributes": {**meta["attributes"], "created": False}}))
    shutil.rmtree(root / "features")
    shutil.rmtree(root / "text_embeddings")
    with pytest.raises(StoreNotFoundError, match="interrupted"):
        FeatureStore.open(root)
    w = write_videos(str(root), schema, range(3), finalize=True)
    assert w.finalize()["complete"] and FeatureStore.open(root).done_indices().tolist() == [0, 1, 2]


# ------------------------------------------------------------------ kill -9


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path):
    root = tmp_path / "killed.zarr"
    schema = make_schema(num_videos=40, views=2, dtype="int8")
    proc = spawn_writer(str(root), schema, range(40), delay_s=0.01)
    deadline = time.monotonic() + 30
    while len(records_on_disk(root)) < 6:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "writer made no progress"
        time.sleep(0.005)
    proc.kill()  # SIGKILL: no cleanup, no finally blocks
    proc.communicate()
    assert proc.returncode == -9
    written = records_on_disk(root)
    assert 6 <= len(written) < 40

    # A shard temp file as LocalStore leaves it when killed between write and rename.
    orphan = root / "features" / temp_name("c.39.0.0.0.0")
    orphan.write_bytes(b"half a shard")
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))

    store = FeatureStore.open(root)
    for i in range(80):
        v, k = divmod(i, 2)
        if v in written:
            x = video_data(schema, v)[2][k]
            assert np.linalg.norm(store.features(i).astype(np.float32) - x) / np.linalg.norm(x) < 0.02
        else:
            with pytest.raises(SampleNotDoneError):
                store.features(i)

    w = open_writer(str(root), schema, stale_partial_s=0)
    assert not list(root.rglob("*.partial"))
    assert w.pending() == sorted(set(range(40)) - written)
    for v in w.pending():
        w.write_video(v, *video_data(schema, v))
    assert w.finalize()["complete"]

    ref = tmp_path / "ref.zarr"
    write_videos(str(ref), schema, range(40), finalize=True)
    assert tree_bytes(root) == tree_bytes(ref)  # every shard, record, table and metadata byte


# ------------------------------------------------------------------ concurrent writers


def test_concurrent_overlapping_writers_equal_single_writer(tmp_path):
    root = tmp_path / "shared.zarr"
    schema = make_schema(num_videos=24, views=2)
    # Both processes create the store at the same moment, then write 0..15 and 8..23 (8..15 overlap),
    # each in its own order, and each finalizes when done.
    start_at = time.time() + 1.5  # after both interpreters have imported zarr
    a = spawn_writer(str(root), schema, list(range(16)), finalize=True, delay_s=0.02, start_at=start_at)
    b = spawn_writer(str(root), schema, list(reversed(range(8, 24))), fail=[20], finalize=True, delay_s=0.02,
                     start_at=start_at)
    runs = []
    for proc in (a, b):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
        runs.append(json.loads(out.decode().strip().splitlines()[-1]))
    # They really ran at the same time (each spent >= 0.3 s writing).
    assert max(r["started"] for r in runs) < min(r["wrote"] for r in runs), runs
    assert any(r["summary"]["complete"] for r in runs)  # whoever finished last saw every record

    ref = tmp_path / "ref.zarr"
    write_videos(str(ref), schema, range(24), fail={20}, finalize=True)
    store = FeatureStore.open(root)
    assert store.complete and store.progress() == {"done": 23, "failed": 1, "pending": 0}
    assert tree_bytes(root) == tree_bytes(ref)


def test_racing_creators_with_other_flags_one_wins_and_the_data_is_its(tmp_path):
    """Two writers on a fresh store at the same moment, seed 0 and seed 1: the root is published
    create-if-absent, so exactly one schema wins; the other writer stops with the mismatch error, and every
    stored feature is the winner's."""
    for attempt in range(2):
        root = tmp_path / f"race{attempt}.zarr"
        start_at = time.time() + 1.5  # after both interpreters have imported zarr
        schemas = [make_schema(num_videos=6, views=1, seed=seed) for seed in (0, 1)]
        procs = [spawn_writer(str(root), s, range(6), start_at=start_at, finalize=True) for s in schemas]
        results = [(proc.wait(timeout=60), proc.communicate()[1].decode()) for proc in procs]
        winners = [seed for seed, (rc, _) in enumerate(results) if rc == 0]
        assert len(winners) == 1, results
        loser_err = results[1 - winners[0]][1]
        assert "StoreMismatchError" in loser_err and "sampling.seed" in loser_err
        store = FeatureStore.open(root)
        assert store.complete and store.schema.sampling["seed"] == winners[0]
        for v in range(6):
            expected = video_data(schemas[winners[0]], v)[2][0].astype(np.float16)
            np.testing.assert_array_equal(store.features(v), expected)


def test_local_create_exclusive_has_one_winner(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from storage.local import LocalLocation

    loc = LocalLocation(tmp_path / "s.zarr")
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda n: loc.create_exclusive("zarr.json", b"%d" % n), range(32)))
    assert won.count(True) == 1 and loc.read("zarr.json") == b"%d" % won.index(True)
    assert [p.name for p in (tmp_path / "s.zarr").iterdir()] == ["zarr.json"]  # no temp file left
