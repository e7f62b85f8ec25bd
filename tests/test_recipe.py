import math
from pathlib import Path

import pytest

from gift_quant.config import SaliencyConfig
from gift_quant.recipe import Recipe, RecipeError, find_recipe, load_recipe

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yaml"))


def test_defaults_are_gptqs_and_the_measured_saliency_metric():
    r = Recipe()
    assert (r.quant.method, r.quant.bits, r.quant.group_size, r.quant.sym) == ("gptq", 4, 128, True)
    # owq, not the paper's gift: it won the recovery sweep at every width (README)
    assert r.saliency.metric == "owq" and r.saliency.norms == (2.0, 2.0, 1.0)
    assert SaliencyConfig(metric="gift").norms == (math.inf, math.inf, 1.0)
    assert (r.calib.num_samples, r.calib.seq_len) == (128, 2048)


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_load_and_round_trip(path, tmp_path):
    r = load_recipe(path)
    again = tmp_path / "r.yaml"
    again.write_text(r.to_yaml())
    assert load_recipe(again) == r


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("quant:\n  bitz: 3\n")
    with pytest.raises(RecipeError, match=r"unknown key 'quant.bitz'.*did you mean 'quant.bits'"):
        load_recipe(f)
    with pytest.raises(RecipeError, match=r"did you mean 'saliency'"):
        load_recipe(None, ["salency.count=3"])


def test_set_overrides_are_type_checked():
    r = load_recipe(None, ["quant.bits=3", "quant.sym=false", "saliency.fraction=0.03"])
    assert (r.quant.bits, r.quant.sym, r.saliency.fraction) == (3, False, 0.03)
    with pytest.raises(RecipeError, match="quant.bits expects an integer, got 'three'"):
        load_recipe(None, ["quant.bits=three"])
    with pytest.raises(RecipeError, match="quant.sym expects true/false"):
        load_recipe(None, ["quant.sym=3"])
    with pytest.raises(RecipeError, match="expects section.key=value"):
        load_recipe(None, ["quant.bits"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("quant.bits=5", r"quant.bits must be one of \(2, 3, 4, 8\), got 5"),
        ("quant.group_size=0", "quant.group_size must be -1"),
        ("quant.method=awq", r"quant.method must be one of \['gptq', 'rtn'\]"),
        ("saliency.metric=gfit", "did you mean 'gift'"),
        ("saliency.tau=3", "saliency.tau must be 1, 2 or inf"),
        ("saliency.fraction=1.5", r"saliency.fraction must be in \[0, 1\)"),
        ("calib.source=wiki-heldout", "would calibrate on the evaluation articles"),
        ("calib.num_samples=0", "calib.num_samples must be > 0"),
    ],
)
def test_impossible_values_are_errors_that_name_the_fix(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(None, [override])


def test_one_salient_budget_at_a_time():
    with pytest.raises(RecipeError, match="give one budget"):
        load_recipe(None, ["saliency.count=8", "saliency.fraction=0.1"])


def test_inf_survives_json_and_yaml(tmp_path):
    r = load_recipe(None, ["saliency.metric=custom", "saliency.tau=inf", "saliency.rho=2"])
    assert r.to_dict()["saliency"]["tau"] == "inf"
    f = tmp_path / "r.yaml"
    f.write_text(r.to_yaml())
    assert load_recipe(f).saliency.norms == (math.inf, 2.0, 1.0)


def test_a_budget_override_replaces_the_recipe_files_budget():
    r = load_recipe(find_recipe("quickstart"), ["saliency.count=8"])
    assert (r.saliency.count, r.saliency.fraction) == (8, None)
