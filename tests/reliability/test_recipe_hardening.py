"""Recipes as untrusted input: YAML limits, strict values, plain run names, bounded error messages.

Each case goes through ``load_recipe`` (``RecipeError``) and ``nmrestore train`` (exit 2, one line
``error: ...``, no run folder anywhere). The hypothesis tests feed YAML built from hostile pieces
(anchors and aliases, duplicate keys, deep nesting, huge numbers) to ``load_recipe`` and then to
the model-size check, asserting that nothing but a subclass of ``NMRestoreError`` comes out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from nmrestore.errors import NMRestoreError, RecipeError
from nmrestore.models.registry import check_model_size
from nmrestore.recipes import load_recipe
from nmrestore.recipes.schema import Recipe, apply_overrides, recipe_from_dict
from nmrestore.recipes.yaml_safe import MAX_BYTES, load_yaml
from tests.conftest import tiny_recipe_dict
from tests.reliability.test_bad_input_cli import _fails_cleanly
from tests.reliability.test_fuzz import fuzz


def _laughs(levels: int = 9, where: str = "model") -> str:
    """A billion-laughs bomb: 9 levels of 9 aliases each = 9**9 leaves, inside ``model.kwargs``."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    body = "\n".join(f"    {line}" for line in lines)
    return f"{where}:\n  name: edsr_small\n  kwargs:\n{body}\n"


def _tiny(**changes: Any) -> str:
    return yaml.safe_dump(tiny_recipe_dict(**changes))


def _tiny_train(**train: Any) -> str:
    return _tiny(train={**tiny_recipe_dict()["train"], **train})


#: (id, recipe text, text the one-line error must contain)
CASES: list[tuple[str, str, str]] = [
    ("billion-laughs", _laughs(), "more than 100,000 values once its aliases are expanded"),
    ("recursive-alias", "model: &m {name: edsr_small, kwargs: {x: *m}}\n", "recursive alias"),
    ("duplicate-scale", "model:\n  name: edsr_small\n  scale: 2\n  scale: 3\n", "duplicate key 'scale' (line 4)"),
    ("duplicate-section", "train: {steps: 3}\nseed: 1\ntrain: {steps: 4}\n", "duplicate key 'train' (line 3)"),
    ("nesting-20000", "model: {kwargs: {x: " + "[" * 20_000 + "]" * 20_000 + "}}\n", "nested deeper than 32 levels"),
    ("empty-file", "", "the recipe is empty"),
    ("comments-only", "# nothing here\n", "the recipe is empty"),
    ("empty-mapping", "{}\n", "the recipe is empty"),
    ("a-list", "- 1\n- 2\n", "a recipe must be a mapping of sections, not a list"),
    ("bad-yaml", "train: {steps: 3\nname: [x\n", "not valid YAML (expected ',' or '}', but got ':' at line 2, column 5)"),
    ("tab-indent", "train:\n\tsteps: 3\n", "not valid YAML (found character '\\t' that cannot start any token at line 2, column 1)"),
    ("control-character", "name: a\x1fb\n", "not valid YAML (unacceptable character #x001f: special characters are not allowed)"),
    ("not-utf8", "name: caf\xe9\n", "not UTF-8 text"),
    ("num-workers-1000", _tiny(data={"train": {"num_workers": 1000}}), "num_workers: Input should be less than or equal to 32"),
    ("name-dotdot", _tiny(name="../escape"), "name: must be a plain name"),
    ("name-absolute", _tiny(name="/tmp/evil"), "name: must be a plain name"),
    ("name-nested", _tiny(name="a/../../b"), "name: must be a plain name"),
    ("name-backslash", _tiny(name="a\\b"), "name: must be a plain name"),
    ("name-dot", _tiny(name=".."), "name: must be a plain name"),
    ("name-empty", _tiny(name=""), "name: must be a plain name"),
    ("seed-minus-1", _tiny(seed=-1), "seed: Input should be greater than or equal to 0"),
    ("seed-2-64", _tiny(seed=2**64), "seed: Input should be less than or equal to 2147483647"),
    ("beta1-1.5", _tiny_train(betas=[1.5, 0.999]), "train.betas.0: Input should be less than 1"),
    ("beta2-1.0", _tiny_train(betas=[0.9, 1.0]), "train.betas.1: Input should be less than 1"),
    ("beta-negative", _tiny_train(betas=[-0.1, 0.9]), "train.betas.0: Input should be greater than or equal to 0"),
    ("steps-1e29", "train: {steps: 1.0e+29}\nname: x\n", "train.steps: Input should be a valid integer"),
    ("steps-true", "train: {steps: true}\nname: x\n", "train.steps: Input should be a valid integer"),
    ("steps-string", "train: {steps: '100'}\nname: x\n", "train.steps: Input should be a valid integer"),
    ("steps-10-12", "train: {steps: 1000000000000}\nname: x\n", "train.steps: Input should be less than or equal to 1000000000"),
    ("val-every-float", "train: {val_every: 2.0}\nname: x\n", "train.val_every: Input should be a valid integer"),
    ("weight-decay-inf", "train: {weight_decay: .inf}\nname: x\n", "train.weight_decay: Input should be a finite number"),
    ("lr-nan", "train: {lr: .nan}\nname: x\n", "train.lr: Input should be a finite number"),
    ("milestone-negative", "train: {schedule: {milestones: [-1]}}\nname: x\n", "milestones.0: Input should be greater than or equal to 0"),
    ("kwargs-scale", "model: {name: edsr_small, kwargs: {scale: 3}}\n", "the scale is model.scale"),
    ("long-unknown-key", "name: x\n? " + "k" * 200_000 + "\n: 1\n", "unknown key 'kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk...'"),
    ("long-method", "sparsity: {method: " + "m" * 200_000 + "}\n", "unknown method"),
]


@pytest.mark.parametrize(("text", "needle"), [(t, n) for _, t, n in CASES], ids=[i for i, _, _ in CASES])
def test_hostile_recipes_are_refused_with_one_short_line(tmp_path: Path, text: str, needle: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(text.encode("latin-1") if "\xe9" in text else text.encode())
    started = time.perf_counter()
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe)
    assert time.perf_counter() - started < 5  # the bomb took 51 s and 2.75 GB before
    assert needle in str(info.value), str(info.value)
    message = _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run")], needle)
    assert len(message) < 600  # user data is never repr()'d in full
    assert not (tmp_path / "run").exists()


def test_a_recipe_name_never_leaves_the_runs_folder(tmp_path: Path) -> None:
    """Without --out the run goes to runs/<name>: a name with a path in it is refused before any write."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_tiny(name="../../outside"))
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        _fails_cleanly(["train", str(recipe)], "must be a plain name")
    finally:
        os.chdir(cwd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    assert not (tmp_path.parent.parent / "outside").exists()


def test_plain_names_in_use_stay_valid() -> None:
    for name in ("tiny", "bench-oneshot-2:4", "sls_edsr_baseline_x4_div2k_b00625", "bench-sls-0.125", "a..b"):
        assert recipe_from_dict(tiny_recipe_dict(name=name)).name == name


def test_a_recipe_larger_than_the_limit(tmp_path: Path) -> None:
    recipe = tmp_path / "big.yaml"
    recipe.write_text("name: x\n" + "# padding\n" * (MAX_BYTES // 10 + 1))
    with pytest.raises(RecipeError, match="more than 1,048,576 bytes, the most a recipe may have"):
        load_recipe(recipe)
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run")], "a recipe may have")


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.steps=true", "train.steps: Input should be a valid integer"),
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("name=../x", "must be a plain name"),
        ("data.train.num_workers=64", "num_workers: Input should be less than or equal to 32"),
        ("model.kwargs=" + "[" * 100 + "]" * 100, "nested deeper than 32 levels"),
        ("model.kwargs={a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], b: [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]}", "takes no keyword(s) 'a', 'b'"),
    ],
    ids=["steps-true", "seed", "name", "workers", "deep", "unknown-kwargs"],
)
def test_overrides_get_the_same_checks(tmp_path: Path, override: str, needle: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_tiny())
    with pytest.raises(NMRestoreError):
        recipe_obj = load_recipe(recipe, [override])
        check_model_size(recipe_obj.model.name, recipe_obj.model.scale, recipe_obj.model.kwargs)
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run"), "--set", override], needle)


def test_valid_aliases_and_merge_keys_still_work() -> None:
    text = "base: &b {steps: 3, lr: 0.001}\ntrain: {<<: *b, steps: 4}\n"
    data = load_yaml(text)
    assert data["train"] == {"steps": 4, "lr": 0.001}
    assert apply_overrides({"train": {"steps": 1}}, ["train.steps=5"]) == {"train": {"steps": 5}}


def test_shipped_recipes_all_load() -> None:
    from nmrestore.recipes import builtin_recipes

    names = builtin_recipes()
    assert len(names) > 15
    for name in names:
        assert isinstance(load_recipe(name), Recipe)


# ----------------------------------------------------------------------------- fuzzing

SCALAR_TEXT = st.sampled_from(
    ["1", "-1", "0", "2", "true", "null", "1.0e+29", ".inf", ".nan", "1e3", "'x'", "edsr_small", "[]", "{}",
     "99999999999999999999999", "~", "0x10", "1_000", "2:4", "../x", "/abs"]
)
KEYS_TEXT = st.sampled_from(
    ["name", "seed", "model", "scale", "kwargs", "n_feats", "n_blocks", "data", "train", "steps", "betas",
     "num_workers", "lr", "sparsity", "method", "n", "m", "eval", "task", "kind", "x"]
)


@st.composite
def hostile_yaml(draw: st.DrawFn) -> str:
    """YAML text with anchors, aliases, duplicate keys, merges and nesting, built from pieces."""
    anchors: list[str] = []

    def value(depth: int) -> str:
        choice = draw(st.integers(0, 5 if depth < 4 else 1))
        if choice == 0:
            return draw(SCALAR_TEXT)
        if choice == 1 and anchors:
            return f"*{draw(st.sampled_from(anchors))}"
        if choice == 2:
            name = f"a{len(anchors)}"
            inner = value(depth + 1)
            anchors.append(name)
            return f"&{name} [{inner}, {inner}]"
        if choice == 3:
            items = [value(depth + 1) for _ in range(draw(st.integers(0, 4)))]
            return "[" + ", ".join(items) + "]"
        pairs = [f"{draw(KEYS_TEXT)}: {value(depth + 1)}" for _ in range(draw(st.integers(0, 4)))]
        return "{" + ", ".join(pairs) + "}"

    lines = [f"{draw(KEYS_TEXT)}: {value(0)}" for _ in range(draw(st.integers(0, 6)))]
    return "\n".join(lines) + "\n"


@fuzz(300)
@given(text=hostile_yaml())
def test_hostile_yaml_raises_only_project_errors(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "hostile.yaml"
    path.write_text(text)
    try:
        recipe = load_recipe(path)
        check_model_size(recipe.model.name, recipe.model.scale, recipe.model.kwargs)
    except NMRestoreError:
        return


@fuzz(150)
@given(
    section=st.sampled_from(["model", "train", "data", "eval", "task", "sparsity"]),
    key=KEYS_TEXT,
    raw=SCALAR_TEXT,
)
def test_one_hostile_value_in_a_valid_recipe(
    tmp_path_factory: pytest.TempPathFactory, section: str, key: str, raw: str
) -> None:
    path = tmp_path_factory.getbasetemp() / "one.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4})))
    try:
        recipe = load_recipe(path, [f"{section}.{key}={raw}"])
        check_model_size(recipe.model.name, recipe.model.scale, recipe.model.kwargs)
    except NMRestoreError:
        return
