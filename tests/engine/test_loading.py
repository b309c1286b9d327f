"""One loader for every checkpoint: training or packed, any method, as the model it was saved from."""

from __future__ import annotations

from pathlib import Path

import torch

import nmrestore
from nmrestore.engine.checkpoint import save_checkpoint
from nmrestore.export.packed import save_packed
from nmrestore.methods import OneShotConfig
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import sparsify_
from tests.conftest import tiny_recipe_dict


def test_load_gives_the_same_model_from_a_training_and_a_packed_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recipe = recipe_from_dict(tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4}))
    model = nmrestore.create_model(recipe.model.name, scale=recipe.model.scale, **recipe.model.kwargs)
    sparsify_(model, OneShotConfig(n=2, m=4))
    meta = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "sparsity": recipe.sparsity.model_dump(mode="json") if recipe.sparsity else None,
    }
    save_checkpoint(tmp_path / "ckpt.safetensors", model, meta)
    save_packed(model, tmp_path / "ckpt.packed.safetensors", meta)
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        expected = model.eval()(x)
        for path in (tmp_path / "ckpt.safetensors", tmp_path / "ckpt.packed.safetensors"):
            loaded, loaded_recipe = nmrestore.load(path)
            assert loaded_recipe.model.name == recipe.model.name
            assert torch.equal(loaded.eval()(x), expected), path
