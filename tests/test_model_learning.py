"""DiST learns what it is built for: motion that only the dense frames show.

Tiny real open_clip model (random weights, frozen), synthetic frame tensors, CPU, seeded. Training is the
real pipeline's objective: logits = 100 * cosine against fixed class "text" embeddings, cross-entropy,
AdamW, on CLIP features computed once from the sparse frames (as the cache stores them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from dist_cache.backbone import load_backbone
from dist_cache.model import DiST, DiSTConfig

T, GAMMA, SIZE, SQUARE = 4, 2, 64, 12
DENSE = T * GAMMA


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dist-tiny", "none", allow_random_weights=True)


def _noise(gen: torch.Generator) -> torch.Tensor:
    return 0.1 * torch.rand(DENSE, 3, SIZE, SIZE, generator=gen)


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    return int(torch.randint(low, high + 1, (1,), generator=gen))


def direction_videos(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright square crossing the frame left->right (class 0) or right->left (class 1).

    Start points are drawn so both classes cover the same positions: only the order of frames tells them apart.
    """
    videos = torch.empty(n, DENSE, 3, SIZE, SIZE)
    labels = torch.arange(n) % 2
    step = 4
    span = step * (DENSE - 1)
    for i in range(n):
        videos[i] = _noise(gen)
        y = _randint(0, SIZE - SQUARE, gen)
        if labels[i] == 0:
            x0, dx = _randint(0, SIZE - SQUARE - span, gen), step
        else:
            x0, dx = _randint(span, SIZE - SQUARE, gen), -step
        for f in range(DENSE):
            x = x0 + dx * f
            videos[i, f, :, y : y + SQUARE, x : x + SQUARE] = 1.0
    return videos, labels


def between_frame_pairs(pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of videos whose sparse frames (dense[::γ]) are bit-identical.

    A square sits still at a random place in every sparse frame; in the frames between them it is shown 8 px
    to the left (class 0) or to the right (class 1). Both members of a pair share every sparse frame, noise
    included, so a model that sees only the sparse frames must give them the same prediction.
    """
    videos = torch.empty(2 * pairs, DENSE, 3, SIZE, SIZE)
    labels = torch.tensor([0, 1] * pairs)
    shift = 8
    for p in range(pairs):
        x = _randint(shift, SIZE - SQUARE - shift, gen)
        y = _randint(0, SIZE - SQUARE, gen)
        base = _noise(gen)
        for label in (0, 1):
            video = base.clone()
            for f in range(DENSE):
                fx = x if f % GAMMA == 0 else x + (shift if label else -shift)
                video[f, :, y : y + SQUARE, fx : fx + SQUARE] = 1.0
            videos[2 * p + label] = video
    return videos, labels


def normalise(videos: torch.Tensor, backbone) -> torch.Tensor:
    mean = torch.tensor(backbone.mean).view(1, 1, 3, 1, 1)
    std = torch.tensor(backbone.std).view(1, 1, 3, 1, 1)
    return (videos - mean) / std


def cached_features(backbone, frames: torch.Tensor) -> torch.Tensor:
    """The tower's tokens of the sparse frames, as a store holds them, formed into the branch's as a batch is
    (`branch_tokens`: the summary token and the patches; CLIP's tokens unchanged)."""
    encoder = backbone.spatial_encoder([0, 1])
    sparse = frames[:, ::GAMMA]
    tokens, _ = encoder(sparse.reshape(-1, *sparse.shape[2:]))
    return encoder.branch_tokens(tokens.reshape(tokens.shape[0], frames.shape[0], T, *tokens.shape[2:]))


def train_and_evaluate(backbone, data, seed: int = 0, max_steps: int = 250, amp: torch.dtype | None = None,
                       **overrides) -> float:
    """Train a small DiST (αC 32, βC 16) and return held-out accuracy; `amp`: run the forward passes under CPU
    autocast with that dtype, as training does on a GPU.

    Stops early once the training loss has been tiny for 10 steps (a model that cannot fit runs all steps).
    """
    (x_train, y_train), (x_test, y_test) = data
    f_train, f_test = cached_features(backbone, x_train), cached_features(backbone, x_test)
    gen = torch.Generator().manual_seed(seed)
    text = torch.randn(2, backbone.embed_dim, generator=gen)  # fixed class embeddings, like CLIP's text ones
    torch.manual_seed(seed)
    config = DiSTConfig.from_backbone(backbone.describe(), num_frames=T, gamma=GAMMA, alpha_dim=32, beta_dim=16,
                                      **overrides)
    model = DiST(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 30))
    frames_in = (lambda x: x) if config.switches.temporal else (lambda x: None)
    recent: list[float] = []
    autocast = (lambda: torch.autocast("cpu", dtype=amp)) if amp is not None else contextlib.nullcontext
    for _ in range(max_steps):
        idx = torch.randint(0, x_train.shape[0], (32,), generator=gen)
        with autocast():
            logits = model.logits(model(f_train[:, idx], frames_in(x_train[idx])), text)
        loss = F.cross_entropy(logits, y_train[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        warmup.step()
        recent = (recent + [loss.item()])[-10:]
        if len(recent) == 10 and max(recent) < 0.01:
            break
    model.eval()
    with torch.no_grad(), autocast():
        predictions = model.logits(model(f_test, frames_in(x_test)), text).argmax(dim=1)
    return (predictions == y_test).float().mean().item()


def test_full_model_learns_the_direction_of_motion(backbone):
    gen = torch.Generator().manual_seed(11)
    train = direction_videos(192, gen)
    test = direction_videos(128, gen)
    data = ((normalise(train[0], backbone), train[1]), (normalise(test[0], backbone), test[1]))
    assert train[1].float().mean() == 0.5 and test[1].float().mean() == 0.5
    assert train_and_evaluate(backbone, data) >= 0.9


def test_training_under_bf16_autocast_learns_like_fp32(backbone):
    # What a GPU run does (bf16 autocast around the forward), reproduced with CPU autocast on a smaller task.
    gen = torch.Generator().manual_seed(13)
    train = direction_videos(64, gen)
    test = direction_videos(64, gen)
    data = ((normalise(train[0], backbone), train[1]), (normalise(test[0], backbone), test[1]))
    assert train_and_evaluate(backbone, data, max_steps=150) >= 0.9
    assert train_and_evaluate(backbone, data, max_steps=150, amp=torch.bfloat16) >= 0.9


@pytest.mark.parametrize("t_block", ["r2plus1d", "tada"])
def test_only_the_temporal_encoder_sees_motion_between_sparse_frames(backbone, t_block):
    gen = torch.Generator().manual_seed(12)
    train = between_frame_pairs(96, gen)
    test = between_frame_pairs(64, gen)
    # The premise: each pair's sparse frames (what CLIP sees) are identical, the in-between frames are not.
    sparse = test[0][:, ::GAMMA]
    assert torch.equal(sparse[0::2], sparse[1::2])
    assert not torch.equal(test[0][0::2, 1::2], test[0][1::2, 1::2])
    data = ((normalise(train[0], backbone), train[1]), (normalise(test[0], backbone), test[1]))

    assert train_and_evaluate(backbone, data, t_block=t_block) >= 0.9
    if t_block == "r2plus1d":
        # Without the temporal encoder both members of every pair get the same input, hence one prediction.
        assert train_and_evaluate(backbone, data, max_steps=120, temporal=False) <= 0.65
