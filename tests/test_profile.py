"""FLOPs and parameter profile against DiST Table 1 (ViT-B/16, 8 frames, one view) and on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from dist_cache.flops import PARTS, format_profile, profile_dist
from dist_cache.model import ConfigError, DiSTSwitches
from dist_cache.recipes import RECIPES


@pytest.fixture(scope="module")
def vit_b16():
    return profile_dist("ViT-B-16", frames=8, gamma=2, alpha_dim=384, beta_dim=96)


def test_vit_b16_default_matches_the_paper(vit_b16):
    r = vit_b16
    assert r["paper_gflops"] == 163.1
    assert abs(r["gflops"] / 163.1 - 1) < 0.03
    assert abs(r["gflops_paper_convention"] / 163.1 - 1) < 0.03
    # The reference's extra patch embedding of the 8 non-CLIP dense frames (docs/MODEL.md, "FLOPs": 0.92 G).
    assert r["gflops_dense_patch_embed"] == pytest.approx(0.92, abs=0.01)
    assert r["gflops_paper_convention"] == pytest.approx(r["gflops"] + r["gflops_dense_patch_embed"])
    # Attention is counted: 17.56 GMACs per ViT-B/16 frame, not the 16.85 a fast-path count gives.
    assert r["clip_gflops_per_frame"] == pytest.approx(17.56, abs=0.01)
    assert r["gflops_by_part"]["clip"] == pytest.approx(8 * 17.56, abs=0.1)


def test_vit_b16_parameters_match_the_paper(vit_b16):
    params = vit_b16["params"]
    assert params["clip_visual_frozen"] == 86_192_640  # 86.19 M
    # Reference DiST: 18,998,112 (19.00 M); we do not build the last layer's Φ (Linear 384->96, 36,960 params),
    # whose output the reference discards.
    assert params["dist_trainable"] == 18_998_112 - (384 * 96 + 96)
    assert params["total"] / 1e6 == pytest.approx(105, abs=0.5)
    assert params["temporal_encoder"] + params["integration_branch"] + params["head"] == params["dist_trainable"]


TABLE1 = [
    ({"gamma": 1}, 158.7), ({"gamma": 2}, 163.1), ({"gamma": 4}, 171.6), ({"gamma": 8}, 188.8),
    ({"alpha_dim": 96}, 149.4), ({"alpha_dim": 192}, 152.8), ({"alpha_dim": 384}, 163.1), ({"alpha_dim": 768}, 196.1),
    ({"beta_dim": 64}, 159.7), ({"beta_dim": 96}, 163.1), ({"beta_dim": 128}, 167.4), ({"beta_dim": 192}, 178.7),
    ({"t_block": "c3d"}, 168.2), ({"t_block": "tada"}, 162.0),
]


@pytest.mark.parametrize("setting, paper", TABLE1, ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_table1_cdef_settings_within_3_percent(setting, paper):
    r = profile_dist("ViT-B-16", frames=8, **setting)
    assert r["paper_gflops"] == paper
    assert abs(r["gflops_paper_convention"] / paper - 1) < 0.03
    assert r["paper_rel_diff"] == pytest.approx(r["gflops_paper_convention"] / paper - 1)


def test_the_k400_recipe_has_the_paper_k400_parameter_count():
    # Paper Tab. 6: ViT-B/16 DiST on K400 has 112 M parameters, 4 AdaPooling blocks against SSv2's 2 (105 M).
    k400 = profile_dist("ViT-B-16", frames=8, switches=DiSTSwitches(**RECIPES["k400"].switches))
    assert k400["params"]["total"] / 1e6 == pytest.approx(112, abs=0.5)
    ssv2 = profile_dist("ViT-B-16", frames=8, switches=DiSTSwitches(**RECIPES["ssv2"].switches))
    assert ssv2["params"]["total"] / 1e6 == pytest.approx(105, abs=0.5)


def test_switches_change_what_is_counted():
    full = profile_dist("dist-tiny", frames=4, alpha_dim=32, beta_dim=16)
    spatial_only = profile_dist("dist-tiny", frames=4, alpha_dim=32, beta_dim=16, temporal=False, integration=False)
    no_temporal = profile_dist("dist-tiny", frames=4, alpha_dim=32, beta_dim=16, temporal=False)
    by_part = spatial_only["gflops_by_part"]
    assert by_part["temporal_encoder"] == 0 == by_part["integration_branch"]
    assert spatial_only["gflops_dense_patch_embed"] == 0  # no dense frames without a temporal encoder
    assert no_temporal["gflops_by_part"]["temporal_encoder"] == 0 < no_temporal["gflops_by_part"]["integration_branch"]
    assert spatial_only["gflops_by_part"]["clip"] == full["gflops_by_part"]["clip"]
    assert spatial_only["gflops"] < no_temporal["gflops"] < full["gflops"]
    assert spatial_only["paper_gflops"] is None


def test_tiny_profile_parts_are_positive_and_sum_to_the_total():
    r = profile_dist("dist-tiny", frames=4, gamma=2, alpha_dim=32, beta_dim=16)
    parts = r["gflops_by_part"]
    assert set(parts) == set(PARTS)
    assert all(parts[p] > 0 for p in PARTS)
    assert sum(parts.values()) == pytest.approx(r["gflops"], rel=1e-12)
    assert r["params"]["dist_trainable"] > 0 and r["params"]["clip_visual_frozen"] > 0
    json.dumps(r)  # JSON-safe for `--json`
    # The model itself: the parameter count equals a real (non-meta) build of the same config.
    from dist_cache.model import DiST, DiSTConfig

    assert sum(p.numel() for p in DiST(DiSTConfig.from_dict(r["config"])).parameters()) == r["params"]["dist_trainable"]


def test_profile_restores_the_mha_fast_path():
    before = torch.backends.mha.get_fastpath_enabled()
    profile_dist("dist-tiny", frames=2, alpha_dim=32, beta_dim=16)
    assert torch.backends.mha.get_fastpath_enabled() == before


def test_format_profile_shows_both_conventions(vit_b16):
    text = format_profile(vit_b16)
    assert "ViT-B-16" in text and "gamma 2" in text
    assert f"{vit_b16['gflops']:.2f}" in text
    assert f"{vit_b16['gflops_paper_convention']:.2f}" in text
    assert "163.10" in text and "paper convention" in text
    assert "86.19" in text and "18.96" in text


def test_unknown_settings_are_refused():
    with pytest.raises(ConfigError, match="drop_path"):
        profile_dist("dist-tiny", frames=4, drop_path=0.1)


@pytest.mark.parametrize("k", [16, 48])
def test_pca_k_counts_the_folded_branch_per_view_and_the_fold_per_step(k):
    """On codes, FC_l reads K numbers per token instead of C, and the class-token Linear K instead of C per view;
    the fold itself (W B^T and W mu + b, every FC_l and the head's Linear) is paid once per step."""
    result = profile_dist("dist-tiny", frames=4, pca_k=k, alpha_dim=32, beta_dim=16)
    pca, cfg = result["pca"], result["config"]
    L, T, C, alpha = len(cfg["layers"]), 4, cfg["width"], 32
    tokens = 1 + (cfg["image_size"] // cfg["patch_size"]) ** 2
    saved = (L * T * tokens + 1) * (C - k) * alpha
    assert round((pca["branch_gflops_tokens"] - pca["branch_gflops_codes"]) * 1e9) == saved
    assert round(pca["fold_gflops_per_step"] * 1e9) == (L + 1) * (alpha * C * k + alpha * C)
    assert "projection folded" in format_profile(result)
    with pytest.raises(ConfigError, match="pca-k"):
        profile_dist("dist-tiny", frames=4, pca_k=C + 1)
