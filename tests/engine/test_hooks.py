"""Method hooks: each method's eval/infer behaviour is found through its config, never by name in the CLI."""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import ClassVar, Literal

import pytest
from torch import nn

import nmrestore.cli
from nmrestore.engine.hooks import MethodHooks, hooks_for_method, method_hooks
from nmrestore.errors import NMRestoreError, RecipeError, SparsityError
from nmrestore.models import create_model
from nmrestore.recipes.schema import TaskSpec
from nmrestore.sparsity.api import NMConfig, list_methods, method_config_type

importlib.import_module("nmrestore.methods")

#: The hooks each method that changes eval/infer must override (the rest use the plain defaults).
EXPECTED = {
    "classpruning": ("ClassPruningHooks", {"evaluate", "infer_adaptive", "sparse_engine", "restorer", "report_row"}),
    "png": ("PNGHooks", {"activate_task", "eval_task", "eval_extras"}),
    "sls": ("SLSHooks", {"eval_extras"}),
}


def _overridden(hooks: MethodHooks) -> set[str]:
    return {
        name
        for name, value in vars(MethodHooks).items()
        if callable(value) and not name.startswith("_") and getattr(type(hooks), name) is not value
    }


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_with_own_behaviour_has_its_hooks(method: str) -> None:
    name, hooks_expected = EXPECTED[method]
    by_type = method_hooks(method_config_type(method))
    by_name = hooks_for_method(method)
    assert type(by_type).__name__ == name and type(by_name) is type(by_type)
    assert _overridden(by_type) == hooks_expected
    assert by_type.adaptive_by_default == (method == "classpruning")


def test_other_methods_and_dense_get_the_plain_hooks() -> None:
    plain = set(list_methods()) - set(EXPECTED)
    assert {"oneshot", "srste"} <= plain
    for method in plain:
        assert type(method_hooks(method_config_type(method))) is MethodHooks
    for unknown in (None, "dense", "no-such-method", 3):
        assert type(hooks_for_method(unknown)) is MethodHooks
    assert type(method_hooks(None)) is MethodHooks


def test_a_config_naming_no_hooks_class_is_refused() -> None:
    class Broken(NMConfig):
        method: Literal["broken"] = "broken"  # type: ignore[assignment]
        eval_hooks: ClassVar[str | None] = "nmrestore.engine.hooks:method_hooks"

    with pytest.raises(RecipeError, match="names no MethodHooks subclass"):
        method_hooks(Broken())


def test_default_task_switch_serves_any_multitask_model() -> None:
    hooks = MethodHooks()
    with pytest.raises(SparsityError, match="--task needs a multi-task model"):
        hooks.activate_task(nn.Conv2d(3, 3, 3), "x3")
    model = create_model("edsr_small_multiscale", scale=2, n_feats=8, n_blocks=1)
    assert hooks.activate_task(model, "x3") == 3 and model.task == "x3"
    assert hooks.activate_task(model, "2") == 4  # digits: an index
    with pytest.raises(SparsityError, match="out of range"):
        hooks.activate_task(model, "7")
    with pytest.raises(NMRestoreError, match="unknown task"):
        hooks.activate_task(model, "x9")
    spec = TaskSpec(kind="sr")
    assert hooks.eval_task(model, spec, "x3") is spec


def test_png_scores_a_denoising_task_at_its_own_noise_level() -> None:
    hooks = hooks_for_method("png")
    denoise = TaskSpec(kind="denoise", sigma=15)
    assert hooks.eval_task(nn.Identity(), denoise, "sigma50").sigma == 50
    sr = TaskSpec(kind="sr")
    assert hooks.eval_task(nn.Identity(), sr, None) is sr


def test_the_default_adaptive_infer_refuses_with_one_line() -> None:
    from nmrestore.recipes import recipe_from_dict
    from tests.conftest import tiny_recipe_dict

    with pytest.raises(SparsityError, match="needs a ClassPruning checkpoint"):
        MethodHooks().infer_adaptive(nn.Identity(), recipe_from_dict(tiny_recipe_dict()), [], Path("."), None, None, None)


def test_the_cli_selects_no_behaviour_by_method_name() -> None:
    """``== "classpruning"``-style checks belong in the method's hooks, not in the CLI."""
    names = "|".join(re.escape(m) for m in sorted(list_methods()))
    compare = re.compile(rf"""[=!]=\s*["']({names})["']|["']({names})["']\s*[=!]=|\.method\s*[=!]=""")
    found = []
    for path in sorted(Path(nmrestore.cli.__file__).parent.glob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if compare.search(line) or "methods.png" in line or "methods.classpruning" in line:
                found.append(f"{path.name}:{number}: {line.strip()}")
    assert not found, "method-specific behaviour in the CLI (use nmrestore.engine.hooks):\n" + "\n".join(found)
