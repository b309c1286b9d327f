"""PNG's benchmark rows (method ``png``): one multi-task network for SR x2/x3/x4 (or, with
``BenchConfig.task = "denoise"``, for Gaussian denoising at sigma 15/25/50) against separate models.

Protocol: the harness's data (built-in photos, or ``data_root``'s train split); validated at the end
of each phase on held-out training data (or the valid split), logs only; scored on the test images
(Y PSNR/SSIM, crop = scale, per image and per fixed tile); nothing is selected on the test images.

* **PNG**: ``<model>_multiscale`` (the harness model's trunk shared by x2/x3/x4, one upsampler per
  task), M = ``m``, N_t = ``ns``, ``max_grow`` free positions per group for later tasks. Task x2:
  ``dense`` steps dense, prune, ``finetune`` steps; x3 and x4: ``grow`` steps with the earlier
  tasks' positions frozen, prune, ``finetune`` steps.
* **dense**: per task, the same network trained on that task alone from PNG's own dense start (its
  weights after the x2 dense phase) for the steps PNG spends on the task after that point (x2: its
  fine-tune; x3, x4: grow + fine-tune, with PNG's lr drops); see :func:`dense_baseline_recipe`. The
  x3/x4 baselines thus get EDSR's practice (x3/x4 initialised from a trained x2 model), as PNG does.

The producer returns six rows (``task`` = ``sr_x2``/``sr_x3``/``sr_x4``, method ``dense``/``png``);
PNG rows carry ``psnr_minus_dense`` and ``vs_dense``, the paired tile interval. The x3 rows carry the training-step time of PNG (earlier tasks'
positions frozen) against the dense x3 model, measured interleaved in this process.

Denoising: the harness model at scale 1 (no task-specific layers; every prunable layer is shared)
with PNG tasks ``sigma15``/``sigma25``/``sigma50``, each trained on its own noise level; rows
``denoise_sigma15``... (RGB PSNR/SSIM, no crop), timing on ``sigma25``.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from nmrestore.bench.config import (
    ROW_KEYS,
    BenchConfig,
    Row,
    data_section,
    default_cache_dir,
    ensure_trained,
    recipe_digest,
    task_section,
    test_source,
    train_section,
)
from nmrestore.bench.context import BenchContext, per_image_columns, register_row_producer
from nmrestore.bench.evidence import compare
from nmrestore.bench.steps import Timed, measure_step_times
from nmrestore.cost import count_cost
from nmrestore.engine.checkpoint import upgrade_legacy_checkpoints
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.runner import build_eval_dataset, build_train_dataset, model_from_checkpoint
from nmrestore.errors import NMRestoreError
from nmrestore.methods.png import PNGConfig
from nmrestore.methods.png.controller import PNGController
from nmrestore.methods.png.program import evaluate_tasks, png_schedule, task_recipe, train_png
from nmrestore.methods.png.storage import png_storage
from nmrestore.methods.png.tasks import select_task
from nmrestore.recipes.schema import Recipe, recipe_from_dict
from nmrestore.sparsity import check_nm

#: (task name, scale) in training order.
TASKS: tuple[tuple[str, int], ...] = (("x2", 2), ("x3", 3), ("x4", 4))

#: Denoising PNG tasks: (task name, noise sigma on the 0..255 scale) in training order.
NOISE_TASKS: tuple[tuple[str, float], ...] = (("sigma15", 15.0), ("sigma25", 25.0), ("sigma50", 50.0))


def recipe_tasks(recipe: Recipe) -> list[tuple[str, int]]:
    """(task name, scale) of a benchmark PNG recipe, in training order."""
    if recipe.task.kind == "denoise":
        assert isinstance(recipe.sparsity, PNGConfig) and recipe.sparsity.tasks is not None
        return [(name, 1) for name in recipe.sparsity.tasks]
    return list(TASKS)


def _row_task(recipe: Recipe, task: str) -> str:
    return f"denoise_{task}" if recipe.task.kind == "denoise" else f"sr_{task}"


class PNGBenchSettings(BaseModel):
    """How long each PNG phase trains, and the N:M setting (defaults: the documented CPU run)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dense: int = Field(1000, ge=1, description="task x2's dense steps before its prune")
    grow: int = Field(400, ge=1, description="x3/x4: steps with earlier positions frozen, before the prune")
    finetune: int = Field(200, ge=1, description="steps after every task's prune")
    m: int = Field(8, ge=2)
    ns: tuple[int, ...] = (4, 4, 4)
    max_grow: int | None = Field(1, ge=0)


#: The smoke-sized schedule used when the harness runs with ``quick``.
QUICK_SETTINGS = PNGBenchSettings(dense=40, grow=20, finetune=10)


def png_recipe(config: BenchConfig, settings: PNGBenchSettings) -> Recipe:
    """The PNG run: ``<model>_multiscale`` over x2, x3, x4 (denoising: ``<model>`` at scale 1 over
    sigma 15, 25, 50) with the harness's data and lr."""
    denoise = config.task == "denoise"
    if config.task not in ("sr", "denoise"):
        raise NMRestoreError(
            f"PNG benchmark rows cover SR scales and denoising levels, not task {config.task!r}"
        )
    model: dict[str, Any] = (
        {"name": config.model, "scale": 1, "kwargs": dict(config.model_kwargs)}
        if denoise
        else {
            "name": f"{config.model}_multiscale",
            "scale": 2,
            "kwargs": {**config.model_kwargs, "tasks": [s for _, s in TASKS]},
        }
    )
    extra: dict[str, Any] = {"task": {"kind": "denoise", "sigma": NOISE_TASKS[0][1]}} if denoise else {}
    return recipe_from_dict(
        {
            "name": "bench-png",
            "seed": config.seed,
            **extra,
            "model": model,
            # validated at the end of each phase (logs only) on held-out training data or the valid split
            "data": data_section(config),
            "train": {
                "steps": 1,  # unused by PNG: the phases' steps are in sparsity.steps
                "lr": config.dense_lr,
                "schedule": {"kind": "multistep", "milestones": [0.6, 0.85], "gamma": 0.5},
                "val_every": 1_000_000,  # scored once at the end of every phase (logs only)
                "ckpt_every": 100,
                "log_every": 25,
                "device": "cpu",
                "threads": config.threads,
            },
            "sparsity": {
                "method": "png",
                "m": settings.m,
                "ns": list(settings.ns),
                **({"tasks": [name for name, _ in NOISE_TASKS]} if denoise else {}),
                "max_grow": settings.max_grow,
                "steps": {
                    "dense": settings.dense,
                    "grow": settings.grow,
                    "finetune": settings.finetune,
                    "finetune_lr_factor": 0.2,
                },
            },
        },
        "benchmark PNG recipe",
    )


def task_steps(recipe: Recipe) -> dict[str, int]:
    """Optimizer steps PNG spends on each task (what each dense baseline gets)."""
    tasks = recipe_tasks(recipe)
    names = [name for name, _ in tasks]
    out = dict.fromkeys(names, 0)
    for phase in png_schedule(recipe, names, [s for _, s in tasks]):
        out[phase.task_name] += phase.steps
    return out


def dense_start(recipe: Recipe, run_dir: Path) -> Path:
    """The checkpoint every dense baseline starts from: PNG's own first phase (task 1 trained dense)."""
    tasks = recipe_tasks(recipe)
    first = png_schedule(recipe, [n for n, _ in tasks], [s for _, s in tasks])[0]
    return run_dir / "phases" / first.name / "checkpoints" / "last.safetensors"


def dense_baseline_recipe(config: BenchConfig, png: Recipe, run_dir: Path, index: int) -> Recipe:
    """Task ``index``'s dense baseline: PNG's network and dense start, trained on that task alone.

    It starts from the weights PNG has after its first phase (task 1 trained dense) and gets the
    steps and learning rates PNG spends on the task after that point: task 1 its fine-tune (at
    the fine-tune lr), a later task its grow phase then its fine-tune (lr, then the fine-tune lr).
    Same start, same steps, no pruning: what PNG's sharing and sparsity cost is the only difference.
    """
    assert isinstance(png.sparsity, PNGConfig)
    steps = png.sparsity.steps
    name, scale = recipe_tasks(png)[index]
    if index == 0:  # PNG's fine-tune phase of task 1 without the prune: its steps, lr and schedule
        train = train_section(
            config, steps.finetune, config.dense_lr * steps.finetune_lr_factor, [0.6, 0.85]
        )
    else:  # the grow phase's steps and halvings, then a lower lr for as long as PNG fine-tunes
        grow = steps.grow
        train = train_section(
            config, grow + steps.finetune, config.dense_lr, [0.6 * grow, 0.85 * grow, grow]
        )
    train["init_from"] = str(dense_start(png, run_dir))
    sigma = png.task.for_png_task(name).sigma if png.task.kind == "denoise" else None
    task = {"task": {"kind": "denoise", "sigma": sigma}} if sigma is not None else task_section(config)
    return recipe_from_dict(
        {
            "name": f"bench-png-dense-{name}",
            "seed": config.seed,
            **task,
            "model": {**png.model.model_dump(mode="json"), "scale": scale},
            "data": data_section(config),
            "train": train,
        },
        "benchmark PNG dense baseline recipe",
    )


def run_png(recipe: Recipe, show_progress: bool = False, cache_dir: Path | None = None) -> Path:
    """Train (or resume, or reuse from the cache) the PNG run; returns its folder."""
    run_dir = (cache_dir or default_cache_dir()) / f"png-{recipe_digest(recipe)}"
    if run_dir.is_dir():
        upgrade_legacy_checkpoints(run_dir)  # cached before checkpoints' digest covered metadata
    if not (run_dir / "final.json").is_file():
        train_png(recipe, run_dir, resume=True, show_progress=show_progress)
    return run_dir


def step_times(png_model: nn.Module, recipe: Recipe, dense_x3: nn.Module, rounds: int) -> dict[str, float]:
    """Training-step time of PNG (task 2: x3 or sigma25, earlier positions frozen) against its dense model."""
    config = recipe.sparsity
    assert isinstance(config, PNGConfig)
    tasks = recipe_tasks(recipe)
    controller = PNGController(png_model, config, tuple(name for name, _ in tasks))
    controller.begin(1, "finetune", fresh=False)
    data = recipe.data.train
    name, scale = tasks[1]
    dataset = build_train_dataset(task_recipe(recipe, scale, task=name))
    samples = [dataset[i] for i in range(data.batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("lq", "gt")}
    select_task(png_model, 1)
    try:
        timings = measure_step_times(
            {"dense": Timed(dense_x3), "png": Timed(png_model, controller)}, batch, rounds, warmup=2
        )
    finally:
        controller.end()
    return {
        "dense_ms": timings.median("dense") * 1e3,
        "png_ms": timings.median("png") * 1e3,
        "ratio": timings.ratio("png", "dense"),
    }


def png_rows(
    run_dir: Path,
    recipe: Recipe,
    dense_paths: dict[str, Path],
    per_task: dict[str, int],
    config: BenchConfig,
) -> tuple[nn.Module, list[Row], dict[str, nn.Module]]:
    """Rows (``ROW_KEYS`` + ``psnr_minus_dense`` + ``vs_dense``): dense and PNG per task, scored on the
    benchmark's test images (per image and per fixed tile, for the paired interval)."""
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    model.eval()
    check_nm(model)
    test = test_source(config)
    results = evaluate_tasks(model, recipe, source=test, tile=config.ci_tile)
    storage = png_storage(model)
    rows: list[Row] = []
    dense_models: dict[str, nn.Module] = {}
    sr = recipe.task.kind == "sr"
    tasks = recipe_tasks(recipe)
    for t, (task, scale) in enumerate(tasks):
        dense_model, _ = model_from_checkpoint(dense_paths[task])
        dense_model.eval()
        dense_models[task] = dense_model
        val = build_eval_dataset(test, scale, recipe.task.for_png_task(task))
        crop = scale if sr else 0
        dense_result: EvalResult = evaluate_model(
            dense_model, val, crop, sr, with_ssim=True, tile=config.ci_tile
        )
        dense_cost = count_cost(dense_model)
        info = storage.tasks[t]
        png_result = results[task]
        base: Row = dict.fromkeys(ROW_KEYS)
        base.update({"task": _row_task(recipe, task), "scale": scale, "finetune_steps": per_task[task]})
        dense_row: Row = {
            **base,
            **per_image_columns(dense_result),
            "model": recipe.model.name,
            "method": "dense",
            "budget": 1.0,
            "psnr": dense_result.psnr,
            "ssim": dense_result.ssim,
            "macs_g": dense_cost.macs() / 1e9,
            "macs_fraction": 1.0,
            "prunable_macs_fraction": 1.0,
            "params": dense_cost.params,
            "params_nonzero": dense_cost.nonzero_params(),
            "packed_bytes": info.dense_model_bytes,
            "note": f"trained on {task} alone from PNG's dense {tasks[0][0]} start, {per_task[task]} steps",
        }
        rows.append(dense_row)
        rows.append(
            {
                **base,
                **per_image_columns(png_result),
                "model": recipe.model.name,
                "method": "png",
                "budget": f"{info.n}:{info.m}",
                "psnr": png_result.psnr,
                "ssim": png_result.ssim,
                "macs_g": info.macs / 1e9,
                "macs_fraction": info.macs / dense_cost.dense_macs,
                "prunable_macs_fraction": info.prunable_macs_fraction,
                "params": info.dense_model_bytes // 4,
                "params_nonzero": info.params_nonzero,
                "packed_bytes": info.nm_model_bytes,
                "psnr_minus_dense": png_result.psnr - dense_result.psnr,
                "vs_dense": _paired(png_result, dense_row),
                "note": f"one network for {'/'.join(name for name, _ in tasks)}, storage "
                f"{storage.summary()['png_vs_one_dense']:.3f}x "
                "one dense model; packed B = this task alone",
            }
        )
    return model, rows, dense_models


def _paired(result: EvalResult, reference: Row) -> dict[str, Any] | None:
    delta = compare(per_image_columns(result), reference)
    return None if delta is None else delta.to_dict()


def prepare(
    config: BenchConfig, settings: PNGBenchSettings, echo: Any = None
) -> tuple[Recipe, Path, dict[str, Path]]:
    """Train (or reuse) the PNG run, then the dense baselines from its dense start; returns
    (recipe, run dir, dense paths)."""
    recipe = png_recipe(config, settings)
    if echo:
        echo(f"PNG run ({recipe.model.name}, M={settings.m}, N={settings.ns}, max_grow={settings.max_grow})")
    run_dir = run_png(recipe, config.show_progress, config.cache_dir)
    dense_paths = {
        task: ensure_trained(dense_baseline_recipe(config, recipe, run_dir, index), config, echo).path
        for index, (task, _) in enumerate(recipe_tasks(recipe))
    }
    return recipe, run_dir, dense_paths


def bench_rows(
    context: BenchContext, budget: str | None, settings: PNGBenchSettings | None = None
) -> list[Row]:
    """The harness producer of method ``png``: six rows (dense and PNG for x2, x3, x4 or sigma 15, 25, 50)."""
    config = context.config
    chosen = settings or (QUICK_SETTINGS if config.quick else PNGBenchSettings())
    recipe, run_dir, dense_paths = prepare(config, chosen, context.say)
    model, rows, dense_models = png_rows(run_dir, recipe, dense_paths, task_steps(recipe), config)
    second = recipe_tasks(recipe)[1][0]
    timing = step_times(model, recipe, dense_models[second], config.timing_rounds)
    for row in rows:
        if row["task"] == _row_task(recipe, second):
            row["step_ms"] = timing[f"{row['method']}_ms"]
            row["step_time_ratio"] = timing["ratio"] if row["method"] == "png" else 1.0
    return rows


def register_bench_rows(settings: PNGBenchSettings | None = None) -> None:
    """Register (or re-register with other ``settings``) :func:`bench_rows` as method ``png``."""
    register_row_producer("png", per_budget=False, replace=True)(partial(bench_rows, settings=settings))


register_bench_rows()
