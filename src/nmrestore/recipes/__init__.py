"""Typed experiment recipes (YAML + pydantic) and ``a.b=value`` overrides."""

from nmrestore.recipes.schema import (
    BlurSpec,
    DataSource,
    DataSpec,
    EvalSpec,
    ModelSpec,
    Recipe,
    Schedule,
    TaskSpec,
    TrainData,
    TrainSpec,
    apply_overrides,
    builtin_recipes,
    load_recipe,
    recipe_from_dict,
    resolve_recipe_path,
)

__all__ = [
    "BlurSpec",
    "DataSource",
    "DataSpec",
    "EvalSpec",
    "ModelSpec",
    "Recipe",
    "Schedule",
    "TaskSpec",
    "TrainData",
    "TrainSpec",
    "apply_overrides",
    "builtin_recipes",
    "load_recipe",
    "recipe_from_dict",
    "resolve_recipe_path",
]
