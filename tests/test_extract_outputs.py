"""What extraction stores beyond the features: dense frames, per-view labels under a flip-label map, and the
precision, decoder and views it ran with."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner

import cli
from dist_cache.sampling import ViewPlan, dense_indices, dense_subset
from dist_cache.transforms import render_frames
from storage import FeatureStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def extract(dataset: Path, out: Path, ckpt: Path, *extra: str, manifest: str = "train.csv") -> FeatureStore:
    args = ["extract", "--manifest", dataset / manifest, "--video-root", dataset / "videos", "--out", out,
            "--model", "dist-tiny", "--pretrained", ckpt, "--frames", "4", "--decode-workers", "1", *extra]
    result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return FeatureStore.open(out)


def pyav_frames(path: Path) -> np.ndarray:
    """Every frame of a video, decoded by PyAV here (not through dist_cache.decoders)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def dense_store(tmp_path_factory, motion_dataset, tiny_checkpoint) -> FeatureStore:
    out = tmp_path_factory.mktemp("dense") / "dense.zarr"
    return extract(motion_dataset, out, tiny_checkpoint, "--views", "2", "--seed", "3", "--dense-frames",
                   "--dense-gamma", "4")


def test_stored_dense_frames_are_the_frames_rendered_from_the_video(dense_store, motion_dataset):
    store = dense_store
    assert store.has_frames and store.dense_gamma == 4 and store.schema.dense_frames == {"gamma": 4}
    flags = {(bool(store.sample(i)["flip"]), bool(store.sample(i)["grayscale"])) for i in range(len(store))}
    assert (True, False) in flags and (False, False) in flags, "the views should cover flipped and plain"
    for i in range(len(store)):
        sample = store.sample(i)
        plan = ViewPlan.from_dict(sample)
        decoded = pyav_frames(motion_dataset / "videos" / sample["video"])
        assert len(decoded) == sample["num_frames"]
        expected = render_frames(decoded[dense_indices(plan, 4, len(decoded))], plan, 64).numpy()
        stored = store.frames(i)
        assert stored.shape == (16, 64, 64, 3) and stored.dtype == np.uint8
        np.testing.assert_array_equal(stored, expected)
        # A smaller gamma's frames are a subset of the stored ones; gamma 1's are the sparse frames CLIP saw.
        np.testing.assert_array_equal(store.frames(i, gamma=2), expected[dense_subset(4, 2, 4)])
        np.testing.assert_array_equal(store.frames(i, gamma=1), expected[::4])


def test_clip_saw_every_gamma_th_dense_frame(dense_store, motion_dataset, tiny_checkpoint, tmp_path):
    # The same extraction without dense frames: the features are byte for byte the same.
    plain = extract(motion_dataset, tmp_path / "plain.zarr", tiny_checkpoint, "--views", "2", "--seed", "3")
    assert not plain.has_frames and len(plain) == len(dense_store)
    for i in range(len(plain)):
        np.testing.assert_array_equal(plain.features(i), dense_store.features(i))
        np.testing.assert_array_equal(plain.clip_embeddings(i), dense_store.clip_embeddings(i))


def test_flipped_views_of_a_mirrored_class_take_the_partners_label(motion_dataset, tiny_checkpoint, tmp_path):
    flips = tmp_path / "flips.json"
    flips.write_text('[["right", "left"]]')
    store = extract(motion_dataset, tmp_path / "swap.zarr", tiny_checkpoint, "--views", "4", "--seed", "5",
                    "--flip-label-map", flips)
    names = list(store.schema.class_names)
    assert store.schema.sampling["flip_label_map"] == [["left", "right"]]
    partner = {"left": "right", "right": "left"}
    seen = set()
    for i in range(len(store)):
        sample = store.sample(i)
        video_class = sample["video"].split("/")[0]
        expected = partner.get(video_class, video_class) if sample["flip"] else video_class
        assert names[sample["label"]] == expected and names[store.label(i)] == expected
        seen.add((video_class, bool(sample["flip"])))
    assert ("left", True) in seen and ("left", False) in seen and ("up", True) in seen


def test_precision_decoder_and_test_views_are_recorded(motion_dataset, tiny_checkpoint, tmp_path):
    default = extract(motion_dataset, tmp_path / "default.zarr", tiny_checkpoint, "--split", "test", manifest="val.csv")
    assert default.schema.views_per_video == 3  # 3 temporal clips x 1 crop, what eval expects
    assert default.schema.precision == "fp32"  # the CPU's default
    assert default.schema.preprocess["decoder"]["name"] == "pyav"  # it installs everywhere
    decord = extract(motion_dataset, tmp_path / "decord.zarr", tiny_checkpoint, "--split", "test", "--decoder",
                     "decord", "--precision", "bf16", manifest="val.csv")
    assert decord.schema.preprocess["decoder"]["name"] == "decord" and decord.schema.precision == "bf16"
    # A rerun without --decoder resumes a store with the decoder it records, whatever the default.
    again = extract(motion_dataset, tmp_path / "decord.zarr", tiny_checkpoint, "--split", "test", "--precision",
                    "bf16", manifest="val.csv")
    assert again.schema.preprocess["decoder"]["name"] == "decord"
    for i in range(len(default)):
        assert default.sample(i)["sparse_indices"].tolist() == decord.sample(i)["sparse_indices"].tolist()
        # bf16 autocast keeps 8 bits of mantissa: the same features to about 1 %.
        a, b = default.features(i).astype(np.float32), decord.features(i).astype(np.float32)
        assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_fp16_on_the_cpu_is_a_one_line_error(motion_dataset, tiny_checkpoint, tmp_path):
    args = ["extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos",
            "--out", tmp_path / "x.zarr", "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--device", "cpu",
            "--precision", "fp16"]
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    assert result.exit_code == 2 and result.output.startswith("error: --precision fp16 needs a CUDA device")
    assert not (tmp_path / "x.zarr").exists()


def test_test_clips_at_the_reference_offsets_are_recorded_and_verified(motion_dataset, tiny_checkpoint, tmp_path):
    """--test-offsets reference places the clips as DiST's code does and records it, so verify re-derives the same
    plans; the default (centred) records nothing, as every store made before the choice existed."""
    from dist_cache.sampling import plan_views

    centred = extract(motion_dataset, tmp_path / "c.zarr", tiny_checkpoint, "--split", "test", manifest="val.csv")
    assert "test_offsets" not in centred.schema.sampling
    store = extract(motion_dataset, tmp_path / "r.zarr", tiny_checkpoint, "--split", "test", "--test-offsets",
                    "reference", manifest="val.csv")
    assert (store.schema.sampling["test_offsets"], store.schema.sampling["test_offsets_gamma"]) == ("reference", 2)
    for i in range(len(store)):
        sample = store.sample(i)
        (plan,) = [p for k, p in enumerate(plan_views(
            sample["num_frames"], sample["width"], sample["height"], frames=4, views=3, split="test", seed=0,
            video_index=sample["video_index"], test_offsets="reference", offsets_gamma=2)) if k == sample["view"]]
        assert tuple(sample["sparse_indices"]) == plan.sparse_indices
    assert any(tuple(store.sample(i)["sparse_indices"]) != tuple(centred.sample(i)["sparse_indices"])
               for i in range(len(store)))
    result = CliRunner().invoke(cli.main, ["verify", str(tmp_path / "r.zarr"), "--video-root",
                                           str(motion_dataset / "videos"), "--pretrained", str(tiny_checkpoint),
                                           "--samples", "2"])
    assert result.exit_code == 0 and result.output.strip().splitlines()[-1] == "ok", result.output
    info = CliRunner().invoke(cli.main, ["info", str(tmp_path / "r.zarr")])
    assert "uniform-clips at the reference's offsets (gamma 2)" in info.output


def test_options_a_split_does_not_use_are_named_not_dropped(motion_dataset, tiny_checkpoint, tmp_path):
    """--test-offsets on a train store and --flip-label-map on a test store change nothing: each says so in a warning
    line (one config file often serves both splits, so it is not an error), and the store is written as without it."""
    flips = tmp_path / "flips.json"
    flips.write_text('[["right", "left"]]')
    runs = {"train": ("--test-offsets", "reference"), "test": ("--flip-label-map", flips)}
    for split, flag in runs.items():
        args = ["extract", "--manifest", motion_dataset / ("val.csv" if split == "test" else "train.csv"),
                "--video-root", motion_dataset / "videos", "--out", tmp_path / f"{split}.zarr", "--model", "dist-tiny",
                "--pretrained", tiny_checkpoint, "--frames", "4", "--decode-workers", "1", "--split", split, *flag]
        result = CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        warnings = [line for line in result.output.splitlines() if line.startswith("warning: ")]
        assert len(warnings) == 1 and warnings[0].startswith(f"warning: {flag[0]} ") and "no effect" in warnings[0]
        sampling = FeatureStore.open(tmp_path / f"{split}.zarr").schema.sampling
        assert "test_offsets" not in sampling and not sampling.get("flip_label_map")
    flips.write_text('[["right", "sideways"]]')  # a map that fails its own check: that error alone is printed
    args = ["extract", "--manifest", motion_dataset / "val.csv", "--video-root", motion_dataset / "videos", "--out",
            tmp_path / "bad.zarr", "--model", "dist-tiny", "--pretrained", tiny_checkpoint, "--split", "test",
            "--flip-label-map", flips]
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --flip-label-map"), lines
