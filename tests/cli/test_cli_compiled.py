"""`nmrestore compile`, then `infer` and `speed` on the compiled file; what refuses it, in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import nmrestore
from nmrestore.cli.main import app
from nmrestore.engine.checkpoint import save_checkpoint
from nmrestore.methods import OneShotConfig
from nmrestore.recipes import recipe_from_dict
from nmrestore.runtime import engine_state, load_kernel
from nmrestore.sparsity import sparsify_
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Decisions are keyed by thread count: compile and infer in one setting."""


def _checkpoint(folder: Path, sparsity: dict[str, object] | None = None) -> Path:
    """A one-shot 2:4 checkpoint of the tiny recipe's model (untrained: outputs only need to match)."""
    sparsity = sparsity or {"method": "oneshot", "n": 2, "m": 4}
    recipe = recipe_from_dict(tiny_recipe_dict(sparsity=sparsity))
    torch.manual_seed(0)
    model = nmrestore.create_model(recipe.model.name, scale=recipe.model.scale, **recipe.model.kwargs)
    sparsify_(model, OneShotConfig(n=2, m=4))
    meta = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "sparsity": recipe.sparsity.model_dump(mode="json") if recipe.sparsity else None,
    }
    return save_checkpoint(folder / "best.safetensors", model, meta, with_rng=False)


def test_compile_at_fp16_saves_the_fp16_tactic(tmp_path: Path) -> None:
    lib = load_kernel()
    if lib is None or not lib.has_f16:
        pytest.skip("no fp16 kernels here")
    ckpt = _checkpoint(tmp_path)
    args = ["compile", str(ckpt), "--input", "12x10", "--tactic", "sparse", "--precision", "fp16", "-v"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    engine, _ = nmrestore.load(tmp_path / "best.nmc.safetensors")
    state = engine_state(engine)
    assert state is not None and state.config.precision == "fp16"
    assert any(d.choice == "sparse_fp16" for d in state.table())  # the recorded forced choices
    bad = runner.invoke(app, ["compile", str(ckpt), "--precision", "int4"])
    assert bad.exit_code == 2 and "--precision" in bad.output


def test_compile_then_infer_and_speed_on_the_compiled_file(tmp_path: Path) -> None:
    if load_kernel() is None:  # pragma: no cover - only without a compiler
        pytest.skip("sparse kernel unavailable on this machine")
    ckpt = _checkpoint(tmp_path)
    image = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(image)
    result = runner.invoke(app, ["compile", str(ckpt), "--input", "12x10", "--tactic", "sparse", "-v"])
    assert result.exit_code == 0, result.output
    compiled = tmp_path / "best.nmc.safetensors"  # beside the checkpoint by default
    assert compiled.is_file() and "tactics decided for 12x10" in result.output and "forced" in result.output
    engine, recipe = nmrestore.load(compiled)
    state = engine_state(engine)
    assert state is not None and {d.input_shape for d in state.table()} >= {(1, 8, 10, 12)}
    assert recipe.sparsity is not None and recipe.sparsity.method == "oneshot"  # the checkpoint's recipe
    result = runner.invoke(app, ["infer", str(compiled), str(image), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["infer", str(ckpt), str(image), "--out", str(tmp_path / "b"), "--sparse-engine"])
    assert result.exit_code == 0, result.output
    a = np.asarray(Image.open(tmp_path / "a" / "lr.png"), dtype=np.int16)
    b = np.asarray(Image.open(tmp_path / "b" / "lr.png"), dtype=np.int16)
    assert a.shape == (20, 24, 3) and np.abs(a - b).max() <= 1  # 8-bit rounding of float-close outputs
    result = runner.invoke(app, ["speed", "--checkpoint", str(compiled), "--input", "12x10", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["max_abs_diff"] <= 1e-4 and "compiled" in payload["model"]
    # a compiled file is not a checkpoint: eval says which commands take it
    result = runner.invoke(app, ["eval", str(compiled)])
    assert result.exit_code == 2 and "compiled engine file" in result.output
    result = runner.invoke(app, ["infer", str(compiled), str(image), "--out", str(tmp_path / "c"), "--adaptive"])
    assert result.exit_code == 2 and "--adaptive needs the checkpoint" in result.output


def test_compile_refuses_classpruning_and_bad_sizes(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path)
    result = runner.invoke(app, ["compile", str(ckpt), "--input", "0x10"])
    assert result.exit_code == 2 and "width and height must be between" in result.output
    meta = {"recipe": {}, "model": {"name": "edsr_small", "scale": 2}, "sparsity": {"method": "classpruning"}}
    other = save_checkpoint(tmp_path / "cp.safetensors", nmrestore.create_model("edsr_small"), meta)
    result = runner.invoke(app, ["compile", str(other), "--out", str(tmp_path / "x.nmc.safetensors")])
    assert result.exit_code == 2 and "classpruning model" in result.output and "--sparse-engine" in result.output
    assert not (tmp_path / "x.nmc.safetensors").exists()
