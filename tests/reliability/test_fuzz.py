"""Fuzzing the loaders with hypothesis: nothing escapes but the project's own errors.

* recipes: random YAML mappings, mutated valid recipes and random text/bytes through
  ``load_recipe`` either load or raise :class:`RecipeError`;
* images: random bytes, truncations and byte flips of valid PNG/JPEG files through ``read_image``
  either give an ``HxWx3 uint8`` array or raise :class:`ImageError`.
"""

from __future__ import annotations

import copy
import io
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nmrestore.data.io import read_image
from nmrestore.errors import ImageError, RecipeError
from nmrestore.recipes import load_recipe
from nmrestore.recipes.schema import Recipe
from tests.conftest import tiny_recipe_dict


def fuzz(examples: int) -> settings:
    """Modest, deterministic (derandomized) runs without an example database in the tree."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="nmrestore-fuzz-") as folder:
        yield Path(folder)


# ----------------------------------------------------------------------------- recipes

KEYS = [
    "name",
    "seed",
    "model",
    "data",
    "train",
    "sparsity",
    "eval",
    "scale",
    "kwargs",
    "steps",
    "lr",
    "n",
    "m",
    "method",
    "budget",
    "source",
    "root",
    "patch_size",
    "batch_size",
    "schedule",
    "milestones",
    "x",
    "",
]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["edsr_small", "oneshot", "sls", "srste", "builtin", "folder", "2:4"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)), inner, max_size=4),
    ),
    max_leaves=12,
)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    return out


@st.composite
def mutated_recipes(draw: st.DrawFn) -> dict[str, Any]:
    recipe = copy.deepcopy(tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4}))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(recipe)[1:]))
        parent = recipe
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=6)))] = draw(VALUES)
        if not isinstance(recipe, dict):
            break
    return recipe


def _load(scratch: Path, payload: bytes) -> None:
    path = scratch / "fuzz.yaml"
    path.write_bytes(payload)
    try:
        recipe = load_recipe(path)
    except RecipeError:
        return
    assert isinstance(recipe, Recipe)


def _dump(value: Any) -> bytes:
    return yaml.safe_dump(value, allow_unicode=True).encode()


@fuzz(200)
@given(tree=st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), VALUES, max_size=6))
def test_random_mappings_load_or_raise_recipe_error(scratch: Path, tree: dict[str, Any]) -> None:
    _load(scratch, _dump(tree))


@fuzz(200)
@given(recipe=mutated_recipes())
def test_mutated_valid_recipes_load_or_raise_recipe_error(scratch: Path, recipe: dict[str, Any]) -> None:
    _load(scratch, _dump(recipe))


@fuzz(200)
@given(payload=st.one_of(st.text(max_size=200).map(str.encode), st.binary(max_size=200), VALUES.map(_dump)))
def test_random_text_and_bytes_load_or_raise_recipe_error(scratch: Path, payload: bytes) -> None:
    _load(scratch, payload)


@pytest.mark.parametrize("method", [[], {"a": 1}])
def test_unhashable_sparsity_method_is_a_recipe_error(scratch: Path, method: Any) -> None:
    path = scratch / "method.yaml"
    path.write_text(yaml.safe_dump({"sparsity": {"method": method, "n": 2, "m": 4}}))
    with pytest.raises(RecipeError, match="method"):
        load_recipe(path)


# ----------------------------------------------------------------------------- images


def _encoded(fmt: str, mode: str) -> bytes:
    pixels = np.random.default_rng(5).integers(0, 256, size=(9, 11, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


VALID = {
    "png": _encoded("PNG", "RGB"),
    "png-rgba": _encoded("PNG", "RGBA"),
    "png-gray": _encoded("PNG", "L"),
    "jpeg": _encoded("JPEG", "RGB"),
    "jpeg-cmyk": _encoded("JPEG", "CMYK"),
}


@st.composite
def damaged_images(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[kind])
    action = draw(st.sampled_from(["truncate", "flip", "both", "random"]))
    if action == "random":
        return kind, draw(st.binary(max_size=400))
    if action in ("flip", "both"):
        for _ in range(draw(st.integers(1, 8))):
            index = draw(st.integers(0, len(data) - 1))
            data[index] ^= draw(st.integers(1, 255))
    if action in ("truncate", "both"):
        data = data[: draw(st.integers(0, len(data) - 1))]
    return kind, bytes(data)


def _read(scratch: Path, kind: str, payload: bytes) -> None:
    path = scratch / ("fuzz.jpg" if kind.startswith("jpeg") else "fuzz.png")
    path.write_bytes(payload)
    try:
        image = read_image(path)
    except ImageError as exc:
        assert path.name in str(exc)  # the message names the file
        return
    assert isinstance(image, np.ndarray)
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 0 and image.shape[1] > 0
    assert image.dtype == np.uint8


@fuzz(300)
@given(sample=damaged_images())
def test_damaged_images_read_or_raise_image_error(scratch: Path, sample: tuple[str, bytes]) -> None:
    _read(scratch, *sample)


@fuzz(100)
@given(
    payload=st.binary(min_size=0, max_size=64),
    header=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"]),
)
def test_random_bytes_behind_an_image_signature(scratch: Path, payload: bytes, header: bytes) -> None:
    _read(scratch, "jpeg" if header.startswith(b"\xff") else "png", header + payload)
