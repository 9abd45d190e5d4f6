"""extract and copy never delete or write among files they did not write: a non-empty directory that is not a store
is refused (a user's `dataset.tar.partial`, files in a `videos/` folder), and only temp files named as the writers
name them (`<name>.<uuid4 hex>.partial`) are swept, stale ones only, a future mtime counting as stale. And a store
whose dense_frames.gamma is not one train --gamma takes is refused at opening."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from cli_runs import invoke, one_error_line
from storage.location import temp_name
from storage.testing import make_schema, write_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

HOUR = 3600.0


def aged(path: Path, content: bytes, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src") / "s.zarr"
    write_videos(str(root), make_schema(num_videos=3, views=1), [0, 1, 2], finalize=True)
    return root


@pytest.mark.parametrize("users", [
    {"dataset.tar.partial": HOUR},  # older than the 600 s a writer's orphan needs: it was swept before
    {"videos/notes.txt": HOUR, "records/mine.json": HOUR},  # inside the folders a store writes
    {"features/c.0.0.0.0.0.partial": HOUR},  # looks like a shard's temp file, but has no uuid
    {"a.mp4": HOUR, "b.mp4": HOUR, "c.mp4": HOUR, "d.mp4": HOUR},  # more than the three it names
])
def test_extract_and_copy_refuse_a_directory_that_is_not_a_store(motion_dataset, tiny_checkpoint, source, tmp_path,
                                                                  users):
    out = tmp_path / "out"
    for name, age in users.items():
        aged(out / name, b"the user's own bytes", age)
    before = files(out)
    line = one_error_line(invoke(
        "extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos", "--out", out,
        "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--frames", "4", "--decode-workers", "1",
        "--device", "cpu"))
    assert "it is not empty and not a dist-cache store" in line and "use a new or empty --out" in line, line
    assert str(out) in line and next(iter(users)).split("/")[0] in line, line
    top = {name.split("/")[0] for name in users}
    assert (f"found {len(top)} entries: " in line or len(top) == 1) and (", ...)" in line) == (len(top) > 3), line
    line = one_error_line(invoke("copy", source, out))
    assert "it is not empty and not a dist-cache store" in line, line
    assert files(out) == before  # nothing removed, nothing written among them


def test_only_the_writers_own_stale_temp_files_are_swept(source, tmp_path):
    """A rerun of copy (extract's writer is the same) into an existing store: the writers' temp files older than 600
    s, or dated more than 600 s in the future, go; a young one (maybe a live write) and every file not named as a
    writer names its temp files stay."""
    dst = tmp_path / "d.zarr"
    assert invoke("copy", source, dst).exit_code == 0
    swept = [aged(dst / "features" / temp_name("c.1.0.0.0.0"), b"half a shard", HOUR),
             aged(dst / "records" / temp_name("000000001.json"), b"{", -10 * HOUR),  # a future mtime
             aged(dst / "videos" / "path" / temp_name("c"), b"", HOUR)]  # zarr's: with_suffix drops ".0"
    kept = [aged(dst / "features" / temp_name("c.2.0.0.0.0"), b"a live write", 5),
            aged(dst / "features" / temp_name("c.2.0.0.0.0"), b"skewed clock", -60),
            aged(dst / "dataset.tar.partial", b"the user's", HOUR),
            aged(dst / "records" / "notes.partial", b"the user's", -10 * HOUR)]
    note = invoke("verify", dst).output
    assert "3 left by interrupted writes" in note and "2 younger than 600 s" in note, note
    assert "2 *.partial file(s) not named as a dist-cache write names its temp files" in note, note
    result = invoke("copy", source, dst)
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in swept)
    assert all(p.exists() for p in kept)


def test_a_store_with_a_gamma_train_refuses_is_refused_at_opening(source, motion_dataset, tmp_path):
    """dense_frames.gamma = 3 once passed info, and train then suggested `--gamma 3`, which that flag refuses."""
    store = tmp_path / "g.zarr"
    write_videos(str(store), make_schema(num_videos=3, views=1, dense_gamma=2), [0, 1, 2], finalize=True)
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["dist_cache"]["dense_frames"]["gamma"] = 3
    (store / "zarr.json").write_text(json.dumps(root))
    for command in (["info", store], ["verify", store],
                    ["train", "--cache", store, "--out", tmp_path / "run", "--epochs", "1", "--device", "cpu"]):
        result = invoke(*command)
        text = result.output if command[0] == "verify" else one_error_line(result)
        assert "dense_frames.gamma must be one of 1, 2, 4, 8, got 3" in text and str(store) in text, text
        assert result.exit_code != 0
    assert not (tmp_path / "run").exists()
    shutil.rmtree(store)
