"""Mixup and cutmix (dist_cache/mixing.py): labels, lambda, boxes and tokens stay consistent; draws depend on
(seed, step) only."""

from __future__ import annotations

import pytest
import torch

from dist_cache.mixing import Mix, Mixer


def _draws(mixer: Mixer, steps: int = 200) -> list[Mix]:
    return [mixer.draw(step) for step in range(steps)]


def test_mixed_targets_sum_to_one_and_weigh_each_partner_by_lambda():
    labels = torch.tensor([0, 2, 1, 2, 3])
    targets = Mix(0.3).targets(labels, 4, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(5))
    off, on = 0.1 / 4, 0.9 + 0.1 / 4
    # Sample 0 (class 0) is paired with sample 4 (class 3), reversed order.
    assert targets[0].tolist() == pytest.approx([0.3 * on + 0.7 * off, off, off, 0.3 * off + 0.7 * on])
    # The middle sample of an odd batch is its own partner: its smoothed one-hot.
    assert targets[2].tolist() == pytest.approx([off, on, off, off])


def test_mixup_blends_pixels_and_tokens_with_the_targets_lambda():
    x = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 3, 8, 8)
    mix = Mix(0.25)
    assert mix.pixels(x)[:, 0, 0, 0, 0].tolist() == pytest.approx([0.25 * i + 0.75 * (3 - i) for i in range(4)])
    tokens = torch.arange(4.0).view(1, 4, 1, 1, 1).expand(2, 4, 3, 5, 6)
    assert mix.tokens(tokens)[1, :, 2, 4, 5].tolist() == pytest.approx([0.25 * i + 0.75 * (3 - i) for i in range(4)])


def test_cutmix_lambda_is_the_area_the_box_leaves_to_each_sample():
    mixes = [m for m in _draws(Mixer(0.0, 1.0, image_size=32, seed=3)) if m is not None]
    assert all(m.box is not None for m in mixes)
    x = torch.zeros(2, 4, 3, 32, 32)
    x[1] = 1.0  # sample 0's pixels that come from its partner are ones
    for mix in mixes:
        y0, y1, x0, x1 = mix.box
        assert mix.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 32 ** 2)
        taken = mix.pixels(x)[0].mean().item()
        assert taken == pytest.approx(1 - mix.lam)
        assert mix.targets(torch.tensor([0, 1]), 2, 0.0)[0].tolist() == pytest.approx([mix.lam, 1 - mix.lam])
    assert len({m.box for m in mixes}) > 50  # boxes vary in size and place
    assert any(m.lam < 0.5 for m in mixes) and any(m.lam > 0.9 for m in mixes)


def test_feature_cutmix_boxes_cover_whole_patches_whose_tokens_come_from_the_partner():
    grid, patch = 4, 8
    mixer = Mixer(0.0, 1.0, image_size=grid * patch, seed=0, patch=patch)
    mixes = [m for m in _draws(mixer, 100) if m.lam < 1.0]
    assert mixes
    features = torch.zeros(3, 2, 4, 1 + grid * grid, 5)  # (L, B, T, 1 + cells, C)
    features[:, 1] = 1.0
    for mix in mixes:
        r0, r1, c0, c1 = mix.cells
        assert mix.box == (r0 * patch, r1 * patch, c0 * patch, c1 * patch)
        assert mix.lam == pytest.approx(1 - (r1 - r0) * (c1 - c0) / grid ** 2)
        mixed = mix.tokens(features)[:, 0]  # sample 0: its partner's tokens are ones
        cells = mixed[..., 1:, :].unflatten(-2, (grid, grid))
        inside = torch.zeros(grid, grid, dtype=torch.bool)
        inside[r0:r1, c0:c1] = True
        assert bool((cells[..., inside, :] == 1).all()) and bool((cells[..., ~inside, :] == 0).all())
        assert mixed[..., 0, :].flatten().tolist() == pytest.approx([1 - mix.lam] * mixed[..., 0, :].numel())
        pixels = mix.pixels(torch.arange(2.0).view(2, 1, 1, 1, 1).expand(2, 4, 3, grid * patch, grid * patch))
        assert pixels[0].mean().item() == pytest.approx(1 - mix.lam)  # the pixels' box is the tokens' box


def test_draws_are_a_function_of_seed_and_step_and_both_modes_alternate():
    a, b = Mixer(0.8, 1.0, 32, seed=5), Mixer(0.8, 1.0, 32, seed=5)
    assert _draws(a) == _draws(b)
    assert _draws(a) != _draws(Mixer(0.8, 1.0, 32, seed=6))
    cutmix = sum(m.box is not None for m in _draws(a))
    assert 60 < cutmix < 140  # each batch is cutmix with p 0.5
    assert Mixer(0.0, 0.0, 32, seed=0).draw(0) is None
    # A grid need not cover the image (ViT-SO400M/14 at 384 px; tests/test_towers.py), but a cell must fit in it.
    with pytest.raises(ValueError, match="patch size 31"):
        Mixer(0.0, 1.0, 30, seed=0, patch=31)
