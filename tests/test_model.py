"""DiST model: configuration, shapes, switches, gradients, cached == online, determinism, Ψ/Φ alignment.

All tests use the real open_clip tiny model (`dist-tiny`: 64 px, patch 16, width 64, 2 layers) on CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from dist_cache.backbone import SpatialEncoder, load_backbone
from dist_cache.errors import UserError
from dist_cache.model import ConfigError, DiST, DiSTConfig, OnlineDiST
from dist_cache.model.interaction import Phi, Psi
from dist_cache.model.switches import PHI_MODES, PSI_MODES, T_BLOCKS

T = 4
B = 2


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("dist-tiny", "none", allow_random_weights=True)


def make_config(backbone, **overrides) -> DiSTConfig:
    settings = {"alpha_dim": 32, "beta_dim": 16, **overrides}
    return DiSTConfig.from_backbone(backbone.describe(), num_frames=T, **settings)


def make_online(backbone, seed: int = 0, **overrides) -> OnlineDiST:
    config = make_config(backbone, **overrides)
    torch.manual_seed(seed)
    return OnlineDiST(backbone.spatial_encoder(config.layers), DiST(config))


def random_frames(config: DiSTConfig, batch: int = B, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, config.dense_frames, 3, config.image_size, config.image_size, generator=gen)


def sparse_features(backbone, config: DiSTConfig, frames: torch.Tensor) -> torch.Tensor:
    """What the cache stores: CLIP tokens of the dense frames 0, γ, 2γ, ... as (L, B, T, N+1, C)."""
    encoder = backbone.spatial_encoder(config.layers)
    sparse = frames[:, :: config.switches.gamma]
    tokens, _ = encoder(sparse.reshape(-1, *sparse.shape[2:]))
    return tokens.reshape(tokens.shape[0], frames.shape[0], config.num_frames, *tokens.shape[2:])


# ---- configuration -----------------------------------------------------------------------------------

def test_config_json_roundtrip(backbone):
    config = make_config(backbone, gamma=4, t_block="c3d", psi="max", phi="deconv", temp_to_integ=False, pool_heads=2)
    restored = DiSTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert restored.layers == [0, 1] and restored.dense_frames == 4 * T
    assert (restored.width, restored.patch_size, restored.image_size, restored.embed_dim) == (64, 16, 64, 64)


def test_config_defaults_are_the_reference_ssv2_ones(backbone):
    config = DiSTConfig.from_backbone(backbone.describe(), num_frames=8)
    s = config.switches
    assert (s.gamma, s.alpha_dim, s.beta_dim, s.pool_blocks, s.stem_t_kernel) == (2, 384, 96, 2, 5)
    assert (s.t_block, s.psi, s.phi) == ("r2plus1d", "dconv", "nearest")
    assert s.logit_scale == 100.0 and config.pool_num_heads == 6


@pytest.mark.parametrize("alpha, heads", [(32, 1), (96, 1), (192, 3), (384, 6), (768, 12), (200, 2), (320, 5)])
def test_pool_heads_default_divides_alpha(backbone, alpha, heads):
    config = make_config(backbone, alpha_dim=alpha)
    assert config.pool_num_heads == heads and alpha % config.pool_num_heads == 0
    DiST(config)  # nn.MultiheadAttention would refuse a non-divisor


@pytest.mark.parametrize(
    "overrides",
    [{"gamma": 0}, {"gamma": True}, {"gamma": "2"}, {"alpha_dim": 10_000_000}, {"beta_dim": 2.5},
     {"t_block": "tadaconv"}, {"psi": "conv"}, {"phi": "bicubic"}, {"pool_heads": 5}, {"temporal": 1},
     {"stem_t_kernel": 4}, {"pool_blocks": 0}, {"layers": []}],
)
def test_config_rejects_bad_settings(backbone, overrides):
    with pytest.raises(ConfigError) as info:
        make_config(backbone, **overrides)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_from_dict_rejects_unknown_keys(backbone):
    data = make_config(backbone).to_dict() | {"drop_path": 0.1}
    with pytest.raises(ConfigError, match="drop_path"):
        DiSTConfig.from_dict(data)
    nested = make_config(backbone).to_dict()
    nested["switches"]["drop_path"] = 0.1
    with pytest.raises(ConfigError, match="drop_path"):
        DiSTConfig.from_dict(nested)


def test_from_dict_reads_the_flat_configs_of_dist_cache_0_1(backbone):
    config = make_config(backbone, gamma=4, t_block="c3d", pool_blocks=3)
    flat = {k: v for k, v in config.to_dict().items() if k != "switches"} | config.switches.to_dict()
    assert DiSTConfig.from_dict(flat) == config
    # 0.1 had no later switches: a record without them takes the defaults.
    del flat["t_block"]
    assert DiSTConfig.from_dict(flat).switches.t_block == "r2plus1d"


@pytest.mark.parametrize("damage", [
    lambda d: d.pop("width"),
    lambda d: d.update(width="64"),
    lambda d: d.update(layers=[0, -1]),
    lambda d: d.update(layers="all"),
    lambda d: d.update(num_frames=10**9),
    lambda d: d["switches"].update(alpha_dim=10_000_000),
    lambda d: d.update(switches=[1, 2]),
])
def test_from_dict_refuses_a_damaged_record_in_one_line(backbone, damage):
    data = make_config(backbone).to_dict()
    damage(data)
    with pytest.raises(ConfigError) as info:
        DiSTConfig.from_dict(data)
    assert "\n" not in str(info.value)


# ---- shapes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 2, 4, 8])
def test_forward_shape_every_gamma(backbone, gamma):
    model = make_online(backbone, gamma=gamma)
    frames = random_frames(model.dist.config)
    out = model(frames)
    assert out.shape == (B, backbone.embed_dim) and torch.isfinite(out).all()


@pytest.mark.parametrize("t_block, psi, phi", list(itertools.product(T_BLOCKS, PSI_MODES, PHI_MODES)))
def test_forward_shape_every_block_option(backbone, t_block, psi, phi):
    model = make_online(backbone, t_block=t_block, psi=psi, phi=phi, gamma=2)
    out = model(random_frames(model.dist.config))
    assert out.shape == (B, backbone.embed_dim) and torch.isfinite(out).all()


SWITCHES = ("temporal", "integration", "integ_to_temp", "temp_to_integ")


@pytest.mark.parametrize("values", list(itertools.product((True, False), repeat=4)),
                         ids=lambda v: "-".join(str(int(x)) for x in v))
def test_forward_shape_every_switch(backbone, values):
    switches = dict(zip(SWITCHES, values))
    config = make_config(backbone, **switches)
    dist = DiST(config)
    frames = random_frames(config)
    features = sparse_features(backbone, config, frames)
    out = dist(features, frames if config.switches.temporal else None)
    assert out.shape == (B, backbone.embed_dim) and torch.isfinite(out).all()
    # Modules built follow the documented switch semantics.
    L = config.num_layers
    assert (dist.temporal is None) == (not config.switches.temporal)
    assert (dist.integration is None) == (not config.switches.integration)
    both = config.switches.temporal and config.switches.integration
    if both and config.switches.temp_to_integ:
        expected_psi = set(map(str, range(L)))
    else:
        expected_psi = {str(L - 1)} if config.switches.temporal else set()
    expected_phi = set(map(str, range(L - 1))) if both and config.switches.integ_to_temp else set()
    assert set(dist.psi.keys()) == expected_psi
    assert set(dist.phi.keys()) == expected_phi  # never a Φ for the last layer (its output is discarded)
    assert (dist.head.pool is None) == (not config.switches.temporal and not config.switches.integration)


def test_spatial_only_ignores_frames_and_needs_none(backbone):
    config = make_config(backbone, temporal=False, integration=False)
    dist = DiST(config)
    frames = random_frames(config)
    features = sparse_features(backbone, config, frames)
    assert torch.equal(dist(features, None), dist(features, frames))


def test_any_float_dtype_is_cast_to_the_module_dtype(backbone):
    config = make_config(backbone)
    dist = DiST(config)
    frames = random_frames(config)
    features = sparse_features(backbone, config, frames)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        out = dist(features.to(dtype), frames.to(dtype))
        assert out.dtype == torch.float32


def test_embedding_and_logits_are_fp32_under_autocast(backbone):
    # In bf16 a cosine keeps 8 significant bits: at scale 100 the logits would move by up to 0.4. The head's last
    # normalisation and projection, and the logits, run in fp32 whatever autocast surrounds them.
    config = make_config(backbone)
    dist = DiST(config)
    frames = random_frames(config)
    features = sparse_features(backbone, config, frames)
    text = torch.randn(5, backbone.embed_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = dist(features, frames)
        logits = dist.logits(emb.to(torch.bfloat16), text)
    assert emb.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(logits, dist.logits(emb.to(torch.bfloat16).float(), text), rtol=0, atol=0)


def test_bad_inputs_are_refused(backbone):
    config = make_config(backbone)
    dist = DiST(config)
    frames = random_frames(config)
    features = sparse_features(backbone, config, frames)
    with pytest.raises(ValueError, match="frames are required"):
        dist(features, None)
    with pytest.raises(ValueError, match="gamma"):
        dist(features, frames[:, ::2])
    with pytest.raises(ValueError, match="features"):
        dist(features[:1], frames)
    with pytest.raises(ValueError, match="features"):
        dist(features[:, :, :2], frames)


def test_encoder_layers_must_match(backbone):
    config = make_config(backbone)
    with pytest.raises(ValueError, match="layers"):
        OnlineDiST(backbone.spatial_encoder([1]), DiST(config))


# ---- gradients ----------------------------------------------------------------------------------------

GRAD_CASES = [
    {},
    {"gamma": 1},
    {"gamma": 4, "t_block": "c3d", "psi": "avg", "phi": "trilinear"},
    {"t_block": "joint", "psi": "max", "phi": "deconv"},
    {"t_block": "tada", "gamma": 4},
    {"temporal": False},
    {"integration": False},
    {"temporal": False, "integration": False},
    {"integ_to_temp": False},
    {"temp_to_integ": False},
    {"integ_to_temp": False, "temp_to_integ": False},
]


@pytest.mark.parametrize("overrides", GRAD_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_gradients_reach_every_trainable_parameter_and_never_clip(backbone, overrides):
    model = make_online(backbone, **overrides)
    frames = random_frames(model.dist.config, batch=3)
    text = torch.randn(5, backbone.embed_dim, generator=torch.Generator().manual_seed(3))
    loss = F.cross_entropy(model.logits(model(frames), text), torch.tensor([0, 3, 4]))
    loss.backward()
    missing = [name for name, p in model.dist.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in model.dist.parameters()}
    for name, p in model.encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name


# ---- cached path == online path -----------------------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 2, 4])
def test_cached_features_give_the_online_result(backbone, gamma):
    model = make_online(backbone, gamma=gamma).eval()
    config = model.dist.config
    frames = random_frames(config, batch=3)
    online = model(frames)
    features = sparse_features(backbone, config, frames)  # computed independently of OnlineDiST
    cached = model.dist(features, frames)
    torch.testing.assert_close(cached, online, rtol=1e-5, atol=1e-6)

    # The cache stores fp16: the embedding must survive that within fp16 tolerance.
    cached16 = model.dist(features.half(), frames)
    scale = online.abs().max()
    assert (cached16 - online).abs().max() <= 2e-3 * scale
    assert F.cosine_similarity(cached16, online, dim=-1).min() > 0.9999


def test_online_clip_ignores_the_training_autocast(backbone):
    # Cached features were extracted in fp32 without autocast; the live CLIP must compute the same ones
    # inside the training step's mixed precision (bf16 autocast on the CPU stands in for CUDA's).
    model = make_online(backbone, gamma=2).eval()
    frames = random_frames(model.dist.config)
    reference = model.features(frames)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.features(frames)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, reference, rtol=0, atol=0)


def test_online_clip_runs_in_the_encoders_precision(backbone):
    # A store extracted in bf16 holds bf16 CLIP tokens: the online path computes the same ones, whatever
    # autocast the training step runs the branch under.
    config = make_config(backbone)
    encoder = SpatialEncoder(backbone.model.visual, config.layers, "bf16")
    model = OnlineDiST(encoder, DiST(config)).eval()
    frames = random_frames(config)
    sparse = frames[:, :: config.switches.gamma]
    expected, _ = encoder(sparse.reshape(-1, *sparse.shape[2:]))
    for outer in (contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with outer:
            features = model.features(frames)
        assert features.dtype == torch.bfloat16
        torch.testing.assert_close(features, expected.reshape(features.shape), rtol=0, atol=0)


def test_online_clip_sees_exactly_the_sparse_frames(backbone):
    model = make_online(backbone, gamma=2)
    frames = random_frames(model.dist.config)
    changed = frames.clone()
    changed[:, 1::2] = torch.randn_like(changed[:, 1::2])  # only the frames between CLIP's frames
    assert torch.equal(model.features(frames), model.features(changed))
    changed_sparse = frames.clone()
    changed_sparse[:, 2] += 1.0
    assert not torch.equal(model.features(frames), model.features(changed_sparse))


# ---- determinism and checkpoints ------------------------------------------------------------------------

def test_same_seed_same_init_and_output(backbone):
    a, b, c = make_online(backbone, seed=7), make_online(backbone, seed=7), make_online(backbone, seed=8)
    frames = random_frames(a.dist.config)
    state_a, state_b, state_c = a.dist.state_dict(), b.dist.state_dict(), c.dist.state_dict()
    assert state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert torch.equal(a(frames), b(frames))
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert not torch.allclose(a(frames), c(frames))


def test_branch_state_excludes_clip_and_restores_the_branch(backbone):
    a, b = make_online(backbone, seed=1), make_online(backbone, seed=2)
    state = a.dist.state_dict()
    assert state and not any(key.startswith(("encoder", "visual")) for key in state)
    assert sum(v.numel() for v in state.values()) == sum(p.numel() for p in a.dist.parameters())
    b.dist.load_state_dict(state)
    frames = random_frames(a.dist.config)
    assert torch.equal(a(frames), b(frames))


def test_init_follows_the_reference(backbone):
    dist = DiST(make_config(backbone, alpha_dim=64, beta_dim=32))
    linear = dist.integration.fcs[0]
    assert torch.all(linear.bias == 0) and abs(linear.weight.std().item() - 0.02) < 0.004
    assert torch.all(dist.temporal.stem.conv.bias == 0)
    assert abs(dist.psi["0"].cls_token.std().item() - 0.02) < 0.006
    proj = dist.head.proj
    assert abs(proj.std().item() - 64**-0.5) < 0.02  # randn * αC^-0.5, not trunc-normal .02
    norm = dist.integration.blocks[0].norm_a
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


# ---- logits -----------------------------------------------------------------------------------------------

def test_logits_are_scaled_cosine(backbone):
    dist = DiST(make_config(backbone))
    video = torch.randn(3, backbone.embed_dim)
    text = torch.randn(4, backbone.embed_dim)
    expected = 100.0 * F.normalize(video, dim=-1) @ F.normalize(text, dim=-1).t()
    torch.testing.assert_close(dist.logits(video, text), expected)
    torch.testing.assert_close(dist.logits(5 * video, 0.1 * text), expected)
    assert dist.logits(video, text).abs().max() <= 100.0 + 1e-4


# ---- Ψ / Φ alignment: sparse slot k <-> dense window γk .. γk+γ-1 ----------------------------------------

@pytest.mark.parametrize("mode", ["dconv", "avg", "max"])
@pytest.mark.parametrize("gamma", [2, 4])
def test_psi_reads_exactly_its_dense_window(backbone, mode, gamma):
    config = make_config(backbone, gamma=gamma, psi=mode)
    psi = Psi(config)
    h, w = config.grid
    z = torch.randn(1, config.switches.beta_dim, config.dense_frames, h, w)
    base = psi(z)
    assert base.shape == (1, T, config.num_tokens, config.switches.alpha_dim)
    k, j = 2, gamma - 1
    bumped = z.clone()
    bumped[:, :, gamma * k + j, 1, 2] += 5.0
    diff = (psi(bumped) - base).abs().amax(dim=-1)[0]  # (T, N+1)
    changed = (diff > 0).nonzero().tolist()
    assert changed == [[k, 1 + 1 * w + 2]]  # slot k, patch (row 1, col 2) in row-major order after the cls


@pytest.mark.parametrize("gamma", [2, 4])
def test_nearest_phi_writes_onto_the_window_psi_reads(backbone, gamma):
    config = make_config(backbone, gamma=gamma, phi="nearest")
    phi = Phi(config)
    m = torch.randn(1, T, config.num_tokens, config.switches.alpha_dim)
    out = phi(m)
    assert out.shape == (1, config.switches.beta_dim, config.dense_frames, *config.grid)
    for k in range(T):
        for j in range(gamma):
            torch.testing.assert_close(out[:, :, gamma * k + j], out[:, :, gamma * k])
    bumped = m.clone()
    bumped[:, 1, 0] += 10.0  # the cls token is dropped by Φ
    torch.testing.assert_close(phi(bumped), out)
    bumped[:, 1, 5] += 10.0
    changed_frames = ((phi(bumped) - out).abs().amax(dim=(0, 1, 3, 4)) > 0).nonzero().flatten().tolist()
    assert changed_frames == list(range(gamma, 2 * gamma))


# ---- TAdaConv T-Block -------------------------------------------------------------------------------------

def test_tada_block_convolves_each_frame_with_its_calibrated_kernel():
    # TAdaConv's definition: frame t is convolved with W_t = alpha_t * W, alpha_t scaling W's input channels.
    # The block applies it by scaling the input instead; both must agree exactly (up to float rounding).
    from dist_cache.model.temporal import TAdaBlock

    torch.manual_seed(0)
    block = TAdaBlock(8).eval()
    with torch.no_grad():
        block.calibration.b.weight.normal_(std=0.5)  # far from alpha = 1, so the calibration matters
    z = torch.randn(2, 8, 6, 5, 5)
    x = block.norm(z)
    alpha = block.calibration(x)  # (B, C, T)
    assert alpha.shape == (2, 8, 6) and (alpha - 1).abs().max() > 0.1
    weight, bias = block.conv.weight[:, :, 0], block.conv.bias  # (Cout, Cin, 3, 3)
    frames = []
    for t in range(6):
        per_sample = [F.conv2d(x[b:b + 1, :, t], weight * alpha[b, :, t][None, :, None, None], bias, padding=1)
                      for b in range(2)]
        frames.append(torch.cat(per_sample))
    expected = block.act(z + torch.stack(frames, dim=2))
    torch.testing.assert_close(block(z), expected, rtol=1e-5, atol=1e-5)


def test_tada_calibration_reads_temporal_context():
    # alpha_t comes from frame t's neighbours (two stacked kernel-3 convs over time: frames t-2 .. t+2) and from
    # the clip-wide descriptor through g.
    from dist_cache.model.temporal import TemporalCalibration

    torch.manual_seed(0)
    calibration = TemporalCalibration(8).eval()
    x = torch.randn(1, 8, 8, 4, 4)
    bumped = x.clone()
    bumped[:, :, 3] += 1.0

    def changed_frames() -> list[int]:
        return ((calibration(bumped) - calibration(x)).abs().amax(dim=1)[0] > 0).nonzero().flatten().tolist()

    assert changed_frames() == list(range(8))
    with torch.no_grad():
        calibration.g.weight.zero_()  # without the clip-wide descriptor, only the local window remains
    assert changed_frames() == [1, 2, 3, 4, 5]
