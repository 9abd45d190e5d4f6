"""View plans (frames, crop, flip, grayscale), rendering them to uint8 pixels, and normalising those."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cache.sampling import ViewPlan, dense_indices, dense_subset, plan_views
from dist_cache.transforms import PREPROCESS, normalize_frames, render_frames

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def train(num_frames=250, width=640, height=272, *, frames=8, views=4, seed=0, video_index=0, **kw):
    return plan_views(num_frames, width, height, frames=frames, views=views, split="train", seed=seed,
                      video_index=video_index, **kw)


# ---- plans --------------------------------------------------------------------------------------------------


def test_train_plans_are_deterministic_and_order_independent():
    forward = [train(video_index=v) for v in range(6)]
    backward = [train(video_index=v) for v in reversed(range(6))][::-1]
    assert forward == backward == [train(video_index=v) for v in range(6)]
    assert len({p[0] for p in forward}) == 6  # videos differ
    assert train(seed=1) != train(seed=0)
    assert len(set(train(views=8))) == 8  # views differ
    assert train(views=2) == train(views=4)[:2]  # adding views keeps the earlier ones


def test_train_sparse_frames_fall_one_per_segment():
    for seed in range(50):
        plan = train(num_frames=250, seed=seed)[0]
        assert plan.window == 250 / 8
        for k, s in enumerate(plan.sparse_indices):
            assert int(k * plan.window) <= s < (k + 1) * plan.window
    # Uniform inside a segment: over many draws the first frame covers its whole segment [0, 31].
    firsts = {train(num_frames=250, seed=s, views=1)[0].sparse_indices[0] for s in range(400)}
    assert min(firsts) <= 1 and max(firsts) >= 30


@pytest.mark.parametrize("width, height", [(640, 272), (176, 144), (272, 640), (64, 64)])
def test_train_crops_lie_in_the_frame_with_valid_scale_and_ratio(width, height):
    plans = [p for seed in range(100) for p in train(width=width, height=height, seed=seed)]
    for p in plans:
        x, y, w, h = p.crop
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert 0.4 - 0.02 <= w * h / (width * height) <= 1.0
        assert 3 / 4 - 0.03 <= w / h <= 4 / 3 + 0.03
    assert len({p.crop for p in plans}) > 150  # random boxes, not one fallback


def test_flip_and_grayscale_rates():
    plans = [p for seed in range(500) for p in train(seed=seed)]
    assert abs(np.mean([p.flip for p in plans]) - 0.5) < 0.05
    assert abs(np.mean([p.grayscale for p in plans]) - 0.2) < 0.04
    plain = [p for seed in range(20) for p in train(seed=seed, flip_p=0.0, grayscale_p=0.0)]
    assert not any(p.flip or p.grayscale for p in plain)


def test_test_plans_are_centre_crops_at_evenly_spaced_clips():
    plans = plan_views(240, 640, 272, frames=8, views=3, split="test", seed=5, video_index=9)
    assert plans == plan_views(240, 640, 272, frames=8, views=3, split="test", seed=0, video_index=0)
    for c, plan in enumerate(plans):
        # window 30: clip c sits at offset (c + 0.5) / 3 of each segment, i.e. frame 30 k + 5 + 10 c.
        assert plan.sparse_indices == tuple(30 * k + 5 + 10 * c for k in range(8))
        assert plan.crop == (184, 0, 272, 272)
        assert not plan.flip and not plan.grayscale
    (single,) = plan_views(240, 176, 144, frames=8, views=1, split="test", seed=0, video_index=0)
    assert single.sparse_indices == tuple(30 * k + 15 for k in range(8))  # segment centres
    assert single.crop == (16, 0, 144, 144)


def _reference_test_frames(num_frames: int, dense: int, clip: int, clips: int) -> np.ndarray:
    """DiST's `_segment_based_sampling` for a test clip, transcribed: `dense` segments from a float32 linspace, the
    centre (one clip) or (clip + 1) / clips of each, rounded, clamped to the video."""
    bounds = torch.linspace(0, num_frames, dense + 1)
    index = torch.zeros(dense)
    for i in range(dense):
        width = bounds[i + 1] - bounds[i]
        index[i] = (bounds[i] + bounds[i + 1]) / 2 if clips == 1 else bounds[i] + width * (clip + 1) / clips
    return torch.round(torch.clamp(index, 0, num_frames - 1)).long().numpy()


@pytest.mark.parametrize("clips, gamma", [(3, 2), (3, 1), (3, 4), (1, 2)])
def test_reference_test_offsets_are_the_reference_codes_clip_frames(clips, gamma):
    """--test-offsets reference: CLIP's frames are exactly those of the reference's test clips (every gamma-th of its
    gamma*T dense frames); the dense frames between them follow dist-cache's rule, within a frame of the reference's."""
    for num_frames in [*range(8, 400, 7), 240, 480]:
        plans = plan_views(num_frames, 64, 48, frames=8, views=clips, split="test", seed=0, video_index=0,
                           test_offsets="reference", offsets_gamma=gamma)
        for clip, plan in enumerate(plans):
            reference = _reference_test_frames(num_frames, 8 * gamma, clip, clips)
            assert plan.sparse_indices == tuple(reference[::gamma]), (num_frames, clip)
            assert np.abs(dense_indices(plan, gamma, num_frames) - reference).max() <= 1
    # For 3 clips at gamma 2 that is 1/6, 1/3 and 1/2 of each of the T segments (here of 12 frames); centred: 1/6, 1/2,
    # 5/6, the clips spread over the whole segment.
    for mode, offsets in (("reference", (2, 4, 6)), ("centred", (2, 6, 10))):
        plans = plan_views(96, 64, 48, frames=8, views=3, split="test", seed=0, video_index=0, test_offsets=mode)
        assert [plan.sparse_indices for plan in plans] == [tuple(12 * k + o for k in range(8)) for o in offsets]


@pytest.mark.parametrize("split", ["train", "test"])
def test_short_videos_repeat_frames_in_range(split):
    for views in (1, 3):
        for plan in plan_views(3, 64, 48, frames=8, views=views, split=split, seed=0, video_index=0):
            assert len(plan.sparse_indices) == 8
            assert set(plan.sparse_indices) <= {0, 1, 2} and list(plan.sparse_indices) == sorted(plan.sparse_indices)
            for gamma in (1, 2, 4, 8):
                dense = dense_indices(plan, gamma, 3)
                assert dense.min() >= 0 and dense.max() <= 2


@pytest.mark.parametrize("num_frames", [3, 7, 16, 33, 250, 1000])
def test_dense_frames_align_with_sparse_and_nest(num_frames):
    for split in ("train", "test"):
        for plan in plan_views(num_frames, 64, 64, frames=8, views=3, split=split, seed=1, video_index=2):
            previous = None
            for gamma in (1, 2, 4, 8):
                dense = dense_indices(plan, gamma, num_frames)
                assert dense.dtype == np.int64 and dense.shape == (gamma * 8,)
                assert dense[::gamma].tolist() == list(plan.sparse_indices)
                assert 0 <= dense.min() and dense.max() < num_frames
                assert np.all(np.diff(dense) >= 0)
                if previous is not None:
                    assert np.array_equal(dense[::2], previous)  # gamma's frames are every other of 2 gamma's
                previous = dense
                for stored in (gamma, 2 * gamma, 4 * gamma):  # a store keeps G's frames; gamma's are a subset
                    subset = dense_subset(stored, gamma, 8)
                    assert np.array_equal(dense_indices(plan, stored, num_frames)[subset], dense)


def test_dense_frames_spread_over_the_slot():
    plan = ViewPlan(sparse_indices=(0, 10, 20), window=10.0, crop=(0, 0, 8, 8), flip=False, grayscale=False)
    assert dense_indices(plan, 4, 30).tolist() == [0, 2, 5, 7, 10, 12, 15, 17, 20, 22, 25, 27]
    assert dense_indices(plan, 4, 24).tolist()[-4:] == [20, 22, 23, 23]  # clamped at the last frame
    # A sparse frame drawn late in its segment, the next early: the dense frames fill the gap between them.
    uneven = ViewPlan(sparse_indices=(0, 9, 12), window=10.0, crop=(0, 0, 8, 8), flip=False, grayscale=False)
    assert dense_indices(uneven, 4, 30).tolist() == [0, 2, 4, 6, 9, 9, 10, 11, 12, 14, 17, 19]


def test_plan_round_trips_through_json():
    for plan in train(views=3) + plan_views(30, 64, 64, frames=4, views=2, split="test", seed=0, video_index=0):
        assert ViewPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        plan_views(30, 64, 64, frames=8, views=1, split="val", seed=0, video_index=0)
    with pytest.raises(ValueError, match="0 frames"):
        plan_views(0, 64, 64, frames=8, views=1, split="test", seed=0, video_index=0)


# ---- rendering ----------------------------------------------------------------------------------------------


def plan_with(crop, flip=False, grayscale=False):
    return ViewPlan(sparse_indices=(0,), window=1.0, crop=crop, flip=flip, grayscale=grayscale)


@pytest.fixture
def halves():
    """Two 48x64 frames: left half red, right half blue."""
    frames = np.zeros((2, 48, 64, 3), dtype=np.uint8)
    frames[:, :, :32] = (255, 0, 0)
    frames[:, :, 32:] = (0, 0, 255)
    return frames


@pytest.fixture
def noise():
    return np.random.default_rng(2).integers(0, 256, size=(16, 90, 120, 3), dtype=np.uint8)


def test_render_shape_and_crop(halves):
    out = render_frames(halves, plan_with((36, 4, 20, 30)), 32)  # inside the blue half
    assert out.dtype == torch.uint8 and out.shape == (2, 32, 32, 3)
    assert (out == torch.tensor([0, 0, 255], dtype=torch.uint8)).all()


def test_render_at_native_size_keeps_the_pixels(noise):
    out = render_frames(noise[:3], plan_with((5, 2, 32, 32)), 32)
    assert torch.equal(out, torch.from_numpy(noise[:3, 2:34, 5:37]))


@pytest.mark.parametrize("crop, size", [((10, 5, 100, 80), 56), ((0, 0, 120, 90), 64), ((30, 20, 24, 30), 64)])
def test_render_resizes_like_pil(noise, crop, size):
    """torch's uint8 antialiased bilinear kernel is a port of PIL's: the same bytes but for +-1 in rounding
    (measured: under 1 % of the values here; none when upscaling)."""
    x, y, w, h = crop
    out = render_frames(noise[:2], plan_with(crop), size).numpy().astype(np.int16)
    for frame, rendered in zip(noise[:2], out):
        pil = np.asarray(Image.fromarray(frame[y : y + h, x : x + w]).resize((size, size), Image.BILINEAR))
        difference = np.abs(rendered - pil)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.03


def test_render_flip_mirrors_left_and_right(halves):
    plain = render_frames(halves, plan_with((0, 0, 64, 48)), 16)
    flipped = render_frames(halves, plan_with((0, 0, 64, 48), flip=True), 16)
    assert torch.equal(flipped, plain.flip(2))
    assert flipped[0, 8, 1].tolist() == [0, 0, 255] and flipped[0, 8, 14].tolist() == [255, 0, 0]  # blue now left


def test_render_grayscale_is_pils_601_luma_on_three_channels(noise):
    out = render_frames(noise[:2], plan_with((0, 0, 120, 90), grayscale=True), 64)
    plain = render_frames(noise[:2], plan_with((0, 0, 120, 90)), 64)
    for rendered, colour in zip(out.numpy(), plain.numpy()):
        luma = np.asarray(Image.fromarray(colour).convert("L"))  # PIL: the same fixed-point 601 weights
        for c in range(3):
            np.testing.assert_array_equal(rendered[..., c], luma)


def test_render_does_not_depend_on_batch_or_threads(noise):
    threads = torch.get_num_threads()
    for plan in train(num_frames=16, width=120, height=90, views=4, seed=3):
        whole = render_frames(noise, plan, 56)
        assert torch.equal(render_frames(noise[4:12], plan, 56), whole[4:12])
        assert torch.equal(render_frames(torch.from_numpy(noise[4:12]), plan, 56), whole[4:12])
        try:
            torch.set_num_threads(1)
            assert torch.equal(render_frames(noise, plan, 56), whole)
        finally:
            torch.set_num_threads(threads)


def test_render_is_the_same_on_a_cpu_without_vector_kernels(noise, tmp_path):
    """ATEN_CPU_CAPABILITY=default makes torch use its generic kernels, as on a CPU without AVX2 (the vector
    kernel is what a modern x86 machine runs): the bytes do not change."""
    plan = train(num_frames=16, width=120, height=90, views=1, seed=5)[0]
    np.save(tmp_path / "noise.npy", noise)
    code = (
        "import json, sys, numpy as np, torch; from dist_cache.sampling import ViewPlan; "
        "from dist_cache.transforms import render_frames; "
        f"plan = ViewPlan.from_dict(json.loads({json.dumps(json.dumps(plan.to_dict()))})); "
        f"np.save(sys.argv[1], render_frames(np.load(sys.argv[2]), plan, 56).numpy()); "
        "print(torch.backends.cpu.get_cpu_capability())"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.npy"), str(tmp_path / "noise.npy")],
                         env=env, capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert out.stdout.strip() == "DEFAULT"
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), render_frames(noise, plan, 56).numpy())


def test_render_rejects_bad_input(halves):
    with pytest.raises(ValueError, match="outside"):
        render_frames(halves, plan_with((40, 0, 32, 32)), 16)
    with pytest.raises(ValueError, match="uint8"):
        render_frames(halves.astype(np.float32), plan_with((0, 0, 8, 8)), 16)


def test_normalize_frames(noise):
    frames = torch.from_numpy(noise[:6, :32, :32]).reshape(2, 3, 32, 32, 3)  # (B, T, R, R, 3)
    out = normalize_frames(frames, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 3, 32, 32) and out.is_contiguous()
    expected = (frames.permute(0, 1, 4, 2, 3).double() / 255 - torch.tensor(MEAN, dtype=torch.float64).view(3, 1,
                                                                                                            1)) / (
        torch.tensor(STD, dtype=torch.float64).view(3, 1, 1))
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    half = normalize_frames(frames, MEAN, STD, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, out.to(torch.bfloat16))
    with pytest.raises(ValueError, match="uint8"):
        normalize_frames(frames.float(), MEAN, STD)


def test_preprocess_description_is_json_safe():
    assert json.loads(json.dumps(PREPROCESS)) == PREPROCESS
    assert PREPROCESS["resize"] == "bilinear" and PREPROCESS["antialias"] is True
    assert PREPROCESS["resize_dtype"].startswith("uint8")


def test_dense_subset_needs_a_divisor():
    assert dense_subset(4, 2, 2).tolist() == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="does not divide"):
        dense_subset(4, 3, 2)
