"""The Trainer through the recipe runner: training, validation, resume, NaN handling."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from nmrestore.engine.checkpoint import load_checkpoint
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.engine.trainer import lr_factor
from nmrestore.errors import RecipeError, TrainingError
from nmrestore.recipes import Schedule, recipe_from_dict
from nmrestore.sparsity import check_nm
from tests.conftest import tiny_recipe_dict


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_writes_checkpoints_logs_and_improves(tmp_path: Path, tiny_recipe: dict[str, Any]) -> None:
    result = train(recipe_from_dict(tiny_recipe), tmp_path / "run", show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert [r["step"] for r in records if "val_psnr" in r] == [4, 8]
    assert (tmp_path / "run" / "recipe.yaml").exists()
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.safetensors")
    assert best.meta["metrics"]["val_psnr"] == pytest.approx(result.state.best_psnr)
    assert json.loads((tmp_path / "run" / "final.json").read_text())["step"] == 8


def test_resume_after_interruption_ends_with_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmrestore.engine import task as task_module

    recipe = recipe_from_dict(tiny_recipe_dict(sparsity={"method": "srste", "n": 2, "m": 4}))
    full = train(recipe, tmp_path / "full", show_progress=False)

    calls = {"n": 0}
    real = task_module.RestorationTask.losses

    def interrupted(self: Any, model: Any, batch: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        if calls["n"] == 6:  # the 6th step: the last checkpoint is the one of step 4
            raise KeyboardInterrupt
        return real(self, model, batch)

    monkeypatch.setattr(task_module.RestorationTask, "losses", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, tmp_path / "cut", show_progress=False)
    monkeypatch.setattr(task_module.RestorationTask, "losses", real)
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").step == 4
    resumed = train(recipe, tmp_path / "cut", resume=True, show_progress=False)
    assert resumed.state.step == 8
    assert _states_equal(resumed.model.state_dict(), full.model.state_dict())
    check_nm(resumed.model)


def test_existing_run_needs_resume_and_same_recipe(tmp_path: Path, tiny_recipe: dict[str, Any]) -> None:
    recipe = recipe_from_dict(tiny_recipe)
    train(recipe, tmp_path / "run", show_progress=False)
    with pytest.raises(RecipeError, match="--resume"):
        train(recipe, tmp_path / "run", show_progress=False)
    other = recipe_from_dict({**tiny_recipe, "seed": 99})
    with pytest.raises(RecipeError, match="another recipe"):
        train(other, tmp_path / "run", resume=True, show_progress=False)


def test_nan_loss_stops_with_an_error_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, tiny_recipe: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from nmrestore.engine import task as task_module

    calls = {"n": 0}
    real = task_module.RestorationTask.losses

    def poisoned(self: Any, model: Any, batch: Any) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        losses = real(self, model, batch)
        return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 4 else losses

    monkeypatch.setattr(task_module.RestorationTask, "losses", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        train(recipe_from_dict(tiny_recipe), tmp_path / "run", show_progress=False)
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert last.step == 2
    assert all(torch.isfinite(v).all() for v in last.model_state.values() if v.is_floating_point())


def test_sparse_checkpoint_reloads_exactly_and_fine_tunes_from_dense(tmp_path: Path) -> None:
    dense = train(recipe_from_dict(tiny_recipe_dict()), tmp_path / "dense", show_progress=False)
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            sparsity={"method": "oneshot", "n": 2, "m": 4},
            train={"init_from": str(tmp_path / "dense" / "checkpoints" / "last.safetensors")},
        )
    )
    sparse = train(recipe, tmp_path / "sparse", show_progress=False)
    assert not _states_equal(dense.model.state_dict(), sparse.model.state_dict())
    reloaded, saved_recipe = model_from_checkpoint(tmp_path / "sparse" / "checkpoints" / "last.safetensors")
    assert saved_recipe.sparsity is not None and saved_recipe.sparsity.method == "oneshot"
    x = torch.rand(1, 3, 9, 9)
    sparse.model.eval()
    assert torch.equal(reloaded(x), sparse.model(x))
    check_nm(reloaded)


def test_lr_schedules() -> None:
    multistep = Schedule(kind="multistep", milestones=(0.5, 0.75), gamma=0.5)
    assert [lr_factor(multistep, s, 100) for s in (0, 49, 50, 75, 99)] == [1, 1, 0.5, 0.25, 0.25]
    cosine = Schedule(kind="cosine", min_lr=0.0)
    assert lr_factor(cosine, 0, 10) == 1 and lr_factor(cosine, 10, 10) == pytest.approx(0)
    assert lr_factor(Schedule(kind="constant"), 7, 10) == 1


def test_filter_pruned_checkpoint_reloads_with_its_pruned_shapes(tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        tiny_recipe_dict(
            model={"name": "edsr_small", "scale": 2, "kwargs": {"n_feats": 16, "n_blocks": 1}},
            sparsity={"method": "filter", "target_macs_fraction": 0.5},
            train={"steps": 2, "val_every": 2},
        )
    )
    result = train(recipe, tmp_path / "run", show_progress=False)
    reloaded, _ = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    x = torch.rand(1, 3, 9, 9)
    result.model.eval()
    assert torch.equal(reloaded(x), result.model(x))
