"""Checkpoints as untrusted files: metadata integrity, the embedded recipe, model size, N:M state.

Two kinds of forgery, both fed to ``eval``, ``infer`` and ``export`` (exit 2, one line, nothing
written) and to the library (the project's own error type):

* *naive edits*: the metadata changed, the digest left as it was -> checksum mismatch, since the
  digest covers the metadata (canonical JSON) as well as the tensors;
* *crafted files*: the digest recomputed after the edit (it is a checksum, not a signature), so
  what the file asks for must be validated: the embedded recipe through the recipe schema, model
  keywords against the builder, the model's size before it is built, finite weights and N:M ranks
  that are a permutation of 0..M-1 in every group.

The hypothesis test mutates the metadata of a valid checkpoint at random and asserts that loading
it either works or raises a subclass of ``NMRestoreError``, never anything else.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.engine.checkpoint import (
    DIGEST_KEY,
    LEGACY_FORMAT,
    _digest,
    integrity_digest,
    load_checkpoint,
    save_checkpoint,
    upgrade_legacy_checkpoints,
)
from nmrestore.engine.loading import load_any
from nmrestore.engine.runner import apply_sparsity, base_model, model_from_checkpoint
from nmrestore.errors import CheckpointError, NMRestoreError
from nmrestore.export.packed import pack_checkpoint
from nmrestore.recipes import recipe_from_dict
from tests.conftest import tiny_recipe_dict
from tests.reliability.test_bad_input_cli import _fails_cleanly
from tests.reliability.test_fuzz import VALUES, _paths, fuzz

runner = CliRunner()
Tensors = dict[str, torch.Tensor]
Meta = dict[str, Any]


# ----------------------------------------------------------------------------- helpers


RECIPE = recipe_from_dict(tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4}))
#: The metadata training writes for RECIPE (before ``format`` and the digest are added).
BASE_META: Meta = {
    "recipe": RECIPE.model_dump(mode="json"),
    "model": {"name": RECIPE.model.name, "scale": RECIPE.model.scale},
    "sparsity": RECIPE.sparsity.model_dump(mode="json") if RECIPE.sparsity else None,
    "step": 8,
}


def _save_valid(path: Path) -> Path:
    """A tiny one-shot 2:4 edsr_small x2 checkpoint, saved the way training saves one."""
    torch.manual_seed(0)
    model = base_model(RECIPE)
    apply_sparsity(model, RECIPE)
    return save_checkpoint(path, model, BASE_META)


def _read(path: Path) -> tuple[Tensors, Meta]:
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    return load_file(str(path)), json.loads(header["nmrestore"])


def _write(path: Path, tensors: Tensors, meta: Any, rehash: bool, text: str | None = None) -> Path:
    """Write a forged file: ``rehash`` recomputes the digest as a forger would."""
    if rehash and isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
        meta[DIGEST_KEY] = integrity_digest(tensors, meta)
    save_file(tensors, str(path), metadata={"nmrestore": text if text is not None else json.dumps(meta)})
    return path


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_valid(tmp_path_factory.mktemp("untrusted_ckpt") / "valid.safetensors")


def _image(folder: Path) -> Path:
    path = folder / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(path)
    return path


def _cli_matrix(path: Path, folder: Path, *needles: str) -> list[str]:
    """``eval``, ``infer`` and ``export`` on ``path``: exit 2, one line, nothing written."""
    image = _image(folder)
    out, packed = folder / "out", folder / "p.packed.safetensors"
    lines = [
        _fails_cleanly(["eval", str(path)], *needles),
        _fails_cleanly(["infer", str(path), str(image), "--out", str(out)], *needles),
        _fails_cleanly(["export", str(path), "--format", "packed", "--out", str(packed)], *needles),
    ]
    assert not out.exists() and not packed.exists()
    return lines


# ----------------------------------------------------------------------------- the control


def test_a_valid_checkpoint_and_a_faithful_rewrite_both_evaluate(valid: Path, tmp_path: Path) -> None:
    """The forging helper itself changes nothing: a rewrite with a recomputed digest still loads."""
    tensors, meta = _read(valid)
    copy_path = _write(tmp_path / "same.safetensors", tensors, meta, rehash=True)
    for path in (valid, copy_path):
        result = runner.invoke(app, ["eval", str(path), "--json"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output)["method"] == "oneshot"


# ----------------------------------------------------------------------------- metadata edits


def _set(meta: Meta, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    node = meta
    for key in parents:
        node = node[key]
    node[last] = value


#: (id, edit of the metadata) -- what the issue reported, each made without recomputing the digest.
NAIVE_EDITS: list[tuple[str, Callable[[Meta], None]]] = [
    ("huge-kwargs", lambda m: _set(m, "recipe.model.kwargs", {"n_feats": 20000, "n_blocks": 20000})),
    ("scale-2-to-3", lambda m: (_set(m, "recipe.model.scale", 3), _set(m, "model.scale", 3))),
    ("eval-protocol", lambda m: _set(m, "recipe.eval", {"crop_border": 0, "test_y_channel": False})),
    ("step", lambda m: _set(m, "step", 10**6)),
    ("digest-removed", lambda m: m.pop(DIGEST_KEY)),
]


@pytest.mark.parametrize("edit", [e for _, e in NAIVE_EDITS], ids=[i for i, _ in NAIVE_EDITS])
def test_metadata_edits_break_the_checksum(valid: Path, tmp_path: Path, edit: Callable[[Meta], None]) -> None:
    tensors, meta = _read(valid)
    edit(meta)
    path = _write(tmp_path / "edited.safetensors", tensors, meta, rehash=False)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)
    _cli_matrix(path, tmp_path, "checksum mismatch")


# ----------------------------------------------------------------------------- crafted files


def _huge_fsrcnn(meta: Meta) -> None:
    """The issue's case: model.kwargs {d: 20000, s: 20000} (fsrcnn) allocated 23 GB and was killed."""
    _set(meta, "recipe.model", {"name": "fsrcnn_small", "scale": 2, "kwargs": {"d": 20000, "s": 20000}})
    _set(meta, "model.name", "fsrcnn_small")


#: (id, edit, text the one-line error must contain) -- the digest is recomputed after each edit.
CRAFTED: list[tuple[str, Callable[[Meta], None], str]] = [
    ("fsrcnn-d-s-20000", _huge_fsrcnn, "d=20000 is above 4096"),
    (
        "size-estimate",
        lambda m: _set(m, "recipe.model.kwargs", {"n_feats": 4096, "n_blocks": 64}),
        "GiB of parameters (limit 1.0 GiB)",
    ),
    ("unknown-kwargs", lambda m: _set(m, "recipe.model.kwargs", {"n_feats": 8, "d": 3, "colour": 1}), "no keyword(s) 'colour', 'd'"),
    ("kwarg-scale", lambda m: _set(m, "recipe.model.kwargs", {"scale": 3}), "the scale is model.scale"),
    ("kwarg-wrong-type", lambda m: _set(m, "recipe.model.kwargs", {"n_feats": "eight"}), "n_feats must be a positive integer"),
    ("scale-2-to-3", lambda m: (_set(m, "recipe.model.scale", 3), _set(m, "model.scale", 3)), "does not fit this model"),
    ("name-disagrees", lambda m: _set(m, "model.name", "carn_small"), "metadata says model 'carn_small' but"),
    ("recipe-schema", lambda m: _set(m, "recipe.train.steps", True), "train.steps: Input should be a valid integer"),
    ("recipe-unknown-key", lambda m: _set(m, "recipe.evil", 1), "unknown key 'evil'"),
    ("recipe-a-list", lambda m: _set(m, "recipe", [1, 2]), "metadata 'recipe' must be a JSON object"),
    ("no-recipe", lambda m: m.pop("recipe"), "has no embedded recipe"),
    ("step-a-string", lambda m: _set(m, "step", "eight"), "metadata 'step' must be a non-negative integer"),
    ("model-a-string", lambda m: _set(m, "model", "edsr"), "metadata 'model' must be a JSON object"),
    ("unknown-format", lambda m: _set(m, "format", "nmrestore-checkpoint/9"), "unsupported format"),
    ("bad-unknown-model", lambda m: _set(m, "recipe.model.name", ["x"] * 10**5), "model.name: Input should be a valid string"),
]


@pytest.mark.parametrize(
    ("edit", "needle"), [(e, n) for _, e, n in CRAFTED], ids=[i for i, _, _ in CRAFTED]
)
def test_crafted_metadata_is_refused_before_anything_is_built(
    valid: Path, tmp_path: Path, edit: Callable[[Meta], None], needle: str
) -> None:
    tensors, meta = _read(valid)
    edit(meta)
    path = _write(tmp_path / "crafted.safetensors", tensors, meta, rehash=True)
    started = time.perf_counter()
    with pytest.raises(NMRestoreError) as info:
        model_from_checkpoint(load_any(path))
    assert needle in str(info.value), str(info.value)
    assert len(str(info.value)) < 600  # user data is never repr()'d in full
    assert time.perf_counter() - started < 10  # refused up front, nothing big allocated
    _cli_matrix(path, tmp_path, needle)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[1, 2, 3]", "corrupt metadata (an array, not a JSON object)"),
        ('"a string"', "corrupt metadata (a string, not a JSON object)"),
        ("{not json", "corrupt metadata (JSONDecodeError)"),
        ("[" * 100_000 + "]" * 100_000, "corrupt metadata"),
        ("null", "corrupt metadata (null, not a JSON object)"),
    ],
    ids=["list", "string", "not-json", "100000-deep", "null"],
)
def test_metadata_that_is_not_an_object(valid: Path, tmp_path: Path, text: str, needle: str) -> None:
    tensors, _ = _read(valid)
    path = _write(tmp_path / "meta.safetensors", tensors, None, rehash=False, text=text)
    with pytest.raises(CheckpointError, match="corrupt metadata"):
        load_checkpoint(path)
    _cli_matrix(path, tmp_path, needle)


def test_allow_large_lifts_the_size_limit(valid: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the limit lowered below the tiny model, eval/infer/export refuse it; --allow-large loads it."""
    import nmrestore.engine.runner as runner_module

    monkeypatch.setattr(runner_module, "MAX_MODEL_BYTES", 1000)
    _cli_matrix(valid, tmp_path, "(limit 1000 bytes); pass allow_large (--allow-large)")
    result = runner.invoke(app, ["eval", str(valid), "--allow-large", "--json"])
    assert result.exit_code == 0, result.output
    image = _image(tmp_path)
    result = runner.invoke(app, ["infer", str(valid), str(image), "--out", str(tmp_path / "o"), "--allow-large"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "p.packed.safetensors"
    result = runner.invoke(app, ["export", str(valid), "--format", "packed", "--out", str(out), "--allow-large"])
    assert result.exit_code == 0 and out.is_file(), result.output
    speed = ["speed", "--checkpoint", str(valid), "--input", "16x12", "--threads", "1", "--repeats", "1"]
    _fails_cleanly(speed, "(limit 1000 bytes); pass allow_large (--allow-large)")
    result = runner.invoke(app, [*speed, "--allow-large"])
    assert result.exit_code == 0, result.output


def test_a_legacy_checkpoint_is_refused_with_the_way_to_resave_it(valid: Path, tmp_path: Path) -> None:
    """Format /1 (tensor-only digest) -> a clear error; ``allow_legacy=True`` reads it to re-save it."""
    tensors, meta = _read(valid)
    meta = {k: v for k, v in meta.items() if k != DIGEST_KEY}
    meta.update(format=LEGACY_FORMAT, **{DIGEST_KEY: _digest(tensors)})
    path = _write(tmp_path / "old.safetensors", tensors, meta, rehash=False)
    _cli_matrix(path, tmp_path, "older nmrestore", "allow_legacy=True")
    ckpt = load_checkpoint(path, allow_legacy=True)
    model, _ = model_from_checkpoint(ckpt)
    resaved = save_checkpoint(tmp_path / "new.safetensors", model, ckpt.meta)
    result = runner.invoke(app, ["eval", str(resaved)])
    assert result.exit_code == 0, result.output
    cache = tmp_path / "cache"  # the benchmark's own caches are upgraded in place instead
    cache.mkdir()
    _write(cache / "last.safetensors", tensors, meta, rehash=False)
    assert upgrade_legacy_checkpoints(cache) == [cache / "last.safetensors"]
    assert load_checkpoint(cache / "last.safetensors").meta["step"] == 8
    tensors[next(k for k in tensors if k.endswith(".original"))].zero_()  # the legacy path still checks tensors
    _write(path, tensors, meta, rehash=False)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path, allow_legacy=True)
    assert upgrade_legacy_checkpoints(tmp_path) == []  # a damaged legacy file is left for the loader to refuse


# ----------------------------------------------------------------------------- N:M state, weights


def _first(tensors: Tensors, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _ranks_zero(t: Tensors) -> None:
    t[_first(t, ".ranks")].zero_()


def _ranks_200(t: Tensors) -> None:
    t[_first(t, ".ranks")].fill_(200)


def _ranks_repeated(t: Tensors) -> None:
    key = _first(t, ".ranks")
    t[key][0, 1] = t[key][0, 0]  # input channels 0 and 1 (one group of 4) share their ranks


def _route_n(value: int) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        t[_first(t, ".route_n")].fill_(value)

    return edit


def _weight(value: float) -> Callable[[Tensors], None]:
    def edit(t: Tensors) -> None:
        key = _first(t, ".original")
        t[key] = t[key].clone()
        t[key].view(-1)[3] = value

    return edit


TENSOR_EDITS: list[tuple[str, Callable[[Tensors], None], str]] = [
    ("ranks-all-zero", _ranks_zero, "N:M ranks are not a permutation of 0..3 in every group"),
    ("ranks-200", _ranks_200, "N:M ranks are not a permutation of 0..3 in every group"),
    ("ranks-repeated", _ranks_repeated, "N:M ranks are not a permutation of 0..3 in every group"),
    ("route-n-0", _route_n(0), "N per route must be in 1..M=4"),
    ("route-n-9", _route_n(9), "N per route must be in 1..M=4"),
    ("nan-weight", _weight(float("nan")), "holds NaN or Inf values"),
    ("inf-weight", _weight(float("inf")), "holds NaN or Inf values"),
]


@pytest.mark.parametrize(
    ("edit", "needle"), [(e, n) for _, e, n in TENSOR_EDITS], ids=[i for i, _, _ in TENSOR_EDITS]
)
def test_forged_nm_state_and_non_finite_weights_are_refused(
    valid: Path, tmp_path: Path, edit: Callable[[Tensors], None], needle: str
) -> None:
    tensors, meta = _read(valid)
    tensors = {k: v.clone() for k, v in tensors.items()}
    edit(tensors)
    path = _write(tmp_path / "forged.safetensors", tensors, meta, rehash=True)
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(path)
    assert needle in str(info.value)
    _cli_matrix(path, tmp_path, needle)


def test_a_packed_file_gets_the_same_checks(valid: Path, tmp_path: Path) -> None:
    """Packed files share the digest scheme; a crafted one (digest recomputed) is still validated."""
    packed = pack_checkpoint(valid, tmp_path / "v.packed.safetensors").path
    tensors, meta = _read(packed)
    meta["recipe"]["model"]["kwargs"] = {"n_feats": 20000}
    forged = _write(tmp_path / "huge.packed.safetensors", tensors, meta, rehash=True)
    _cli_matrix(forged, tmp_path, "n_feats=20000 is above 4096")
    tensors, meta = _read(packed)
    key = next(k for k in sorted(tensors) if k.startswith("dense:") and tensors[k].is_floating_point())
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    forged = _write(tmp_path / "nan.packed.safetensors", tensors, meta, rehash=True)
    _cli_matrix(forged, tmp_path, "holds NaN or Inf values")
    meta["recipe"]["eval"]["test_y_channel"] = False
    forged = _write(tmp_path / "edited.packed.safetensors", tensors, meta, rehash=False)
    _cli_matrix(forged, tmp_path, "checksum mismatch")


# ----------------------------------------------------------------------------- fuzzing


@st.composite
def mutated_metadata(draw: st.DrawFn, base: Meta) -> Any:
    meta: Any = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(meta, dict):
            break
        paths = [p for p in _paths(meta) if p and p[0] != DIGEST_KEY]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = meta
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "add", "whole"]))
        if action == "whole":
            meta = draw(VALUES)
        elif action == "replace":
            parent[path[-1]] = draw(VALUES)
        elif action == "delete":
            del parent[path[-1]]
        else:
            parent[draw(st.sampled_from(["kwargs", "n_feats", "n_blocks", "scale", "step", "x", "format"]))] = draw(VALUES)
    return meta


@fuzz(150)
@given(meta=mutated_metadata(BASE_META), rehash=st.booleans())
def test_fuzzed_metadata_loads_or_raises_the_projects_errors(valid: Path, meta: Any, rehash: bool) -> None:
    tensors, _ = _read(valid)
    path = valid.with_name("fuzzed.safetensors")
    try:
        text = json.dumps(meta)
    except ValueError:  # a value json cannot write (e.g. an int of 5000 digits): not a file anyone can make
        return
    _write(path, tensors, meta, rehash=rehash, text=None if rehash and isinstance(meta, dict) else text)
    try:
        model, _ = model_from_checkpoint(load_any(path))
    except NMRestoreError:
        return
    assert isinstance(model, torch.nn.Module)
