"""Recipes: everything the reference sets, as presets that explicit flags override, with every deviation named; SSv2's
label-swapping flips selected by name, and SSv2 training refused on a store flipped without them."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

import cli
from dist_cache.errors import UserError
from dist_cache.manifests import load_flip_label_map
from dist_cache.model import DiSTSwitches
from dist_cache.recipes import (
    FLIP_LABEL_MAPS,
    RECIPES,
    REFERENCE_OPTIONS,
    SSV2_FLIP_PAIRS,
    check_training_store,
    effective_settings,
    get_recipe,
    method_deviations,
)
from pipelines.train.checkpoint import load_checkpoint
from storage import FeatureStore

DEFAULTS = {"epochs": 30, "warmup_epochs": 5.0, "lr": 3.2e-4, "weight_decay": 1e-4, "batch_size": 32,
            "label_smoothing": 0.1, "clip_grad": 1.0}  # train's option defaults
REFERENCE_VIEWS = {"flip_p": 0.5, "scale": [0.4, 1.0], "ratio": [3 / 4, 4 / 3], "grayscale_p": 0.2}


def test_no_recipe_is_the_defaults_which_are_the_ssv2_head():
    settings = effective_settings(None, {}, DEFAULTS)
    assert settings.switches == DiSTSwitches() and settings.options == DEFAULTS
    assert settings.switches.pool_blocks == RECIPES["ssv2"].switches["pool_blocks"] == 2
    assert settings.line().startswith("recipe: none")


def test_a_recipe_sets_everything_the_reference_sets():
    settings = effective_settings("k400", {}, DEFAULTS)
    assert settings.switches == DiSTSwitches(pool_blocks=4)
    assert settings.options == REFERENCE_OPTIONS
    assert (settings.options["epochs"], settings.options["warmup_epochs"], settings.options["clip_grad"]) == (36, 6, 0)
    assert settings.line() == ("recipe: k400 (Kinetics-400): pool_blocks 4, epochs 36, warmup_epochs 6, lr 0.00032, "
                               "weight_decay 0.0001, batch_size 32, label_smoothing 0.1, clip_grad 0")


def test_explicit_flags_win_and_each_deviation_is_named():
    settings = effective_settings("k400", {"pool_blocks": 3, "gamma": 4, "alpha_dim": 384},
                                  {**DEFAULTS, "epochs": 10}, ["epochs"])
    assert (settings.switches.pool_blocks, settings.switches.gamma) == (3, 4)
    assert settings.options["epochs"] == 10 and settings.options["warmup_epochs"] == 6.0
    line = settings.line(["no pixel mixup 0.8 / cutmix 1.0"])
    assert "\n" not in line and "alpha_dim 384" in line.split("; deviations")[0]  # typed, but the reference's value
    deviations = line.split("; deviations from the reference: ")[1].split("; ")
    assert deviations == ["pool_blocks 3 (flag, reference 4)", "gamma 4 (flag, reference 2)",
                          "epochs 10 (flag, reference 36)", "no pixel mixup 0.8 / cutmix 1.0"]


def test_the_training_method_names_what_it_changes():
    cached = method_deviations(online=False, reaugment=False, mixup=None, cutmix=None, feature_mixup=0.8,
                               feature_cutmix=1.0)
    assert cached == ["the store's fixed views, not a fresh view each epoch (--online --reaugment draws them)",
                      "no pixel mixup 0.8 / cutmix 1.0 (feature mixup 0.8 / cutmix 1 instead)"]
    assert method_deviations(online=True, reaugment=True, mixup=None, cutmix=None, feature_mixup=0,
                             feature_cutmix=0) == []  # what the reference does
    assert method_deviations(online=True, reaugment=True, mixup=0, cutmix=0, feature_mixup=0, feature_cutmix=0) == [
        "pixel mixup 0 / cutmix 0 (reference 0.8 / 1.0)"]


def test_the_training_stores_views_are_checked_against_the_recipe():
    ssv2 = {**REFERENCE_VIEWS, "flip_label_map": [list(p) for p in SSV2_FLIP_PAIRS]}
    assert check_training_store("ssv2", ssv2, "train", "s.zarr") == []
    assert check_training_store("k400", {**REFERENCE_VIEWS, "flip_label_map": None}, "train", "k.zarr") == []
    assert check_training_store("ssv2", {**REFERENCE_VIEWS, "flip_p": 0.0, "flip_label_map": None}, "train",
                                "s.zarr") == ["store flip_p 0 (reference 0.5)"]
    assert check_training_store("k400", {**REFERENCE_VIEWS, "scale": [0.8, 1.0], "flip_label_map": None}, "train",
                                "k.zarr") == ["store scale 0.8,1 (reference 0.4,1)"]
    with pytest.raises(UserError, match=r"--cache s.zarr was extracted with flips \(flip_p 0.5\) but no flip label "
                                        r"map.*re-extract it with --flip-label-map ssv2 \(or --flip-p 0\)"):
        check_training_store("ssv2", {**REFERENCE_VIEWS, "flip_label_map": None}, "train", "s.zarr")
    assert check_training_store(None, {**REFERENCE_VIEWS, "flip_label_map": None}, "train", "s.zarr") == []


def test_recipes_differ_only_where_the_reference_does():
    k400, ssv2 = get_recipe("k400"), get_recipe("ssv2")
    assert set(k400.switches) == set(ssv2.switches) == {"pool_blocks"}
    assert k400.options == ssv2.options == REFERENCE_OPTIONS
    assert k400.flip_p == ssv2.flip_p == 0.5
    assert k400.flip_label_map == () and ssv2.flip_label_map == SSV2_FLIP_PAIRS == FLIP_LABEL_MAPS["ssv2"]
    names = [name for pair in SSV2_FLIP_PAIRS for name in pair]
    assert len(set(names)) == 6 and all("left" in a and "right" in b for a, b in SSV2_FLIP_PAIRS)
    with pytest.raises(UserError, match="unknown"):
        get_recipe("hmdb")


def test_the_builtin_ssv2_map_is_the_canonical_form_of_the_same_pairs_in_a_file(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps([[b, a] for a, b in reversed(SSV2_FLIP_PAIRS)]))
    assert load_flip_label_map(path) == SSV2_FLIP_PAIRS


SSV2_NAMES = [name for pair in SSV2_FLIP_PAIRS for name in pair]
SMALL = ["--no-temporal", "--no-integ-to-temp", "--no-temp-to-integ", "--alpha-dim", "32", "--beta-dim", "16",
         "--batch-size", "2", "--epochs", "1", "--device", "cpu", "--read-threads", "2"]


def _ssv2_like(motion_dataset, tmp_path):
    """The motion clips labelled with SSv2's mirrored class names (left/right pushing, then two more pairs)."""
    (tmp_path / "classes.txt").write_text("\n".join(SSV2_NAMES) + "\n")
    rows = ["left/0.mp4,Pushing something from right to left", "right/0.mp4,Pushing something from left to right",
            "left/1.mp4,Pulling something from right to left", "right/1.mp4,Pulling something from left to right"]
    (tmp_path / "ssv2.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    return ["--manifest", tmp_path / "ssv2.csv", "--classes", tmp_path / "classes.txt", "--video-root",
            motion_dataset / "videos", "--model", "dist-tiny", "--frames", "4", "--decode-workers", "1",
            "--device", "cpu", "--views", "2", "--seed", "1"]


def _run(*args) -> tuple[int, str]:
    result = CliRunner().invoke(cli.main, [str(a) for a in args])
    return result.exit_code, result.output


def test_ssv2_flips_by_name_and_training_refuses_a_store_flipped_without_them(motion_dataset, tiny_checkpoint,
                                                                             tmp_path):
    extract = ["extract", *_ssv2_like(motion_dataset, tmp_path), "--pretrained", tiny_checkpoint]
    code, output = _run(*extract, "--out", tmp_path / "swap.zarr", "--flip-label-map", "ssv2")
    assert code == 0, output
    store = FeatureStore.open(tmp_path / "swap.zarr")
    assert store.schema.sampling["flip_label_map"] == [list(p) for p in SSV2_FLIP_PAIRS]
    labelled = dict(row.split(",") for row in (tmp_path / "ssv2.csv").read_text().splitlines()[1:])
    partner = {a: b for pair in SSV2_FLIP_PAIRS for a, b in (pair, pair[::-1])}
    samples = [store.sample(i) for i in range(len(store))]
    assert any(s["flip"] for s in samples) and not all(s["flip"] for s in samples)
    for s in samples:  # a flipped view of "... from right to left" is "... from left to right"
        own = labelled[s["video"]]
        assert s["label_name"] == (partner[own] if s["flip"] else own)
    # The same pairs from a file are the same store: the rerun resumes instead of being refused.
    (tmp_path / "pairs.json").write_text(json.dumps([list(p) for p in SSV2_FLIP_PAIRS]))
    code, output = _run(*extract, "--out", tmp_path / "swap.zarr", "--flip-label-map", tmp_path / "pairs.json")
    assert code == 0 and "skipped 4 (already done)" in output, output

    code, output = _run(*extract, "--out", tmp_path / "plain.zarr")  # flips (p 0.5), labels left as they were
    assert code == 0, output
    code, output = _run("train", "--cache", tmp_path / "plain.zarr", "--out", tmp_path / "refused", "--recipe",
                        "ssv2", *SMALL)
    assert code == 2 and output.strip().splitlines() == [output.strip()], output
    assert output.startswith(f"error: --cache {tmp_path / 'plain.zarr'} was extracted with flips (flip_p 0.5) but "
                             "no flip label map") and "--flip-label-map ssv2" in output
    assert not (tmp_path / "refused").exists()

    code, output = _run("train", "--cache", tmp_path / "swap.zarr", "--out", tmp_path / "run", "--recipe", "ssv2",
                        *SMALL)
    assert code == 0, output
    line = next(line for line in output.splitlines() if line.startswith("recipe: ssv2"))
    assert "pool_blocks 2, warmup_epochs 6, lr 0.00032" in line and "clip_grad 0" in line
    assert "epochs 1 (flag, reference 36)" in line and "batch_size 2 (flag, reference 32)" in line
    assert "no pixel mixup 0.8 / cutmix 1.0" in line and "store flip" not in line  # the reference's views
    config = load_checkpoint(tmp_path / "run" / "last.pt")["train_config"]
    assert (config["recipe"], config["clip_grad"], config["warmup_epochs"], config["epochs"]) == ("ssv2", 0.0, 6.0, 1)
