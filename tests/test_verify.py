"""`dist-cache verify` on damaged stores: every kind of damage is a finding that names the video and the fix,
exit status 1, never a traceback; and on real extracted stores, the recompute (recorded precision, offline)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import cli
from pipelines.copy import copy_store
from storage import FeatureStore
from storage.location import temp_name
from storage.testing import make_schema, write_videos

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FIX = "dist-cache extract ... --repair"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify") / "s.zarr"
    write_videos(str(root), make_schema(num_videos=6, views=2, dtype="int8", dense_gamma=2), range(6), finalize=True)
    return root


@pytest.fixture
def store(finished, tmp_path) -> Path:
    shutil.copytree(finished, tmp_path / "s.zarr")
    return tmp_path / "s.zarr"


def verify(*args: object) -> Result:
    result = CliRunner().invoke(cli.main, ["verify", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    return result


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def test_an_intact_store_verifies(store):
    result = verify(store)
    assert result.exit_code == 0 and result.stdout.rstrip().endswith("ok"), result.output
    assert "checked every shard and its index of 6 videos" in result.stdout
    deep = verify(store, "--deep")
    assert deep.exit_code == 0 and "every chunk's crc32c" in deep.stdout


@pytest.mark.parametrize("damage, video, found, deep", [
    (lambda s: (s / "features/c.2.0.0.0.0").unlink(), 2, "features: its shard file is missing", False),
    (lambda s: flip(s / "frames/c.3.0.0.0.0", 1000), 3, "frames: inner chunk 0 fails its crc32c checksum", True),
    (lambda s: flip(s / "clip_embeddings/c.4.0.0", -7), 4, "clip_embeddings: its shard index fails its crc32c", False),
    (lambda s: halve(s / "feature_scales/c.1.0.0.0"), 1, "feature_scales: its shard index fails its crc32c", False),
    (lambda s: (s / "features/c.5.0.0.0.0").write_bytes(b""), 5, "features: its shard file is 0 bytes", False),
    (lambda s: (s / "records/000000000.json").write_text('{"video_index": 0, "sta'), 0,
     "records/000000000.json is unreadable (not valid JSON", False),
])
def test_damage_is_a_finding_naming_the_video_and_the_fix(store, damage, video, found, deep):
    damage(store)
    result = verify(store, *(["--deep"] if deep else []))
    assert result.exit_code == 1, result.output
    damaged = [line for line in result.stdout.splitlines() if line.strip().startswith("damaged:")]
    assert len(damaged) == 1 and damaged[0].startswith(f"  damaged: video {video} "
                                                       f"(class{video % 3}/video_{video:03d}.mp4): "
                                                       f"{found}"), damaged
    problem = [line for line in result.stdout.splitlines() if "problem:" in line]
    assert problem == ["  problem: 1 video(s) damaged; rerun the extract command with --repair: "
                       f"{FIX} (the extraction's flags) re-extracts them"]


def test_a_flipped_data_byte_needs_deep_or_a_read(store):
    flip(store / "features/c.3.0.0.0.0", 100)
    assert verify(store).exit_code == 0  # the indexes are intact: only reading the bytes finds it
    assert "features: inner chunk 0 fails its crc32c" in verify(store, "--deep").stdout


def test_a_truncated_root_is_one_problem_not_a_traceback(store):
    (store / "zarr.json").write_bytes((store / "zarr.json").read_bytes()[:200])
    result = verify(store)
    assert result.exit_code == 1
    [problem] = [line for line in result.stdout.splitlines() if "problem:" in line]
    assert "root zarr.json is not valid JSON" in problem and "re-create the store" in problem


def test_a_packed_copy_names_its_own_fix(store, tmp_path):
    copy_store(str(store), str(tmp_path / "p.zarr"), videos_per_shard=4, progress=False)
    (tmp_path / "p.zarr/clip_embeddings/c.1.0.0").unlink()  # videos 4 and 5
    result = verify(tmp_path / "p.zarr")
    assert result.exit_code == 1
    assert [line.split(":")[1].strip() for line in result.stdout.splitlines() if "damaged:" in line] == \
        ["video 4 (class1/video_004.mp4)", "video 5 (class2/video_005.mp4)"]
    assert "this packed copy is read-only: copy it again from its source into a new destination" in result.stdout
    # ... which is what it takes: a copy into the damaged one skips every group it holds (and mends nothing).
    again = copy_store(str(store), str(tmp_path / "p.zarr"), videos_per_shard=4, progress=False)
    assert again.copied == 0 and verify(tmp_path / "p.zarr").exit_code == 1


def test_stray_partial_files_are_reported(store):
    old, young = store / "features" / temp_name("c.9.0.0.0.0"), store / "records" / temp_name("x.json")
    old.write_bytes(b"x")
    young.write_bytes(b"y")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    result = verify(store)
    assert result.exit_code == 0
    assert "2 temporary *.partial file(s)" in result.stdout and "1 left by interrupted writes" in result.stdout


# ------------------------------------------------------------------ recompute


def edit_backbone(root: Path, **changes: object) -> None:
    """Rewrite the store's recorded schema (root and consolidated metadata hold it)."""
    meta = json.loads((root / "zarr.json").read_text())
    schema = meta["attributes"]["dist_cache"]
    for key, value in changes.items():
        if key == "precision":
            schema["precision"] = value
        else:
            schema["backbone"][key] = value
    (root / "zarr.json").write_text(json.dumps(meta))


def test_the_recorded_precision_widens_the_tolerance_and_says_so(val_store, motion_dataset, tiny_checkpoint, tmp_path):
    shutil.copytree(val_store, tmp_path / "s.zarr")
    edit_backbone(tmp_path / "s.zarr", precision="fp16")  # fp16 does not run on this CPU: recomputed in fp32
    result = verify(tmp_path / "s.zarr", "--video-root", motion_dataset / "videos", "--samples", "2", "--device", "cpu",
                    "--pretrained", tiny_checkpoint)
    assert result.exit_code == 0, result.output
    assert ("CLIP ran in fp16 for this store, recomputed in fp32 here (fp16 does not run on cpu): the tolerance is "
            "widened by the known error of each reduced precision on ViT-B/16 (fp16 0.09 %, bf16 0.72 %) to 0.59%"
            ) in result.stdout
    # The report states the tolerance it checked against, and what it is made of.
    assert ("  tolerance: relative L2 error up to 0.59% (fp16 storage 0.50%, CLIP in fp16 at extraction +0.09%)"
            in result.stdout.splitlines())
    plain = verify(val_store, "--video-root", motion_dataset / "videos", "--samples", "1", "--device", "cpu",
                   "--pretrained", tiny_checkpoint)
    assert "  tolerance: relative L2 error up to 0.50% (fp16 storage 0.50%)" in plain.stdout.splitlines()


def test_long_commands_show_progress(val_store, motion_dataset, tiny_checkpoint, tmp_path):
    """verify --all-videos and copy count videos on stderr (eval's scoring: test_train_guards)."""
    videos = FeatureStore.open(val_store).schema.num_videos
    checked = verify(val_store, "--video-root", motion_dataset / "videos", "--all-videos", "--samples", "1",
                     "--pretrained", tiny_checkpoint)
    assert checked.exit_code == 0 and f"verify: videos:   0%|          | 0/{videos}" in checked.stderr, checked.stderr
    copied = CliRunner().invoke(cli.main, ["copy", str(val_store), str(tmp_path / "c.zarr")])
    assert copied.exit_code == 0 and f"{videos}/{videos}" in copied.stderr and "copy -> " in copied.stderr


def test_a_store_naming_a_local_file_does_not_get_it_opened(val_store, motion_dataset, tmp_path):
    shutil.copytree(val_store, tmp_path / "s.zarr")
    edit_backbone(tmp_path / "s.zarr", pretrained_source="/etc/passwd")
    result = verify(tmp_path / "s.zarr", "--video-root", motion_dataset / "videos", "--samples", "1", "--device", "cpu")
    # A usage error (2: the check asked for cannot run without --pretrained), not damage (1), and nothing else said.
    assert result.exit_code == 2 and result.stdout == "", result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot recompute features from --video-root")
    assert "/etc/passwd, which a store cannot choose to open: pass --pretrained" in line


def test_an_uncached_tag_offline_fails_fast_in_one_line(val_store, motion_dataset, tmp_path):
    """A store whose weights are an open_clip tag this machine has not cached, with HF_HUB_OFFLINE set: no network
    wait, no traceback, one problem line saying what to do."""
    shutil.copytree(val_store, tmp_path / "s.zarr")
    edit_backbone(tmp_path / "s.zarr", model="ViT-B-16", pretrained="openai", pretrained_source="openai")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf-home")}
    result = subprocess.run([sys.executable, "-m", "cli", "verify", str(tmp_path / "s.zarr"), "--video-root",
                             str(motion_dataset / "videos"), "--samples", "1"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr and result.stdout == "", result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "cannot recompute features" in line and "HF_HUB_OFFLINE is set" in line, result.stderr
