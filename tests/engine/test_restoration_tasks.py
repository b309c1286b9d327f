"""Deblurring and denoising through the recipe runner: every method trains, metrics are RGB/no-crop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nmrestore.data.restoration import DegradedEvalDataset, DegradedTrainDataset
from nmrestore.engine.evaluate import evaluate_model
from nmrestore.engine.runner import build_eval_dataset, build_train_dataset, model_from_checkpoint, train
from nmrestore.errors import RecipeError
from nmrestore.metrics import psnr
from nmrestore.recipes import recipe_from_dict
from nmrestore.sparsity import check_nm
from tests.conftest import tiny_recipe_dict

TINY = {"n_feats": 8, "n_blocks": 1}
TASKS: dict[str, dict[str, Any]] = {
    "deblur": {"kind": "deblur", "blur": {"kernel_size": 5}},
    "denoise": {"kind": "denoise", "sigma": 25},
}
CLASSPRUNING = {
    "method": "classpruning",
    "m": 4,
    "routes": [1, 2, 4],
    "classifier_channels": 8,
    "classifier_convs": 1,
    "patch_size": 16,
    "stride": 12,
    "label_stride": 16,
    "classifier_steps": 2,
    "classifier_batch": 8,
    "joint_steps": 2,
    "holdout_fraction": 0.2,
}
METHODS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "oneshot": {"method": "oneshot", "n": 2, "m": 4},
    "srste": {"method": "srste", "n": 2, "m": 8},
    "sls": {
        "method": "sls",
        "m": 8,
        "budget": 0.5,
        "search_steps": 2,
        "refresh_every": 2,
        "anneal_interval": 1,
    },
    "filter": {"method": "filter", "budget": "2:4"},
    "classpruning": CLASSPRUNING,
}


def _recipe(task: str, sparsity: dict[str, Any] | None = None, **sections: Any) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "model": {"name": "edsr_small", "scale": 1, "kwargs": TINY},
        "train": {"steps": 4, "val_every": 4, "ckpt_every": 4, "log_every": 2},
    }
    data = tiny_recipe_dict(task=TASKS[task], **{**defaults, **sections})
    if sparsity is not None:
        data["sparsity"] = sparsity
    if sparsity is not None and sparsity["method"] == "classpruning":
        data["data"]["train"]["patch_size"] = 16
    return data


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_on_the_task(task: str, method: str, tmp_path: Path) -> None:
    recipe = recipe_from_dict(_recipe(task, METHODS[method]))
    result = train(recipe, tmp_path / "run", show_progress=False)
    assert result.final is not None and torch.isfinite(torch.tensor(result.final.psnr))
    model, saved = model_from_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")
    assert saved.task.kind == task and saved.model.scale == 1
    x = torch.rand(1, 3, 11, 13)
    with torch.no_grad():
        assert model.eval()(x).shape == x.shape  # scale 1: the output has the input's size
    if method in ("oneshot", "srste", "sls"):
        check_nm(model)


@pytest.mark.parametrize("task", list(TASKS))
def test_png_tasks_on_deblur_and_denoise(task: str, tmp_path: Path) -> None:
    """Denoising: one network for sigma 15 and 50, each task trained and scored at its own level."""
    names = ["sigma15", "sigma50"] if task == "denoise" else ["n2", "n1"]
    sparsity = {
        "method": "png",
        "m": 4,
        "ns": [2, 2],
        "tasks": names,
        "steps": {"dense": 3, "grow": 2, "finetune": 1},
    }
    recipe = recipe_from_dict(_recipe(task, sparsity))
    result = train(recipe, tmp_path / "run", show_progress=False)
    assert list(result.tasks) == names  # type: ignore[attr-defined]
    if task == "denoise":
        from nmrestore.methods.png.program import task_recipe

        noisy = [build_eval_dataset(recipe.data.val, 1, recipe.task.for_png_task(n))[0] for n in names]
        levels = [float(((s["lq"] - s["gt"]) * 255).std()) for s in noisy]
        assert levels[0] == pytest.approx(15, rel=0.05) and levels[1] == pytest.approx(50, rel=0.05)
        phase = build_train_dataset(task_recipe(recipe, 1, task="sigma50"))
        assert isinstance(phase, DegradedTrainDataset) and phase.degradation.sigma == 50  # type: ignore[union-attr]
        from nmrestore.cli.evaluation import evaluate_checkpoint

        last = tmp_path / "run" / "checkpoints" / "last.safetensors"
        scored = evaluate_checkpoint(last, None, None, task="sigma50")
        assert (
            scored["task_label"] == "denoise (sigma 50)"
            and scored["task"] == "sigma50"
            and scored["metric"] == "RGB"
        )
        # the recipe validates on the first test photo: the same noisy input as `eval --task sigma50`
        trained = result.tasks["sigma50"].per_image[0]["psnr"]  # type: ignore[attr-defined]
        assert scored["per_image"][0]["psnr"] == pytest.approx(trained, abs=1e-9)
        default = evaluate_checkpoint(last, None, None)  # the saved model runs task 1: scored at sigma 15
        assert default["task_label"] == "denoise (sigma 15)"


def test_png_denoise_task_names_must_be_noise_levels() -> None:
    bad = _recipe("denoise", {"method": "png", "m": 4, "ns": [2, 2], "tasks": ["low", "high"]})
    with pytest.raises(RecipeError, match="must name its noise level"):
        recipe_from_dict(bad)


@pytest.mark.parametrize("task", list(TASKS))
def test_tasks_pick_rgb_no_crop_metrics(task: str, tmp_path: Path) -> None:
    recipe = recipe_from_dict(
        _recipe(task, train={"steps": 2, "val_every": 2, "ckpt_every": 2, "log_every": 2})
    )
    assert recipe.eval.crop_border == 0 and recipe.eval.test_y_channel is False
    result = train(recipe, tmp_path / "run", show_progress=False)
    val = build_eval_dataset(recipe.data.val, 1, recipe.task)
    assert isinstance(val, DegradedEvalDataset)
    rgb = evaluate_model(result.model, val, 0, test_y_channel=False)
    y_crop = evaluate_model(result.model, val, 4, test_y_channel=True)
    assert result.final is not None
    assert result.final.psnr == rgb.psnr != y_crop.psnr
    sample = val[0]
    with torch.no_grad():
        out = result.model.eval()(sample["lq"][None]).clamp(0, 1)[0]
    assert float(rgb.per_image[0]["psnr"]) == psnr(out, sample["gt"])  # RGB, every pixel


def test_explicit_eval_settings_win_and_sr_is_unchanged() -> None:
    recipe = recipe_from_dict(_recipe("deblur", eval={"test_y_channel": True}))
    assert recipe.eval.test_y_channel is True and recipe.eval.crop_border == 0
    sr = recipe_from_dict(tiny_recipe_dict())
    assert sr.eval.crop_border is None and sr.eval.test_y_channel is True and sr.task.kind == "sr"
    assert "task" not in sr.model_dump()  # SR recipes (checkpoints, cache hashes) dump as before


def test_deblurring_nets_train_with_nm(tmp_path: Path) -> None:
    """DMPHN and U-Net presets (narrowed) through one-shot N:M: padded inside, output = input size."""
    for name, kwargs in (("dmphn_small", {"widths": [8, 8, 8]}), ("unet_small", {"widths": [8, 8, 16]})):
        data = _recipe(
            "deblur",
            {"method": "oneshot", "n": 2, "m": 4},
            model={"name": name, "scale": 1, "kwargs": kwargs},
        )
        data["data"]["train"]["patch_size"] = 10  # not a multiple of the nets' downsampling
        result = train(recipe_from_dict(data), tmp_path / name, show_progress=False)
        assert result.report is not None and result.report.pruned
        check_nm(result.model)
