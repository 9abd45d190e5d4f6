"""The fold: DiST on PCA codes computes what it computes on the tokens they stand for, and learns the same.

Real dist-tiny geometry (width 64, 2 layers), random codes and an orthonormal basis per layer (other K per layer,
as `--pca 0.99` gives). The reference is the same step on the reconstructed float32 tokens x = mean + z @ B.
Also int8 codes with their scales (dequantised where each layer is read), with and without projection."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_cache.backbone import load_backbone
from dist_cache.mixing import Mixer
from dist_cache.model import DiST, DiSTConfig
from dist_cache.model.compact import CompactTokens, TokenLinear

T, B, KS = 4, 4, (24, 40)


@pytest.fixture(scope="module")
def config() -> DiSTConfig:
    backbone = load_backbone("dist-tiny", "none", allow_random_weights=True)
    return DiSTConfig.from_backbone(backbone.describe(), num_frames=T, alpha_dim=32, beta_dim=16)


def _codes(config: DiSTConfig, seed: int = 0) -> CompactTokens:
    gen = torch.Generator().manual_seed(seed)
    C, N1 = config.width, config.num_tokens
    mean = torch.randn(len(KS), C, generator=gen) * 3
    components = [torch.linalg.qr(torch.randn(C, k, generator=gen))[0].t().contiguous() for k in KS]
    codes = [torch.randn(B, T, N1, k, generator=gen) * torch.linspace(5, 0.5, k) for k in KS]
    return CompactTokens(codes, mean=mean, components=components)


def _tokens(codes: CompactTokens) -> torch.Tensor:
    """The float32 tokens (L, B, T, N+1, C) the codes stand for, x = mean + z @ B: the reference the steps match."""
    return torch.stack([codes.values(i) if codes.components is None else
                        codes.values(i) @ codes.components[i] + codes.mean[i] for i in range(codes.num_layers)])


def _frames(config: DiSTConfig) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(B, config.dense_frames, 3, config.image_size, config.image_size, generator=gen)


def _step(config: DiSTConfig, features, frames: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    net = DiST(config)
    text = torch.randn(3, config.embed_dim, generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(net.logits(net(features, frames), text), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same_step(config, codes, tokens, frames) -> None:
    loss_codes, grads_codes = _step(config, codes, frames)
    loss_tokens, grads_tokens = _step(config, tokens, frames)
    torch.testing.assert_close(loss_codes, loss_tokens, rtol=1e-5, atol=1e-6)
    assert grads_codes.keys() == grads_tokens.keys()
    assert "head.cls_proj.weight" in grads_codes
    assert any(name.startswith("integration.fcs.") for name in grads_codes) == config.switches.integration
    for name in grads_codes:  # float32 tolerance, relative to each gradient's size (its elements span decades)
        error = (grads_codes[name] - grads_tokens[name]).norm() / grads_tokens[name].norm().clamp_min(1e-30)
        assert error < 1e-5, (name, float(error))


def test_a_step_on_codes_has_the_loss_and_gradients_of_the_step_on_their_tokens(config):
    codes = _codes(config)
    _assert_same_step(config, codes, _tokens(codes), _frames(config))


@pytest.mark.parametrize("projected", [True, False])
def test_int8_codes_are_dequantised_where_each_layer_is_read(config, projected):
    gen = torch.Generator().manual_seed(5)
    C, N1 = config.width, config.num_tokens
    dims = KS if projected else (C, C)
    codes = [torch.randint(-127, 128, (B, T, N1, d), generator=gen, dtype=torch.int8) for d in dims]
    scales = [torch.rand(B, T, N1, 2, generator=gen).half() for _ in dims]
    channel = [torch.rand(d, generator=gen) + 0.5 for d in dims]
    groups = [(torch.rand(d, generator=gen) < 0.1).long() for d in dims]
    fold = dict(mean=torch.randn(len(KS), C, generator=gen), components=[
        torch.linalg.qr(torch.randn(C, k, generator=gen))[0].t().contiguous() for k in KS]) if projected else {}
    stored = CompactTokens(codes, scales=scales, channel_scales=channel, groups=groups, **fold)
    _assert_same_step(config, stored, _tokens(stored), _frames(config))


def test_the_fold_reaches_every_linear_that_reads_tokens(config):
    """No temporal encoder: the embedding is the integration branch and the head's class-token Linear alone."""
    cfg = DiSTConfig.from_dict({**config.to_dict(), "switches": {**config.to_dict()["switches"], "temporal": False}})
    codes = _codes(config, seed=1)
    _assert_same_step(cfg, codes, _tokens(codes), None)
    # ...and the head's Linear alone ("spatial encoder only").
    both_off = {**cfg.to_dict()["switches"], "integration": False}
    cfg = DiSTConfig.from_dict({**cfg.to_dict(), "switches": both_off})
    _assert_same_step(cfg, codes, _tokens(codes), None)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_feature_mixing_of_codes_is_feature_mixing_of_their_tokens(config, mixup, cutmix):
    """Mixup and cutmix weigh two samples by lam and 1 - lam (per token): they commute with x = mean + z @ B."""
    mixer = Mixer(mixup, cutmix, config.image_size, seed=0, patch=config.patch_size)
    mix = next(m for m in (mixer.draw(s) for s in range(50)) if m is not None and 0.1 < m.lam < 0.9)
    codes = _codes(config, seed=2)
    _assert_same_step(config, codes.map(mix.tokens), mix.tokens(_tokens(codes)), _frames(config))


def test_token_linear_is_nn_linear_with_its_state_dict():
    torch.manual_seed(0)
    fc, plain = TokenLinear(8, 4), torch.nn.Linear(8, 4)
    plain.load_state_dict(fc.state_dict())
    x = torch.randn(3, 8)
    torch.testing.assert_close(fc(x), plain(x))
    basis = torch.linalg.qr(torch.randn(8, 5))[0].t()
    z, mean = torch.randn(3, 5), torch.randn(8)
    torch.testing.assert_close(fc(z, basis, mean), plain(mean + z @ basis))
