"""Damage is detected, never read as data: missing, flipped and truncated bytes, damaged metadata and records,
and hostile stores (impossible counts, labels, paths) all end in one-line errors or findings.

Each test damages a real finished store on disk the way a bad disk, a partial copy or a stranger would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

import cli
from dist_cache.errors import UserError
from storage import FeatureStore, StoreDamagedError, StoreNotFoundError
from storage.reader import StoreDamageWarning
from storage.testing import make_schema, open_writer, video_data, write_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("damage") / "s.zarr"
    schema = make_schema(num_videos=12, views=1, dtype="int8", dense_gamma=2)
    write_videos(str(root), schema, range(12), finalize=True)
    return root, schema


@pytest.fixture
def store_copy(finished, tmp_path) -> tuple[Path, object]:
    root, schema = finished
    shutil.copytree(root, tmp_path / "s.zarr")
    return tmp_path / "s.zarr", schema


def assert_one_line_damage(err: pytest.ExceptionInfo, video: int) -> None:
    text = str(err.value)
    assert "\n" not in text and f"video {video} (class{video % 3}/video_{video:03d}.mp4)" in text
    assert "rerun the extract command with --repair" in text and "s.zarr" in text


@pytest.mark.parametrize("key, video, read", [
    ("features/c.5.0.0.0.0", 5, lambda s: s.features(5)),
    ("feature_scales/c.7.0.0.0", 7, lambda s: s.read_sample(7)),
    ("clip_embeddings/c.6.0.0", 6, lambda s: s.clip_embeddings(6)),
    ("frames/c.9.0.0.0.0", 9, lambda s: s.frames(9)),
])
def test_missing_shard_of_a_done_video_is_damage(store_copy, key, video, read):
    root, _ = store_copy
    (root / key).unlink()
    store = FeatureStore.open(root)
    assert store.sample(video)["status"] == "done"
    with pytest.raises(StoreDamagedError, match="shard file is missing") as err:
        read(store)
    assert_one_line_damage(err, video)
    assert store.check_video(video) == [f"{key.split('/')[0]}: its shard file is missing"]
    assert store.check_video(video - 1) == [] and store.check_video(video - 1, deep=True) == []


def test_flipped_data_byte_found_by_read_and_deep_check(store_copy):
    root, schema = store_copy
    path = root / "features/c.4.0.0.0.0"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x40  # inside layer 0's chunk
    path.write_bytes(bytes(data))
    store = FeatureStore.open(root)
    with pytest.raises(StoreDamagedError, match="inner chunk 0 fails its crc32c") as err:
        store.features(4)
    assert_one_line_damage(err, 4)
    # Layer 1's bytes are intact and checked on their own: still served.
    np.testing.assert_array_equal(store.features(4, layers=[1]), FeatureStore.open(root).features(4, layers=[1]))
    assert store.check_video(4) == []  # the index is intact: only a deep check reads the data
    assert store.check_video(4, deep=True) == ["features: inner chunk 0 fails its crc32c checksum"]


@pytest.mark.parametrize("damage, found", [
    (lambda b: b[:-5] + bytes([b[-5] ^ 1]) + b[-4:], "shard index fails its crc32c"),
    (lambda b: b[: len(b) // 2], "shard index fails its crc32c"),
    (lambda b: b"", "shorter than the shard index"),
])
def test_damaged_shard_index_or_truncated_shard(store_copy, damage, found):
    root, _ = store_copy
    path = root / "clip_embeddings/c.3.0.0"
    path.write_bytes(damage(path.read_bytes()))
    store = FeatureStore.open(root)
    with pytest.raises(StoreDamagedError, match=found) as err:
        store.clip_embeddings(3)
    assert_one_line_damage(err, 3)
    assert len(store.check_video(3)) == 1 and found in store.check_video(3)[0]


def test_truncated_root_and_array_metadata_are_one_line_errors(store_copy):
    root, _ = store_copy
    (root / "zarr.json").write_bytes((root / "zarr.json").read_bytes()[:300])
    with pytest.raises(StoreDamagedError, match="root zarr.json is not valid JSON") as err:
        FeatureStore.open(root)
    assert "\n" not in str(err.value)
    result = CliRunner().invoke(cli.main, ["info", str(root)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and len(result.output.splitlines()) == 1


def test_unreadable_records_count_as_pending_and_are_redone(tmp_path):
    root = tmp_path / "s.zarr"
    schema = make_schema(num_videos=4, views=1)
    write_videos(str(root), schema, range(4))
    (root / "records/000000001.json").write_text('{"video_index": 1, "status": "do')  # torn
    shutil.copy(root / "records/000000000.json", root / "records/000000002.json")  # another video's record
    with pytest.warns(StoreDamageWarning, match="record records/000000001.json is unreadable"):
        store = FeatureStore.open(root)
        assert store.status.tolist() == [1, 0, 0, 1]
    assert "is unreadable (it is the record of video 0)" in store.check_video(2)[0]
    w = open_writer(str(root), schema)
    assert w.pending() == [1, 2] and not w.finalize()["complete"]
    for v in w.pending():
        w.write_video(v, *video_data(schema, v))
    assert w.finalize()["complete"] and FeatureStore.open(root).status.tolist() == [1, 1, 1, 1]


# ------------------------------------------------------------------ hostile stores


def edit_json(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def drop_consolidated(root: Path) -> None:
    edit_json(root / "zarr.json", lambda m: m.pop("consolidated_metadata", None))


def test_impossible_counts_are_one_line_errors_before_allocating(store_copy):
    root, _ = store_copy
    drop_consolidated(root)
    edit_json(root / "samples/status/zarr.json", lambda m: m.update(shape=[10**11]))
    with pytest.raises(StoreDamagedError, match=r"samples/status \(shape \[100000000000\]\) does not have the layout"):
        _ = FeatureStore.open(root).status
    edit_json(root / "zarr.json", lambda m: m["attributes"]["dist_cache"].update(num_videos=10**12))
    with pytest.raises(StoreDamagedError, match="num_videos must be an int in") as err:
        FeatureStore.open(root)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("table, value, message", [
    ("videos/label", 99, r"videos/label row 2 is 99, outside \[0, 3\)"),
    ("videos/label", -1, r"videos/label row 2 is -1, outside \[0, 3\)"),
    ("samples/label", 99, r"samples/label row 2 is 99, outside \[-1, 3\)"),
])
def test_labels_outside_the_classes_are_one_line_errors(store_copy, table, value, message):
    root, _ = store_copy
    arr = zarr.open_array(root / table, mode="r+")
    values = arr[...]
    values[2] = value
    arr[...] = values
    store = FeatureStore.open(root)
    with pytest.raises(StoreDamagedError, match=message):
        store.label(2) if table == "samples/label" else store.labels
    with pytest.raises(StoreDamagedError, match=message):
        store.sample(2)


@pytest.mark.parametrize("path", ["/etc/passwd", "../../outside.mp4", "a/../../b.mp4", ""])
def test_video_paths_that_leave_the_root_are_refused(store_copy, path):
    root, _ = store_copy
    arr = zarr.open_array(root / "videos/path", mode="r+")
    values = arr[...]
    values[5] = path
    arr[...] = values
    with pytest.raises(UserError,
                       match=r"videos/path row 5: video path .* is not a relative path inside the video root"):
        _ = FeatureStore.open(root).videos


def test_damaged_table_chunk_fails_its_checksum(store_copy):
    root, _ = store_copy
    chunk = root / "videos/num_frames/c.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(StoreDamagedError, match="array videos/num_frames does not decode .*--repair"):
        FeatureStore.open(root).sample(0)


def test_store_still_being_created_is_not_found(tmp_path):
    w = open_writer(str(tmp_path / "s.zarr"), make_schema(num_videos=2, views=1))
    edit_json(tmp_path / "s.zarr" / "zarr.json", lambda m: m["attributes"].update(created=False))
    with pytest.raises(StoreNotFoundError, match="still being created"):
        FeatureStore.open(w.url)
