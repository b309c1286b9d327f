"""Recipes: strict validation with helpful messages, overrides, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

from nmrestore.errors import RecipeError
from nmrestore.methods import OneShotConfig, SRSTEConfig
from nmrestore.recipes import apply_overrides, builtin_recipes, load_recipe, recipe_from_dict


def test_unknown_key_names_the_key_and_the_allowed_ones() -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'train\.stepz'; allowed: .*steps"):
        recipe_from_dict({"train": {"stepz": 3}})


def test_unknown_method_key_lists_that_methods_keys() -> None:
    with pytest.raises(RecipeError, match=r"unknown key 'sparsity\.budgett' for method 'sls'; allowed: .*budget"):
        recipe_from_dict({"sparsity": {"method": "sls", "budgett": 0.2}})


def test_wrong_type_and_bad_values() -> None:
    with pytest.raises(RecipeError, match=r"train\.steps: Input should be a valid integer"):
        recipe_from_dict({"train": {"steps": "many"}})
    with pytest.raises(RecipeError, match=r"N must be in 1\.\.M=4"):
        recipe_from_dict({"sparsity": {"method": "oneshot", "n": 5, "m": 4}})
    with pytest.raises(RecipeError, match="unknown method 'magic'"):
        recipe_from_dict({"sparsity": {"method": "magic"}})
    with pytest.raises(RecipeError, match="needs a 'root'"):
        recipe_from_dict({"data": {"train": {"source": "folder"}}})


def test_method_configs_are_typed() -> None:
    recipe = recipe_from_dict({"sparsity": {"method": "oneshot", "n": 2, "m": 4}})
    assert isinstance(recipe.sparsity, OneShotConfig)
    recipe = recipe_from_dict({"sparsity": {"method": "srste", "n": 2, "m": 4, "refresh_every": 5}})
    assert isinstance(recipe.sparsity, SRSTEConfig) and recipe.sparsity.refresh_every == 5
    # the dump keeps the method's own fields (a checkpoint re-creates the same config)
    assert recipe_from_dict(recipe.model_dump(mode="json")) == recipe


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntrain: {steps: 10}\n")
    recipe = load_recipe(path, ["train.steps=20", "train.lr=1e-3", "sparsity.method=oneshot", "model.scale=4"])
    assert recipe.train.steps == 20 and recipe.train.lr == 1e-3 and recipe.model.scale == 4
    assert isinstance(recipe.sparsity, OneShotConfig)
    with pytest.raises(RecipeError, match=r"must look like key\.path=value"):
        apply_overrides({}, ["train.steps"])
    with pytest.raises(RecipeError, match="'steps' is not a section"):
        apply_overrides({"train": {"steps": 3}}, ["train.steps.x=1"])


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


@pytest.mark.parametrize("name", builtin_recipes())
def test_shipped_recipes_validate(name: str) -> None:
    recipe = load_recipe(name)
    assert recipe.name == name
