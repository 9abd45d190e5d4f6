"""The generated motion dataset: files decode, splits are balanced, and the square moves the class's way."""

import numpy as np
import pytest

from dist_cache.decoders import get_decoder
from dist_cache.manifests import load_manifest
from dist_cache.synthetic import DIRECTIONS, make_motion_dataset, motion_clip, write_video
from video_files import truncate_file

CLASSES = ("left", "right", "up", "down")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_motion_dataset(tmp_path_factory.mktemp("motion"), videos_per_class=4, seed=3)


def test_files_decode_and_splits_are_balanced(dataset):
    train = load_manifest(dataset / "train.csv", video_root=dataset / "videos")
    val = load_manifest(dataset / "val.csv", video_root=dataset / "videos")
    assert train.class_names == val.class_names == sorted(CLASSES)
    assert np.bincount(train.labels).tolist() == [3, 3, 3, 3] and np.bincount(val.labels).tolist() == [1, 1, 1, 1]
    on_disk = sorted(str(p.relative_to(dataset / "videos")) for p in (dataset / "videos").rglob("*.mp4"))
    assert sorted(train.videos + val.videos) == on_disk and len(on_disk) == 16
    for video in val.videos:
        facts = get_decoder().probe(dataset / "videos" / video)
        assert (facts.num_frames, facts.fps, facts.width, facts.height) == (32, 16.0, 64, 64)


def square_centres(frames):
    """Per-frame centre of the pixels that differ from the background (the per-pixel median over time:
    the square covers any pixel in well under half of the frames)."""
    background = np.median(frames.astype(np.float32), axis=0)
    moving = np.abs(frames.astype(np.float32) - background).sum(-1) > 40
    ys, xs = np.mgrid[: frames.shape[1], : frames.shape[2]]
    return np.array([(xs[m].mean(), ys[m].mean()) for m in moving])


def test_decoded_square_moves_in_the_class_direction(dataset):
    manifest = load_manifest(dataset / "train.csv", video_root=dataset / "videos")
    for video, label in zip(manifest.videos, manifest.labels):
        dx, dy = DIRECTIONS[manifest.class_names[label]]
        centres = square_centres(get_decoder().read(dataset / "videos" / video, range(32)))
        along, across = (centres[:, 0], centres[:, 1]) if dx else (centres[:, 1], centres[:, 0])
        step = np.polyfit(np.arange(32), along, 1)[0]
        assert step * (dx + dy) > 0.8  # at least 0.6 * 52 px over 31 frames, the right way
        assert np.ptp(across) < 3


def test_only_the_frame_order_tells_the_direction():
    for seed in range(5):
        left, left_corners = motion_clip(np.random.default_rng(seed), "left")
        right, right_corners = motion_clip(np.random.default_rng(seed), "right")
        up, _ = motion_clip(np.random.default_rng(seed), "up")
        down, _ = motion_clip(np.random.default_rng(seed), "down")
        # The same appearance and the same set of frames, played backwards.
        assert np.array_equal(left, right[::-1]) and np.array_equal(up, down[::-1])
        assert np.array_equal(left_corners, right_corners[::-1])
        assert left_corners.min() >= 0 and left_corners.max() <= 64 - 12


def test_generation_is_seeded(tmp_path):
    a, _ = motion_clip(np.random.default_rng([0, 1, 2]), "up", size=32, num_frames=8)
    b, _ = motion_clip(np.random.default_rng([0, 1, 2]), "up", size=32, num_frames=8)
    c, _ = motion_clip(np.random.default_rng([0, 1, 3]), "up", size=32, num_frames=8)
    assert a.shape == (8, 32, 32, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    with pytest.raises(ValueError, match="unknown motion class 'spin'"):
        make_motion_dataset(tmp_path, videos_per_class=2, classes=("left", "spin"))


def test_write_video_and_truncate_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, size=(6, 32, 64, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    write_video(path, frames, fps=10)
    assert get_decoder().probe(path).num_frames == 6
    size = path.stat().st_size
    truncate_file(path, 0.5)
    assert path.stat().st_size == size // 2
    with pytest.raises(ValueError, match="even"):
        write_video(tmp_path / "odd.mp4", frames[:, :31], fps=10)
