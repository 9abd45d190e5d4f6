"""Training recipes: everything the reference implementation's configs set, for Kinetics-400 and Something-Something v2.

The reference's K400 configs inherit its SSv2 base and change, of the model, only the number of AdaPooling
blocks: 4 for K400 (ViT-B/16: 112 M parameters, paper Tab. 6), 2 for SSv2 (105 M). Its optimisation is the same for
both (docs/MODEL.md; /work/shared's reference digest, §5): 36 epochs with 6 of linear warm-up, then a per-iteration
cosine, peak lr 3.2e-5 x 10, AdamW with weight decay 1e-4 on weights, a global batch of 32, label smoothing 0.1,
and no gradient clipping (its training loop is zero_grad, backward, step). The other per-dataset difference is an
extraction matter, the horizontal flip of the training views:
- K400 flips with p = 0.5 (`extract --flip-p 0.5`, the default);
- SSv2 classes name directions, so a flipped view gets the mirrored class: the reference swaps the labels of
  three pairs (`extract --flip-label-map ssv2`). A store flipped without the swap teaches "left" with
  right-moving pixels: `train --recipe ssv2` refuses it.

`train --recipe k400|ssv2` starts from a recipe's switches and options; flags given explicitly override them, and
the recipe line names each setting that deviates from the reference (a flag, the training store's sampling, or what
caching changes). Without a recipe, the switches are DiSTSwitches' defaults (the SSv2 head) and the options the
command's defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dist_cache.errors import UserError
from dist_cache.model.switches import DiSTSwitches

# The SSv2 classes whose mirror image is another class (labels.json indices 86/87, 93/94, 166/167), by name as
# dist-cache reads them from the SSv2 templates ("[something]" -> "something"). Canonical, as
# dist_cache.manifests.load_flip_label_map returns a file's pairs (each pair and the list sorted), so a store
# extracted with `--flip-label-map ssv2` and one extracted with the same pairs from a file agree.
SSV2_FLIP_PAIRS = (
    ("Pulling something from left to right", "Pulling something from right to left"),
    ("Pushing something from left to right", "Pushing something from right to left"),
    ("Turning the camera left while filming something", "Turning the camera right while filming something"),
)
# `extract --flip-label-map NAME`: the built-in maps.
FLIP_LABEL_MAPS = {"ssv2": SSV2_FLIP_PAIRS}

# What the reference sets for training, as `train` options (the same for K400 and SSv2). The warm-up starts at
# 8e-7 (WARMUP_START_LR 8e-8 x 10), TrainOptions' default, which no flag changes.
REFERENCE_OPTIONS: dict[str, Any] = {
    "epochs": 36, "warmup_epochs": 6.0, "lr": 3.2e-4, "weight_decay": 1e-4, "batch_size": 32,
    "label_smoothing": 0.1, "clip_grad": 0.0,
}
# The reference's training views (extraction's --scale, ratio, --grayscale-p), and its pixel mixing (mixup, cutmix).
REFERENCE_SAMPLING: dict[str, Any] = {"scale": (0.4, 1.0), "ratio": (3 / 4, 4 / 3), "grayscale_p": 0.2}
REFERENCE_MIXING = (0.8, 1.0)


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str
    switches: dict[str, Any]  # DiSTSwitches fields this recipe sets (the others: the defaults, the reference's)
    flip_p: float  # training views' flip probability at extraction
    # class pairs a flip swaps (extract --flip-label-map)
    flip_label_map: tuple[tuple[str, str], ...] = field(default=())
    options: dict[str, Any] = field(default_factory=lambda: dict(REFERENCE_OPTIONS))  # train options it sets


RECIPES = {
    "k400": Recipe("k400", "Kinetics-400", {"pool_blocks": 4}, flip_p=0.5),
    "ssv2": Recipe("ssv2", "Something-Something v2", {"pool_blocks": 2}, flip_p=0.5, flip_label_map=SSV2_FLIP_PAIRS),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"--recipe {name!r} is unknown; use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Settings:
    """A run's switches and options after its recipe, and what the recipe line says about them."""

    switches: DiSTSwitches
    options: dict[str, Any]
    recipe: str | None
    kept: tuple[str, ...]  # the recipe's settings the run uses, "name value"
    deviations: tuple[str, ...]  # flags that override the reference, "name value (flag; reference v)"

    def line(self, more: Sequence[str] = ()) -> str:
        """The one line train prints: the recipe's settings, then every deviation from the reference (`more`: those
        found in the training store or the training method)."""
        if self.recipe is None:
            return f"recipe: none (defaults: the SSv2 head, {self.switches.pool_blocks} AdaPooling blocks)"
        chosen = get_recipe(self.recipe)
        deviations = [*self.deviations, *more]
        text = f"recipe: {self.recipe} ({chosen.dataset}): " + ", ".join(self.kept)
        return text + ("; deviations from the reference: " + "; ".join(deviations) if deviations else "")


def effective_settings(recipe: str | None, explicit_switches: Mapping[str, Any], options: Mapping[str, Any],
                       explicit_options: Sequence[str] = ()) -> Settings:
    """The switches and options a run uses: the defaults, then the recipe's settings, then the explicit ones (what
    the user typed or put in a config file). `options` holds every option's value, defaults included;
    `explicit_options` names those the user gave."""
    if recipe is None:
        return Settings(DiSTSwitches().replace(**explicit_switches), dict(options), None, (), ())
    chosen = get_recipe(recipe)
    switches = DiSTSwitches().replace(**{**chosen.switches, **explicit_switches})
    resolved = {**options, **{k: v for k, v in chosen.options.items() if k not in explicit_options}}
    # The reference's value of every setting the recipe or the user names: the recipe's, else the default switch.
    reference = {**{k: getattr(DiSTSwitches(), k) for k in explicit_switches}, **chosen.switches, **chosen.options}
    effective = {**{k: getattr(switches, k) for k in dict.fromkeys([*chosen.switches, *explicit_switches])},
                 **{k: resolved[k] for k in chosen.options}}
    kept = [f"{k} {_text(v)}" for k, v in effective.items() if v == reference[k]]
    typed = {*explicit_switches, *(k for k in explicit_options if k in chosen.options)}
    deviations = [f"{k} {_text(effective[k])} (flag, reference {_text(reference[k])})"
                  for k in effective if k in typed and effective[k] != reference[k]]
    return Settings(switches, resolved, recipe, tuple(kept), tuple(deviations))


def method_deviations(*, online: bool, reaugment: bool, mixup: float | None, cutmix: float | None,
                      feature_mixup: float, feature_cutmix: float) -> list[str]:
    """What the training method changes against the reference, which draws a fresh view of every video every
    epoch and mixes its pixels (mixup 0.8 / cutmix 1.0) before CLIP."""
    out = []
    if not reaugment:
        out.append("the store's fixed views, not a fresh view each epoch (--online --reaugment draws them)")
    if online and reaugment:
        mixing = (REFERENCE_MIXING[0] if mixup is None else mixup, REFERENCE_MIXING[1] if cutmix is None else cutmix)
        if mixing != REFERENCE_MIXING:
            out.append(f"pixel mixup {_text(mixing[0])} / cutmix {_text(mixing[1])} (reference 0.8 / 1.0)")
    elif online and (mixup or cutmix):
        out.append(f"pixel mixup {_text(mixup or 0.0)} / cutmix {_text(cutmix or 0.0)} on fixed views "
                   "(reference 0.8 / 1.0 on fresh views)")
    else:
        instead = (f" (feature mixup {_text(feature_mixup)} / cutmix {_text(feature_cutmix)} instead)"
                   if feature_mixup or feature_cutmix else "")
        out.append(f"no pixel mixup 0.8 / cutmix 1.0{instead}")
    return out


def check_training_store(recipe: str | None, sampling: Mapping[str, Any], split: str, url: str) -> list[str]:
    """The training store's views against the recipe's: a one-line UserError for an SSv2 store whose flipped views
    kept their labels (they would train "left" on right-moving pixels), else the deviations, for the recipe line."""
    if recipe is None:
        return []
    chosen = get_recipe(recipe)
    if split != "train":
        return [f"training store {url} holds test-split views (centre crops, no flip or grayscale)"]
    flip_p = float(sampling.get("flip_p", 0.0))
    pairs = {frozenset(p) for p in sampling.get("flip_label_map") or ()}
    if chosen.flip_label_map and flip_p > 0 and not pairs:
        raise UserError(
            f"--cache {url} was extracted with flips (flip_p {flip_p:g}) but no flip label map, so its flipped "
            f"{chosen.dataset} views keep the label of the unflipped direction: re-extract it with "
            f"--flip-label-map {recipe} (or --flip-p 0)")
    out = []
    if flip_p != chosen.flip_p:
        out.append(f"store flip_p {flip_p:g} (reference {chosen.flip_p:g})")
    wanted = {frozenset(p) for p in chosen.flip_label_map}
    if flip_p > 0 and pairs != wanted:
        out.append(f"store flip label map of {len(pairs)} pairs (reference: "
                   + (f"the {len(wanted)} {chosen.dataset} pairs)" if wanted else "none)"))
    for key, expected in REFERENCE_SAMPLING.items():
        value = sampling.get(key)
        if value is None:
            continue
        same = (all(abs(a - b) < 1e-6 for a, b in zip(value, expected)) if isinstance(expected, tuple)
                else abs(float(value) - expected) < 1e-9)
        if not same:
            shown = ",".join(_text(float(v)) for v in value) if isinstance(expected, tuple) else _text(float(value))
            ref = ",".join(f"{v:.3g}" for v in expected) if isinstance(expected, tuple) else _text(expected)
            out.append(f"store {key} {shown} (reference {ref})")
    return out
