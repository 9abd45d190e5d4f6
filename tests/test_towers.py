"""Every tower family, from stage one to stage two: CLIP (ViT-L/14's structure), SigLIP, ViT-SO400M/14 at 384 px,
EVA02 and DINOv2 with registers (a timm ViT by name), each a tiny build of its own config with random weights.

For each: the store's tokens equal an independent forward of the same tower (hooks on its blocks during its plain
`forward`) on the frames the store recorded; the store says which token is which; DiST learns the demo's motion
task from its tokens. Then what differs between families: the summary-token rule, zero-shot scoring, offline tags.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dist_cache.backbone import load_backbone, load_recorded_backbone
from dist_cache.errors import UserError
from dist_cache.model import DiSTSwitches
from dist_cache.model.tokens import TokenLayout, branch_tokens
from dist_cache.transforms import normalize_frames
from pipelines.extract.extractor import ExtractOptions, extract
from pipelines.info import format_info, store_info
from pipelines.train.evaluation import EvalOptions, evaluate, format_report, view_scores
from pipelines.train.run import TrainOptions, train
from storage import FeatureStore
from storage.schema import SchemaError, StoreSchema
from tower_families import FAMILIES, block_outputs

ROOT = Path(__file__).resolve().parent.parent
SMALL = dict(switches=DiSTSwitches(alpha_dim=32, beta_dim=16, pool_blocks=1), batch_size=4, decode_workers=0,
             warmup_epochs=1, log_every=1)


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """family -> (config file, random-weight checkpoint, backbone loaded from that checkpoint)."""
    root = tmp_path_factory.mktemp("towers")
    out = {}
    for name, family in FAMILIES.items():
        config = family.config_file(root)
        torch.manual_seed(0)
        random = load_backbone(str(config), "none", allow_random_weights=True)
        checkpoint = root / f"{name}.pt"
        torch.save(random.model.state_dict(), checkpoint)
        out[name] = (config, checkpoint, load_backbone(str(config), str(checkpoint)))
    return out


@pytest.fixture(scope="module")
def stores(tmp_path_factory, towers, motion_dataset):
    """family -> a test-split store of 4 videos (one per class) x 1 view x 2 frames, dense frames at gamma 2."""
    root = tmp_path_factory.mktemp("tower-stores")
    manifest = root / "four.csv"
    manifest.write_text("path,label\nleft/0.mp4,left\nright/0.mp4,right\nup/0.mp4,up\ndown/0.mp4,down\n")
    out = {}
    for name, (config, checkpoint, _) in towers.items():
        extract(ExtractOptions(manifest=str(manifest), video_root=str(motion_dataset / "videos"),
                               out=str(root / f"{name}.zarr"), model=str(config), pretrained=str(checkpoint),
                               frames=2, views=1, split="test", dense_frames=True, dense_gamma=2, decode_workers=1,
                               device="cpu"), progress=False)
        out[name] = str(root / f"{name}.zarr")
    return out


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_tower_is_recorded_as_its_family(towers, name):
    family = FAMILIES[name]
    record = towers[name][2].describe()
    assert tuple(record["prefix_tokens"]) == family.prefix
    assert record["grid"] == [family.grid, family.grid]
    assert (record["patch_size"], record["image_size"]) == (family.patch, family.image)
    assert record["activation"] == family.activation and record["norm"] == "layernorm"
    assert record["text_tower"] == (family.scoring is not None)
    assert (record["scoring"] or {}).get("kind") == family.scoring
    if family.scoring == "sigmoid":  # SigLIP's learned bias (its config initialises it at -10)
        assert record["scoring"]["bias"] == -10.0


@pytest.mark.parametrize("name", list(FAMILIES))
def test_stored_tokens_are_the_towers_on_the_recorded_frames(towers, stores, name):
    backbone = towers[name][2]
    store = FeatureStore.open(stores[name])
    schema = store.schema
    # The store describes itself: which token is which, at which geometry, normalisation and activation.
    layout = TokenLayout.of_record(schema.backbone)
    assert layout == backbone.spatial_encoder([0]).layout
    assert schema.tokens == layout.num_tokens == len(FAMILIES[name].prefix) + FAMILIES[name].grid ** 2
    assert schema.backbone["mean"] == list(backbone.mean) and schema.backbone["std"] == list(backbone.std)
    assert schema.backbone["activation"] == FAMILIES[name].activation
    # An independent forward: the tower's plain forward, its blocks' outputs caught by hooks, on the frames CLIP saw
    # (the stored dense frames' every gamma-th).
    for i in range(len(store)):
        images = normalize_frames(torch.from_numpy(store.frames(i)[::2]), backbone.mean, backbone.std)
        expected = block_outputs(backbone.model.visual, images, list(schema.layers))
        stored = torch.from_numpy(store.features(i)).float()
        assert stored.shape == expected.shape
        torch.testing.assert_close(stored, expected, rtol=2e-3, atol=2e-3)  # fp16 storage
    text = format_info(store_info(stores[name]))
    assert f"{FAMILIES[name].grid}x{FAMILIES[name].grid} patches row-major" in text
    assert "per view" in text and "DiST's summary token" in text


@pytest.mark.parametrize("name", ["siglip", "eva02", "dinov2-reg4"])
def test_verify_rebuilds_each_tower_and_recomputes_its_samples(towers, stores, motion_dataset, name):
    from pipelines.verify import verify_store

    report = verify_store(stores[name], video_root=str(motion_dataset / "videos"), samples=2,
                          pretrained=str(towers[name][1]), device="cpu")
    assert report.ok, report.problems
    assert len(report.checked_samples) == 2


def test_a_timm_tag_loads_from_the_hub_cache_and_resamples_to_the_built_size(towers, tmp_path, monkeypatch):
    """`--pretrained lvd142m` for DINOv2: timm's hub file, in timm's key names, found in the cache without asking the
    network; at another image size its position embeddings go through timm's own checkpoint filter."""
    import json

    from huggingface_hub import constants
    from safetensors.torch import save_file

    import dist_cache.weights as weights
    from tower_families import SHRINK

    config, _, backbone = towers["dinov2-reg4"]
    snapshot = tmp_path / "hub" / "models--timm--vit_base_patch14_reg4_dinov2.lvd142m" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    save_file({k.removeprefix("visual.trunk."): v.contiguous() for k, v in backbone.model.state_dict().items()},
              snapshot / "model.safetensors")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_unreachable", lambda url: pytest.fail("the network was probed"))
    tagged = load_backbone(str(config), "lvd142m")
    assert tagged.weights_sha256 == backbone.weights_sha256 and tagged.pretrained == "lvd142m"
    larger = tmp_path / "dinov2-70.json"
    larger.write_text(json.dumps({"timm_model_name": "vit_base_patch14_reg4_dinov2",
                                  "timm_model_kwargs": {**SHRINK, "img_size": 70}}))
    resampled = load_backbone(str(larger), "lvd142m")
    assert resampled.describe()["grid"] == [5, 5] and resampled.num_tokens == 5 + 25
    with pytest.raises(UserError, match="not a known tag"):
        load_backbone(str(config), "webli")


def test_the_summary_token_rule():
    features = torch.randn(3, 2, 5 + 16, 8)  # class, 4 registers, 4x4 patches
    with_registers = TokenLayout(("class",) + ("register",) * 4, (4, 4))
    taken = branch_tokens(features, with_registers)
    assert torch.equal(taken, torch.cat([features[..., :1, :], features[..., 5:, :]], dim=-2))  # registers dropped
    no_class = TokenLayout((), (4, 4))
    taken = branch_tokens(features[..., 5:, :], no_class)
    torch.testing.assert_close(taken[..., 0, :], features[..., 5:, :].mean(dim=-2))  # the patches' mean
    assert torch.equal(taken[..., 1:, :], features[..., 5:, :])
    clip = TokenLayout(("class",), (4, 4))
    assert branch_tokens(features[..., 4:, :], clip) is not None
    assert branch_tokens(features[..., 4:, :], clip).data_ptr() == features[..., 4:, :].data_ptr()  # no copy
    with pytest.raises(ValueError, match="expected 21 tokens"):
        branch_tokens(features[..., 1:, :], with_registers)


# CLIP's learning is tests/test_model_learning.py's (dist-tiny); patch 14 is the SO400M and DINOv2 towers' here.
@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "clip-l14"])
def test_dist_learns_the_demo_task_from_each_tower(towers, name):
    from test_model_learning import direction_videos, normalise, train_and_evaluate

    backbone = towers[name][2]
    gen = torch.Generator().manual_seed(13)
    size = FAMILIES[name].image

    def at_size(videos: torch.Tensor) -> torch.Tensor:
        return F.interpolate(videos.flatten(0, 1), size=(size, size), mode="bilinear").unflatten(0, videos.shape[:2])

    train_set, test_set = direction_videos(64, gen), direction_videos(64, gen)
    data = ((normalise(at_size(train_set[0]), backbone), train_set[1]),
            (normalise(at_size(test_set[0]), backbone), test_set[1]))
    assert train_and_evaluate(backbone, data, max_steps=100) >= 0.9


def test_training_and_eval_on_towers_without_class_token_or_text(towers, stores, motion_dataset, tmp_path):
    """SigLIP (the summary is the patches' mean) and DINOv2 (registers dropped; fixed class embeddings): cached and
    online runs take the same first step, so both form the branch's tokens by the one rule."""
    for name in ("siglip", "dinov2-reg4"):
        store = FeatureStore.open(stores[name])
        if name == "dinov2-reg4":  # no text side: fixed orthonormal class embeddings, said so
            embeddings = store.text_features
            np.testing.assert_allclose(embeddings @ embeddings.T, np.eye(4), atol=1e-5)
            assert "no text side" in store.schema.text["source"]
        losses = {}
        for mode in ("cached", "online"):
            result = train(TrainOptions(cache=stores[name], out=str(tmp_path / f"{name}-{mode}"), epochs=1,
                                        online=mode == "online", pretrained=str(towers[name][1]), device="cpu",
                                        **SMALL), progress=False)
            from pipelines.train.plots import read_metrics

            losses[mode] = [r["loss"] for r in read_metrics(result.metrics) if r["kind"] == "train"]
        assert losses["online"][0] == pytest.approx(losses["cached"][0], rel=1e-3)
        report = evaluate(EvalOptions(checkpoint=str(result.last), cache=stores[name]), progress=False)
        assert report["videos"] == 4
    classes = tmp_path / "classes.txt"
    classes.write_text("left\nright\nup\ndown\nspin\n")
    with pytest.raises(UserError, match="has no text side") as info:
        evaluate(EvalOptions(checkpoint=str(result.last), cache=stores["dinov2-reg4"], classes=str(classes),
                             pretrained=str(towers["dinov2-reg4"][1])), progress=False)
    assert "\n" not in str(info.value)


def test_zero_shot_uses_siglips_sigmoid_scoring(towers, stores, tmp_path):
    run = train(TrainOptions(cache=stores["siglip"], out=str(tmp_path / "run"), epochs=1, **SMALL), progress=False)
    classes = tmp_path / "classes.txt"
    classes.write_text("spin\nleft\nright\nup\ndown\n")
    report = evaluate(EvalOptions(checkpoint=str(run.last), cache=stores["siglip"], classes=str(classes),
                                  pretrained=str(towers["siglip"][1])), progress=False)
    assert report["scoring"].startswith("sigmoid(scale 14.29 * cosine + bias -10)")
    assert "zero-shot scoring: sigmoid" in format_report(report)
    # The store's own classes score with the branch's softmax, as it was trained.
    assert evaluate(EvalOptions(checkpoint=str(run.last), cache=stores["siglip"]),
                    progress=False)["scoring"].startswith("softmax")


def test_sigmoid_view_scores_are_summed_as_log_probabilities():
    # SigLIP at its real scale and bias: two good classes whose sigmoids both round to 1.0 in float64. Summed
    # probabilities would tie them; summed log-probabilities keep them apart, and order them as the cosines do.
    logits = 100 * torch.tensor([[0.50, 0.45, 0.0]])
    scoring = {"kind": "sigmoid", "scale": 117.3, "bias": -12.9}
    assert torch.sigmoid(117.3 * logits / 100 - 12.9).double()[0, 0] == torch.sigmoid(
        117.3 * logits / 100 - 12.9).double()[0, 1] == 1.0
    scores = view_scores(logits, 100.0, scoring)
    assert scores[0, 0] > scores[0, 1] > scores[0, 2]
    softmax = view_scores(logits, 100.0, {"kind": "softmax"})
    torch.testing.assert_close(softmax.sum(dim=-1), torch.ones(1))


def test_a_store_whose_tokens_contradict_its_layout_is_refused(stores):
    schema = FeatureStore.open(stores["dinov2-reg4"]).schema.to_json()
    schema["backbone"]["prefix_tokens"] = ["class"]  # 4 registers fewer than the stored tokens
    with pytest.raises(SchemaError, match="tokens must be len"):
        StoreSchema.from_json(schema)
    schema["backbone"]["prefix_tokens"] = ["class", "cls"]
    with pytest.raises(SchemaError, match="prefix_tokens"):
        StoreSchema.from_json(schema)


def test_a_recorded_timm_tower_is_rebuilt_and_refuses_file_loading_kwargs(towers, stores):
    record = FeatureStore.open(stores["dinov2-reg4"]).schema.backbone
    backbone = load_recorded_backbone(record, pretrained=str(towers["dinov2-reg4"][1]))
    assert backbone.weights_sha256 == record["weights_sha256"] and not backbone.has_text
    hostile = {**record, "model_config": {**record["model_config"], "timm_model_kwargs": {
        "checkpoint_path": "/etc/shadow"}}}
    with pytest.raises(UserError, match="checkpoint_path"):
        load_recorded_backbone(hostile, pretrained=str(towers["dinov2-reg4"][1]))
    with pytest.raises(UserError, match="is not what"):
        load_recorded_backbone({**record, "activation": "quick_gelu"}, pretrained=str(towers["dinov2-reg4"][1]))


@pytest.mark.parametrize("args, what", [
    (["--model", "ViT-B-16-SigLIP", "--pretrained", "webli"], "not in the local cache"),
    (["--model", "timm:vit_base_patch14_reg4_dinov2", "--pretrained", "lvd142m"], "not in the local cache"),
    (["--model", "convnext_base", "--pretrained", "none", "--allow-random-weights"], "needs a ViT visual tower"),
])
def test_a_tag_that_needs_a_download_fails_offline_in_seconds(tmp_path, motion_dataset, args, what):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dist-cache"), "extract", "--manifest", str(motion_dataset / "val.csv"),
         "--video-root", str(motion_dataset / "videos"), "--out", str(tmp_path / "x.zarr"), *args],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and what in result.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_a_hub_tokenizer_not_cached_is_one_line_offline(tmp_path, monkeypatch):
    import open_clip

    from dist_cache.weights import text_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    config = open_clip.get_model_config("ViT-B-16-SigLIP")
    with pytest.raises(UserError, match="timm/ViT-B-16-SigLIP") as info:
        text_tokenizer(open_clip, "ViT-B-16-SigLIP", config)
    assert "\n" not in str(info.value)


def test_profile_for_each_family():
    from dist_cache.flops import profile_dist

    expected = {  # tower, its frozen parameters, its grid (the temporal stem's)
        "ViT-B-16-SigLIP": (92_884_224, 14), "ViT-SO400M-14-SigLIP-384": (428_225_600, 27),
        "EVA02-B-16": (86_263_040, 14), "timm:vit_base_patch14_reg4_dinov2": (86_582_016, 37),
    }
    for model, (params, grid) in expected.items():
        r = profile_dist(model, frames=8)
        assert r["params"]["clip_visual_frozen"] == params, model
        assert r["config"]["image_size"] // r["config"]["patch_size"] == grid
        assert r["gflops"] > r["gflops_by_part"]["clip"] > 0 and r["paper_gflops"] is None


def test_vit_l14_still_matches_the_papers_table():
    from dist_cache.flops import profile_dist

    r = profile_dist("ViT-L-14", frames=8)
    assert r["paper_gflops"] == 710.0 and abs(r["paper_rel_diff"]) < 0.01  # Tab. 4: 0.71 TFLOPs per view
    assert r["params"]["total"] / 1e6 == pytest.approx(336, abs=0.5)  # Tab. 4: 336 M


def test_floor_grid_mixing_stays_on_the_covered_pixels():
    from dist_cache.mixing import Mixer

    mixer = Mixer(0.0, 1.0, image_size=60, seed=0, patch=14)
    for step in range(20):
        mix = mixer.draw(step)
        assert mix.grid == 4 and max(mix.box) <= 56


def test_readme_lists_the_families():
    readme = (ROOT / "README.md").read_text()
    for family in ("SigLIP", "EVA02", "ViT-SO400M", "DINOv2", "timm:"):
        assert family in readme
