"""SLS through the recipe runner: budget kept, artifacts written, checkpoint == evaluated model."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.methods.sls.report import achieved_budget
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import check_nm, nm_layers
from tests.conftest import tiny_recipe_dict


def test_sls_run_meets_budget_writes_artifacts_and_reloads_exactly(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            model={"name": "edsr_small", "scale": 2, "kwargs": {"n_feats": 16, "n_blocks": 1}},
            train={"steps": 6, "val_every": 6},
            sparsity={"method": "sls", "m": 8, "budget": 0.3, "search_steps": 100, "refresh_every": 2},
        )
    )
    result = train(recipe, tmp_path / "run", show_progress=False)
    # the search was cut short by the end of training: projected onto the budget
    assert result.controller is not None and result.controller.frozen
    assert achieved_budget(result.model, recipe.sparsity) <= 0.3  # type: ignore[arg-type]
    for name in ("sls_layers.txt", "sls_layers.json", "sls_n_per_layer.png"):
        assert (tmp_path / "run" / name).stat().st_size > 0
    check_nm(result.model)

    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    reloaded, _ = model_from_checkpoint(last)
    saved_ns = [int(m.route_n[0]) for _, _, m in nm_layers(reloaded)]
    trained_ns = [int(m.route_n[0]) for _, _, m in nm_layers(result.model)]
    assert saved_ns == trained_ns

    out = CliRunner().invoke(app, ["eval", str(last), "--json"])
    assert out.exit_code == 0, out.output
    payload = json.loads(out.output)
    # the saved checkpoint reproduces the PSNR evaluated at the end of training, exactly
    chelsea = next(row for row in payload["per_image"] if row["name"] == "chelsea")
    assert result.final is not None and chelsea["psnr"] == result.final.per_image[0]["psnr"]
    assert payload["sls_achieved_budget"] <= 0.3
    text = CliRunner().invoke(app, ["eval", str(last)])
    assert "achieved" in text.output and "N:M" in text.output
