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


# -- the task section (deblurring / denoising) --------------------------------------------------------


def test_task_defaults_and_validation() -> None:
    denoise = recipe_from_dict({"task": {"kind": "denoise"}})
    assert denoise.task.sigma == 25 and denoise.model.scale == 1
    assert denoise.eval.crop_border == 0 and not denoise.eval.test_y_channel
    assert recipe_from_dict(denoise.model_dump(mode="json")) == denoise  # a checkpoint restores it exactly
    deblur = recipe_from_dict({"task": {"kind": "deblur", "blur": {"kernel_size": 9, "trajectory": "line"}}})
    blur = deblur.task.degradation()
    assert blur is not None and blur.kernel_size == 9 and blur.trajectory == "line"
    assert recipe_from_dict({}).task.degradation() is None
    for bad, message in (
        ({"task": {"kind": "sr", "sigma": 25}}, "task.sigma is for kind 'denoise'"),
        ({"task": {"kind": "denoise", "blur": {}}}, "task.blur is for kind 'deblur'"),
        ({"task": {"kind": "deblur"}, "model": {"scale": 2}}, "needs model.scale 1"),
        ({"task": {"kind": "deblur", "blur": {"kernel_size": 8}}}, "must be odd"),
        ({"task": {"kind": "deblur", "blur": {"length": [0.9, 0.1]}}}, "min <= max"),
        ({"task": {"kind": "denoise", "sigma": 0}}, r"task\.sigma"),
        ({"task": {"kind": "inpaint"}}, r"task\.kind"),
        ({"task": {"kind": "denoise", "sigmaa": 3}}, r"unknown key 'task\.sigmaa'; allowed: blur, kind, sigma"),
    ):
        with pytest.raises(RecipeError, match=message):
            recipe_from_dict(bad)


def test_noise_levels_of_png_task_names() -> None:
    from nmrestore.recipes.schema import TaskSpec, noise_task_sigma

    assert [noise_task_sigma(n) for n in ("sigma15", "s25", "50", "Sigma7.5", "x2", "sigma0")] == [
        15.0,
        25.0,
        50.0,
        7.5,
        None,
        None,
    ]
    spec = TaskSpec(kind="denoise", sigma=25)
    assert spec.for_png_task("sigma50").sigma == 50
    assert TaskSpec().for_png_task("x3") == TaskSpec()  # SR tasks are scales, not noise levels
    with pytest.raises(RecipeError, match="noise level"):
        spec.for_png_task("fast")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("demo_deblur", "deblur"), ("demo_denoise", "denoise"), ("demo_png_denoise", "denoise"), ("dmphn_gopro", "deblur")],
)
def test_shipped_restoration_recipes(name: str, kind: str) -> None:
    recipe = load_recipe(name)
    assert recipe.task.kind == kind and recipe.model.scale == 1
    assert recipe.eval.crop_border == 0 and recipe.eval.test_y_channel is False


# -- validation data: never the test split unless the recipe says so ------------------------------
def test_validation_defaults_to_held_out_training_strips() -> None:
    recipe = recipe_from_dict({"data": {"train": {"source": "builtin"}}})
    assert recipe.data.val is None and recipe.data.holdout == 0.1


@pytest.mark.parametrize(
    "val",
    [{"source": "builtin", "split": "test"}, {"source": "folder", "root": "data/photos", "split": "test"}],
)
def test_validating_on_a_test_split_must_be_declared(val: dict[str, object]) -> None:
    with pytest.raises(RecipeError, match=r"data\.val.*test_data: true"):
        recipe_from_dict({"data": {"val": val}})
    declared = recipe_from_dict({"data": {"val": {**val, "test_data": True}}})
    assert declared.data.val is not None and declared.data.val.test_data


def test_a_valid_split_and_no_holdout_are_accepted_but_nothing_to_validate_is_not() -> None:
    recipe = recipe_from_dict({"data": {"val": {"source": "folder", "root": "d", "split": "valid"}, "holdout": 0}})
    assert recipe.data.val is not None and recipe.data.val.split == "valid"
    with pytest.raises(RecipeError, match="nothing to validate on"):
        recipe_from_dict({"data": {"holdout": 0}})


def test_every_shipped_recipe_keeps_validation_off_the_test_images() -> None:
    for name in builtin_recipes():
        val = load_recipe(name).data.val
        assert val is None or val.split != "test" or val.test_data, name
