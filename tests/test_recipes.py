"""Recipes: the reference's per-dataset settings as presets that explicit flags override."""

from __future__ import annotations

import pytest

from dist_cache.errors import UserError
from dist_cache.model import DiSTSwitches
from dist_cache.recipes import RECIPES, SSV2_FLIP_PAIRS, effective_switches, get_recipe


def test_no_recipe_is_the_defaults_which_are_the_ssv2_head():
    switches, line = effective_switches(None, {})
    assert switches == DiSTSwitches() and switches.pool_blocks == RECIPES["ssv2"].switches["pool_blocks"] == 2
    assert line.startswith("recipe: none")


def test_a_recipe_sets_its_switches_and_explicit_flags_win():
    switches, line = effective_switches("k400", {})
    assert switches.pool_blocks == 4 and switches == DiSTSwitches(pool_blocks=4)
    assert line == "recipe: k400 (Kinetics-400): pool_blocks 4"
    switches, line = effective_switches("k400", {"pool_blocks": 3, "gamma": 4})
    assert (switches.pool_blocks, switches.gamma) == (3, 4)
    assert "pool_blocks 3 (flag; recipe 4)" in line and "\n" not in line


def test_recipes_differ_only_where_the_reference_does():
    k400, ssv2 = get_recipe("k400"), get_recipe("ssv2")
    assert set(k400.switches) == set(ssv2.switches) == {"pool_blocks"}
    assert k400.flip_p == ssv2.flip_p == 0.5
    assert k400.flip_label_map == () and ssv2.flip_label_map == SSV2_FLIP_PAIRS
    names = [name for pair in SSV2_FLIP_PAIRS for name in pair]
    assert len(set(names)) == 6 and all("left" in a and "right" in b for a, b in SSV2_FLIP_PAIRS)
    with pytest.raises(UserError, match="unknown"):
        get_recipe("hmdb")
