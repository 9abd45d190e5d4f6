"""Write errors are not video failures: real OS errors while writing become one-line StoreWriteErrors, no
record is written, and a rerun after the cause is fixed resumes to the same store a clean run makes.

EFBIG comes from RLIMIT_FSIZE (no privileges; Python ignores SIGXFSZ, so the write fails with EFBIG).
ENOSPC and EROFS come from a small tmpfs, which needs root (CI runs as root; elsewhere they skip).
"""

from __future__ import annotations

import resource
import subprocess
from pathlib import Path

import pytest

from storage import FeatureStore, StoreWriteError
from storage.testing import make_schema, open_writer, video_data, write_videos
from test_store_resume import tree_bytes


def resume_and_compare(root: Path, schema, tmp_path: Path) -> None:
    w = open_writer(str(root), schema)
    for v in w.pending():
        w.write_video(v, *video_data(schema, v))
    assert w.finalize()["complete"]
    write_videos(str(tmp_path / "ref.zarr"), schema, range(schema.num_videos), finalize=True)
    assert tree_bytes(root) == tree_bytes(tmp_path / "ref.zarr")


def test_file_size_limit_is_a_write_error_and_the_store_resumes(tmp_path):
    schema = make_schema(num_videos=3, views=4, layers=[0, 1, 2, 3], num_frames=8)  # 279 kB feature shards
    root = tmp_path / "s.zarr"
    w = write_videos(str(root), schema, [0])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (128 * 1024, hard))
    try:
        with pytest.raises(StoreWriteError) as err:
            w.write_video(1, *video_data(schema, 1))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value).startswith(f"file too large writing {root}") and "\n" not in str(err.value)
    assert not list(root.rglob("*.partial"))  # the half-written shard was removed
    assert w.pending() == [1, 2]  # no record: not failed, still to do
    resume_and_compare(root, schema, tmp_path)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_full_disk_is_a_write_error_and_the_store_resumes(small_disk, tmp_path):
    schema = make_schema(num_videos=12, views=2)  # ~36 kB per video: the 256 kB disk fills up part way
    root = small_disk / "s.zarr"
    w = open_writer(str(root), schema)
    with pytest.raises(StoreWriteError) as err:
        for v in range(12):
            w.write_video(v, *video_data(schema, v))
    assert str(err.value) == f"disk full writing {root}: free space and rerun"
    written = 12 - len(w.pending())
    assert 0 < written < 12 and FeatureStore.open(root).progress()["failed"] == 0
    remount(small_disk, "size=4m")
    resume_and_compare(root, schema, tmp_path)


def test_read_only_file_system_is_a_write_error(small_disk, tmp_path):
    schema = make_schema(num_videos=3, views=1)
    root = small_disk / "s.zarr"
    w = write_videos(str(root), schema, [0])
    remount(small_disk, "ro")
    with pytest.raises(StoreWriteError, match="is on a read-only file system: make it writable"):
        w.write_video(1, *video_data(schema, 1))
    with pytest.raises(StoreWriteError, match="read-only file system"):
        open_writer(str(small_disk / "other.zarr"), schema)
    remount(small_disk, "rw,size=4m")
    resume_and_compare(root, schema, tmp_path)
