"""Training recipes: what the reference implementation sets differently for Kinetics-400 and Something-Something v2.

The reference's K400 configs inherit its SSv2 base and change, of the model, only the number of AdaPooling
blocks: 4 for K400 (ViT-B/16: 112 M parameters, paper Tab. 6), 2 for SSv2 (105 M). The other difference is an
extraction matter, the horizontal flip of the training views:
- K400 flips with p = 0.5 (`extract --flip-p 0.5`, the default);
- SSv2 classes name directions, so a flipped view gets the mirrored class: the reference swaps the labels of
  three pairs (`extract --flip-label-map`, the pairs below). Flipping SSv2 without the swap teaches "left" with
  right-moving pixels; without a label map, use `--flip-p 0`.
Everything else (optimiser, schedule, sampling, crops, grayscale, test views) is the same for both.

`train --recipe k400|ssv2` starts from a recipe's switches; flags given explicitly override it. Without a
recipe, the switches are DiSTSwitches' defaults, which are the SSv2 head (2 AdaPooling blocks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dist_cache.errors import UserError
from dist_cache.model.switches import DiSTSwitches

# The SSv2 classes whose mirror image is another class (labels.json indices 86/87, 93/94, 166/167), by name as
# dist-cache reads them from the SSv2 templates ("[something]" -> "something").
SSV2_FLIP_PAIRS = (
    ("Pulling something from left to right", "Pulling something from right to left"),
    ("Pushing something from left to right", "Pushing something from right to left"),
    ("Turning the camera left while filming something", "Turning the camera right while filming something"),
)


@dataclass(frozen=True)
class Recipe:
    name: str
    dataset: str
    switches: dict[str, Any]  # DiSTSwitches fields this recipe sets
    flip_p: float  # training views' flip probability at extraction
    # class pairs a flip swaps (extract --flip-label-map)
    flip_label_map: tuple[tuple[str, str], ...] = field(default=())


RECIPES = {
    "k400": Recipe("k400", "Kinetics-400", {"pool_blocks": 4}, flip_p=0.5),
    "ssv2": Recipe("ssv2", "Something-Something v2", {"pool_blocks": 2}, flip_p=0.5, flip_label_map=SSV2_FLIP_PAIRS),
}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UserError(f"--recipe {name!r} is unknown; use one of {', '.join(RECIPES)}")
    return RECIPES[name]


def effective_switches(recipe: str | None, explicit: dict[str, Any]) -> tuple[DiSTSwitches, str]:
    """The switches a run uses: DiSTSwitches' defaults, then the recipe's settings, then the `explicit` ones
    (options the user typed). Also one line saying where each recipe setting came from, for the log."""
    if recipe is None:
        switches = DiSTSwitches().replace(**explicit)
        return switches, f"recipe: none (defaults: the SSv2 head, {switches.pool_blocks} AdaPooling blocks)"
    chosen = get_recipe(recipe)
    switches = DiSTSwitches().replace(**{**chosen.switches, **explicit})
    kept = [f"{k} {v}" for k, v in chosen.switches.items() if k not in explicit]
    overridden = [f"{k} {explicit[k]} (flag; recipe {v})" for k, v in chosen.switches.items() if k in explicit]
    return switches, f"recipe: {recipe} ({chosen.dataset}): " + ", ".join(kept + overridden)
