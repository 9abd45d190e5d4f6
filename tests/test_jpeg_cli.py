"""JPEG dense frames through the command line, as a user runs them: extract --dense-frames --frames-format jpeg,
info, verify (recompute and --deep), train and eval from the stores alone, copy raw -> JPEG and JPEG as stored, a
damaged frame found, and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import cli
from storage import FeatureStore, frames_codec
from test_train_frames import RUN, TRAIN_VIEWS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def run(*args: object) -> Result:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def extract(dataset: Path, videos: Path, manifest: str, out: Path, ckpt: Path, *extra: object) -> Result:
    return run("extract", "--manifest", dataset / manifest, "--video-root", videos, "--out", out, "--model",
               "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--decode-workers", "1", *extra)


def train_views() -> list[str]:
    return ["--views", str(TRAIN_VIEWS["views"]), "--flip-p", str(TRAIN_VIEWS["flip_p"]), "--scale",
            ",".join(map(str, TRAIN_VIEWS["scale"]))]


def through_jpeg(frames: np.ndarray, quality: int) -> np.ndarray:
    out = np.empty_like(frames)
    for j, frame in enumerate(frames):
        frames_codec.decode_into(frames_codec.encode(frame, quality), out[j])
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, motion_dataset, tiny_checkpoint) -> dict:
    root = tmp_path_factory.mktemp("jpeg-cli")
    videos = root / "videos"
    shutil.copytree(motion_dataset / "videos", videos)
    paths = {"root": root, "videos": videos, "train": root / "train.zarr", "val": root / "val.zarr",
             "raw": root / "raw.zarr"}
    for out, manifest, extra in ((paths["train"], "train.csv", [*train_views(), "--frames-format", "jpeg"]),
                                 (paths["val"], "val.csv", ["--split", "test", "--frames-format", "jpeg",
                                                            "--jpeg-quality", "80"]),
                                 (paths["raw"], "train.csv", train_views())):
        result = extract(motion_dataset, videos, manifest, out, tiny_checkpoint, "--dense-frames", *extra)
        assert result.exit_code == 0, result.output
    return paths


def test_extract_info_and_verify_a_jpeg_store(stores, tiny_checkpoint):
    store = FeatureStore.open(stores["train"])
    assert store.schema.dense_frames == {"gamma": 2, "format": "jpeg", "quality": 90}
    assert FeatureStore.open(stores["val"]).frames_format == ("jpeg", 80)
    raw = FeatureStore.open(stores["raw"])
    for i in range(len(store)):  # the same extraction, frames stored raw or as JPEG
        np.testing.assert_array_equal(store.features(i), raw.features(i))
        np.testing.assert_array_equal(store.frames(i), through_jpeg(raw.frames(i), 90))
    text = run("info", stores["train"]).stdout
    frames_line = next(line for line in text.splitlines() if line.startswith("  frames"))
    assert "dense frames for gamma 1, 2 (stored G=2), JPEG quality 90, " in frames_line
    assert "per clip view (" in frames_line and "x smaller than raw)" in frames_line
    dense = json.loads(run("info", stores["train"], "--json").stdout)["dense_frames"]
    assert dense["format"] == "jpeg" and dense["quality"] == 90 and dense["raw_bytes_per_view"] == 8 * (64 * 64 * 3 + 4)
    assert 0 < dense["bytes_per_view"] < dense["raw_bytes_per_view"] / 2
    checked = run("verify", stores["train"], "--video-root", stores["videos"], "--samples", "2", "--device", "cpu",
                  "--pretrained", tiny_checkpoint)
    assert checked.exit_code == 0, checked.output
    assert checked.stdout.count("JPEG frames >= ") == 2 and checked.stdout.rstrip().endswith("ok")
    deep = run("verify", stores["val"], "--deep")
    assert deep.exit_code == 0 and "integrity: checked every chunk's crc32c" in deep.stdout, deep.output


def test_train_and_eval_from_the_jpeg_stores_alone(stores, tmp_path, tiny_checkpoint):
    gone = stores["root"] / "videos-gone"
    shutil.move(stores["videos"], gone)  # the stores alone train and score DiST
    try:
        trained = run("train", "--cache", stores["train"], "--val-cache", stores["val"], "--out", tmp_path / "run",
                      *RUN, "--epochs", "2")
        assert trained.exit_code == 0, trained.output
        assert "dense frames: read from the store (gamma 2 of its stored 2)" in trained.output
        scored = run("eval", "--checkpoint", tmp_path / "run" / "last.pt", "--cache", stores["val"], "--device",
                     "cpu", "--decode-workers", "0", "--report", tmp_path / "report.json")
        assert scored.exit_code == 0, scored.output
        assert 0.0 <= json.loads((tmp_path / "report.json").read_text())["top1"] <= 1.0
        gamma_one = run("train", "--cache", stores["train"], "--out", tmp_path / "g1", *RUN, "--epochs", "1",
                        "--gamma", "1")  # a gamma dividing the stored one: a subset of the JPEGs decoded
        assert gamma_one.exit_code == 0 and "(gamma 1 of its stored 2)" in gamma_one.output, gamma_one.output
        online = run("train", "--cache", stores["train"], "--out", tmp_path / "online", *RUN, "--epochs", "1",
                     "--online", "--pretrained", tiny_checkpoint)
        assert online.exit_code == 0, online.output
        assert "warning: --online runs CLIP on store " in online.output and "JPEG frames (quality 90)" in online.output
    finally:
        shutil.move(gone, stores["videos"])


def test_copy_encodes_raw_frames_and_moves_jpeg_frames_as_stored(stores, tmp_path, tiny_checkpoint, motion_dataset):
    raw = FeatureStore.open(stores["raw"])
    encoded = run("copy", stores["raw"], tmp_path / "j.zarr", "--frames-format", "jpeg")
    assert encoded.exit_code == 0, encoded.output
    copy = FeatureStore.open(tmp_path / "j.zarr")
    assert copy.frames_format == ("jpeg", 90)
    for i in range(len(raw)):
        np.testing.assert_array_equal(copy.frames(i), through_jpeg(raw.frames(i), 90))
    # The extracted JPEG store and the copy of its raw twin hold the same bytes: encoding is deterministic.
    shard = "frames/c.0.0.0.0.0"
    assert (tmp_path / "j.zarr" / shard).read_bytes() == (stores["train"] / shard).read_bytes()
    packed = run("copy", stores["train"], tmp_path / "p.zarr", "--layers", "last:1", "--videos-per-shard", "2")
    assert packed.exit_code == 0, packed.output
    source, moved = FeatureStore.open(stores["train"]), FeatureStore.open(tmp_path / "p.zarr")
    for i in range(len(source)):
        assert [bytes(p) for p in moved.frame_payloads(i)] == [bytes(p) for p in source.frame_payloads(i)]
    coarser = run("copy", stores["train"], tmp_path / "q50.zarr", "--jpeg-quality", "50")
    assert coarser.exit_code == 0 and FeatureStore.open(tmp_path / "q50.zarr").frames_format == ("jpeg", 50)
    # Encoded twice, at 90 then 50: recorded, so verify holds the frames to that chain, not to one encode at 50
    # (before: such a copy failed verify, its frames a fraction of a dB below a single encode's).
    assert FeatureStore.open(tmp_path / "q50.zarr").schema.dense_frames["encoded_before"] == [90]
    assert "JPEG quality 50 (encoded again: first at quality 90)" in run("info", tmp_path / "q50.zarr").stdout
    checked = run("verify", tmp_path / "q50.zarr", "--video-root", stores["videos"], "--samples", "4", "--device",
                  "cpu", "--pretrained", tiny_checkpoint)
    assert checked.exit_code == 0 and checked.stdout.count("JPEG frames >= ") == 4, checked.output
    # extract --repair mends such a copy as any other (its earlier encodes are history, not a flag to match): the
    # redone video is encoded once, which verify admits too.
    (tmp_path / "q50.zarr" / "frames" / "c.1.0.0.0.0").unlink()
    repaired = extract(motion_dataset, stores["videos"], "train.csv", tmp_path / "q50.zarr", tiny_checkpoint,
                       "--dense-frames", *train_views(), "--frames-format", "jpeg", "--jpeg-quality", "50", "--repair")
    assert repaired.exit_code == 0 and "(1 damaged, redone)" in repaired.output, repaired.output
    every = len(FeatureStore.open(tmp_path / "q50.zarr"))  # the redone video's views among them
    checked = run("verify", tmp_path / "q50.zarr", "--video-root", stores["videos"], "--samples", every, "--device",
                  "cpu", "--pretrained", tiny_checkpoint)
    assert checked.exit_code == 0 and checked.stdout.count("JPEG frames >= ") == every, checked.output
    back = run("copy", stores["train"], tmp_path / "raw.zarr", "--frames-format", "raw")
    assert back.exit_code == 2 and back.output.count("\n") == 1, back.output
    assert back.output.startswith("error: the source's dense frames are JPEG (quality 90): decoding them does not")
    assert not (tmp_path / "raw.zarr").exists()


def test_a_damaged_jpeg_frame_is_found_by_verify_deep(stores, tmp_path):
    shutil.copytree(stores["val"], tmp_path / "v.zarr")
    shard = tmp_path / "v.zarr" / "frames" / "c.1.0.0.0.0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x08  # inside a JPEG of the shard's first view or two
    shard.write_bytes(bytes(data))
    assert run("verify", tmp_path / "v.zarr").exit_code == 0  # the shallow check reads the indexes only
    deep = run("verify", tmp_path / "v.zarr", "--deep")
    assert deep.exit_code == 1, deep.output
    assert "damaged: video 1 (" in deep.stdout and "frames: inner chunk" in deep.stdout and "crc32c" in deep.stdout


def test_info_on_a_missing_jpeg_frames_shard_keeps_the_counts(stores, tmp_path):
    """info reads a few JPEG frames shards' indexes to measure bytes per view. Before: one missing shard made it
    say "? done, ? failed, ? pending", "the store's tables are damaged" and "videos not counted", none of it so."""
    shutil.copytree(stores["val"], tmp_path / "v.zarr")
    (tmp_path / "v.zarr" / "frames" / "c.0.0.0.0.0").unlink()
    result = run("info", tmp_path / "v.zarr")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert ": DAMAGED, 4 videos, 12 samples (12 done, 0 failed, 0 pending)" in lines[0], result.stdout
    assert "tables are damaged" not in result.stdout and "JPEG quality 80, " in result.stdout
    assert any(line.startswith("  damaged: ") and "video 0 (" in line and "frames" in line for line in lines)


def test_jpeg_flags_refused_in_one_line_before_anything_is_written(stores, motion_dataset, tiny_checkpoint, tmp_path):
    cases = [
        (["--frames-format", "jpeg"], "error: --frames-format jpeg is how the dense frames are stored: add "
                                      "--dense-frames"),
        (["--dense-frames", "--jpeg-quality", "80"], "error: --jpeg-quality 80 applies to JPEG frames: add "
                                                     "--frames-format jpeg"),
        (["--dense-frames", "--frames-format", "jpeg", "--jpeg-quality", "0"], "Invalid value for '--jpeg-quality'"),
    ]
    for extra, message in cases:
        result = extract(motion_dataset, stores["videos"], "train.csv", tmp_path / "x.zarr", tiny_checkpoint, *extra)
        assert result.exit_code == 2 and message in result.output.splitlines()[-1], result.output
        assert not (tmp_path / "x.zarr").exists()
    # A rerun into the JPEG store with raw frames is another store: refused, naming the difference.
    rerun = extract(motion_dataset, stores["videos"], "train.csv", stores["train"], tiny_checkpoint, *train_views(),
                    "--dense-frames")
    assert rerun.exit_code == 2 and "dense_frames" in rerun.output and rerun.output.count("\n") == 1, rerun.output
