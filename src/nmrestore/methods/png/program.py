"""The PNG schedule (docs/ARCHITECTURE.md): task after task, phase after phase, resumable anywhere.

What ``nmrestore train`` runs for ``sparsity.method: png``. Phases, in order::

    00-x2-train     task 1 dense (sparsity.steps.dense steps; 0 = start from train.init_from)
    01-x2-finetune  prune task 1 to N_1:M, fine-tune (steps.finetune)
    02-x3-train     grow into the free positions, earlier positions frozen (steps.grow)
    03-x3-finetune  prune task 2 to N_2:M over (earlier + grown), fine-tune
    ...

Each phase is one :class:`~nmrestore.engine.trainer.Trainer` run on the task's data (the recipe's
data at the task's scale) in ``<run>/phases/<phase>/``, with its own checkpoints; a phase that
finished writes ``done.json``. Resuming skips finished phases, reloads the last finished state and
continues a half-done phase from its last checkpoint (the Trainer restores optimizer, RNG and
data position; the controller re-enters the phase). Every phase starts from a seed derived from
the recipe's, so a run resumed at any point ends with the same weights as an uninterrupted one.

The final model (all tasks pruned) goes to ``<run>/checkpoints/{last,best}.safetensors`` (one
file; nothing is selected on validation images), per-task PSNR/SSIM, MACs and the storage report
to ``<run>/final.json`` and ``<run>/png_storage.txt``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmrestore.cost import CostReport
from nmrestore.data.loader import build_train_loader
from nmrestore.engine.checkpoint import Checkpoint, load_checkpoint, load_model_state, save_checkpoint
from nmrestore.engine.distributed import DistInfo, barrier, distributed_run
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.hooks import MethodHooks
from nmrestore.engine.runner import (
    RunResult,
    apply_sparsity,
    base_model,
    build_eval_dataset,
    build_train_dataset,
    build_val_dataset,
    model_from_checkpoint,
    seed_everything,
)
from nmrestore.engine.task import RestorationTask
from nmrestore.engine.trainer import Trainer, TrainState
from nmrestore.errors import CheckpointError, RecipeError, SparsityError
from nmrestore.io_atomic import atomic_write_bytes, atomic_write_text
from nmrestore.methods.png.config import Phase, PNGConfig
from nmrestore.methods.png.controller import PNGController
from nmrestore.methods.png.storage import PNGStorage, png_eval_extras, png_storage
from nmrestore.methods.png.tasks import activate_task, active_route, png_layer_table, select_task
from nmrestore.models.multitask import MultiTaskSR, load_single_task_state
from nmrestore.recipes.schema import DataSource, Recipe, TaskSpec, TrainSpec
from nmrestore.sparsity.api import (
    SparsifyReport,
    squash_,
)

log = logging.getLogger("nmrestore.png")


@dataclass(frozen=True)
class PhaseSpec:
    """One phase of the schedule."""

    index: int
    task: int
    task_name: str
    scale: int
    phase: Phase
    steps: int
    lr: float

    @property
    def name(self) -> str:
        return f"{self.index:02d}-{self.task_name}-{self.phase}"


@dataclass
class PNGRunResult(RunResult):
    """A finished PNG run: ``final`` is task 1's score; ``tasks`` every task's; ``storage`` the bytes."""

    tasks: dict[str, EvalResult] = field(default_factory=dict)
    storage: PNGStorage | None = None


def png_config(recipe: Recipe) -> PNGConfig:
    """The recipe's PNG config (a :class:`RecipeError` when the recipe is not a PNG one)."""
    if not isinstance(recipe.sparsity, PNGConfig):
        raise RecipeError(f"recipe {recipe.name!r} is not a PNG recipe (sparsity.method must be 'png')")
    return recipe.sparsity


def task_scales(model: nn.Module, recipe: Recipe, count: int) -> list[int]:
    """Scale of each task: a multi-task model's own, else the recipe's scale for every task."""
    if isinstance(model, MultiTaskSR):
        return list(model.task_scales.values())
    return [recipe.model.scale] * count


def png_schedule(recipe: Recipe, tasks: list[str], scales: list[int]) -> list[PhaseSpec]:
    """Every phase of the run, in order (task 1: dense + finetune; later tasks: grow + finetune)."""
    config = png_config(recipe)
    lr, ft_lr = recipe.train.lr, recipe.train.lr * config.steps.finetune_lr_factor
    phases: list[PhaseSpec] = []
    for t, (task, scale) in enumerate(zip(tasks, scales, strict=True)):
        train_steps = config.steps.dense if t == 0 else config.steps.grow
        phases.append(PhaseSpec(len(phases), t, task, scale, "train", train_steps, lr))
        phases.append(PhaseSpec(len(phases), t, task, scale, "finetune", config.steps.finetune, ft_lr))
    return phases


def task_recipe(recipe: Recipe, scale: int, seed_offset: int = 0, task: str | None = None) -> Recipe:
    """``recipe`` at ``scale`` (the task's data) with its seed shifted (a phase's own data stream).

    ``task`` (a PNG task name) sets a denoising recipe's noise level: task ``sigma50`` trains on sigma 50.
    """
    model = recipe.model.model_copy(update={"scale": scale})
    spec = recipe.task if task is None else recipe.task.for_png_task(task)
    return recipe.model_copy(update={"model": model, "seed": recipe.seed + seed_offset, "task": spec})


def build_png_model(recipe: Recipe) -> tuple[nn.Module, SparsifyReport]:
    """The multi-task model of ``recipe`` with its initial weights (``train.init_from``) and PNG masks."""
    config = png_config(recipe)
    model = base_model(recipe)
    if recipe.train.init_from is not None:
        load_initial_weights(model, recipe.train.init_from)
    report = apply_sparsity(model, recipe)
    assert report is not None and isinstance(report.controller, PNGController)
    if len(report.controller.tasks) != len(config.ns):  # pragma: no cover - checked by the handler
        raise SparsityError("tasks and ns differ in length")
    return model, report


def load_initial_weights(model: nn.Module, path: str | Path) -> None:
    """Start task 1 from a trained dense model: a single-task one of the first task's scale (its
    upsampler goes to the first task) or a dense multi-task one of the same architecture."""
    ckpt = load_checkpoint(path)
    source, source_recipe = model_from_checkpoint(ckpt)
    squash_(source)
    state = source.state_dict()
    if isinstance(source, MultiTaskSR) or not isinstance(model, MultiTaskSR):
        load_model_state(model, state, str(path))
        return
    first = model.tasks[0]
    if source_recipe.model.scale != model.task_scales[first]:
        raise CheckpointError(
            f"{path} is a x{source_recipe.model.scale} model; the first task is {first}, so init_from must be "
            f"a x{model.task_scales[first]} model"
        )
    try:
        load_single_task_state(model, state, first)
    except Exception as exc:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: {exc}") from exc


def _phase_dir(run_dir: Path, spec: PhaseSpec) -> Path:
    return run_dir / "phases" / spec.name


def _phase_last(run_dir: Path, spec: PhaseSpec) -> Path:
    return _phase_dir(run_dir, spec) / "checkpoints" / "last.safetensors"


def _load_phase(model: nn.Module, path: Path, recipe: Recipe) -> None:
    ckpt = load_checkpoint(path)
    _check_recipe(ckpt, recipe)
    load_model_state(model, ckpt.model_state, str(path))


def _check_recipe(ckpt: Checkpoint, recipe: Recipe) -> None:
    if ckpt.meta.get("recipe") != json.loads(json.dumps(recipe.model_dump(mode="json"))):
        raise RecipeError(
            f"{ckpt.path} was trained with another recipe; resume with the recipe saved in its run folder"
        )


def train_png(
    recipe: Recipe, run_dir: str | Path, resume: bool = False, show_progress: bool = True
) -> PNGRunResult:
    """Run the whole PNG schedule of ``recipe`` into ``run_dir`` (resumable, one process or DDP)."""
    run_dir = Path(run_dir)
    with distributed_run(recipe.train.device) as dist:
        return _train_png(recipe, run_dir, resume, show_progress, dist)


def _train_png(
    recipe: Recipe, run_dir: Path, resume: bool, show_progress: bool, dist: DistInfo
) -> PNGRunResult:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    png_config(recipe)
    started = (run_dir / "phases").is_dir() or (run_dir / "checkpoints" / "last.safetensors").exists()
    if started and not resume:
        raise RecipeError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another folder"
        )
    seed_everything(recipe.seed + dist.rank)
    model, report = build_png_model(recipe)
    controller = report.controller
    assert isinstance(controller, PNGController)
    model.to(dist.device)
    tasks = list(controller.tasks)
    scales = task_scales(model, recipe, len(tasks))
    phases = png_schedule(recipe, tasks, scales)
    if phases[0].steps == 0 and recipe.train.init_from is None:
        raise RecipeError(
            "sparsity.steps.dense is 0: task 1 must start from a trained model (set train.init_from)"
        )
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        atomic_write_text(
            run_dir / "sparsity.txt",
            report.table() + "\n(N stays M until a task is pruned; the finished run rewrites this file)\n",
        )

    meta_base: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"),
        "sparsity": png_config(recipe).model_dump(mode="json"),
    }
    # keyed by task: denoising tasks share the scale but not the noise level
    crop_of = {
        t: (recipe.eval.crop_border if recipe.eval.crop_border is not None else s)
        for t, s in zip(tasks, scales, strict=True)
    }
    val_sets = {
        t: build_val_dataset(recipe, s, recipe.task.for_png_task(t))
        for t, s in zip(tasks, scales, strict=True)
    }
    state = TrainState()
    holds = -1  # the phase whose final weights the model holds (-1: the initial weights)
    for spec in phases:
        phase_dir = _phase_dir(run_dir, spec)
        last = _phase_last(run_dir, spec)
        if (phase_dir / "done.json").is_file() and last.is_file():
            continue
        if spec.index > 0 and holds != spec.index - 1:
            _load_phase(model, _phase_last(run_dir, phases[spec.index - 1]), recipe)
        saved = load_checkpoint(last) if last.is_file() else None
        if saved is not None:
            _check_recipe(saved, recipe)
            load_model_state(model, saved.model_state, str(last))
        seed_everything(recipe.seed + 1000 * spec.index + dist.rank)
        controller.begin(spec.task, spec.phase, fresh=saved is None)
        meta = {
            **meta_base,
            "model": {"name": recipe.model.name, "scale": spec.scale},
            "png": {"phase": spec.name, "task": spec.task_name},
        }
        log.info(
            "PNG phase %s: %d steps at lr %g (%d trainable entries)",
            spec.name,
            spec.steps,
            spec.lr,
            controller.trainable_count(),
        )
        if spec.steps > 0:
            state = _run_phase(
                recipe,
                spec,
                model,
                controller,
                meta,
                phase_dir,
                saved,
                val_sets,
                crop_of,
                show_progress,
                dist,
            )
        elif dist.is_main:
            save_checkpoint(last, model, {**meta, "step": 0, "controller": controller.state_dict()})
        controller.end()
        if dist.is_main:
            atomic_write_text(
                phase_dir / "done.json", json.dumps({"phase": spec.name, "steps": spec.steps}, indent=2)
            )
        barrier(dist)
        holds = spec.index
    if holds != len(phases) - 1:  # every phase was finished before: take the last one's weights
        _load_phase(model, _phase_last(run_dir, phases[-1]), recipe)
    controller.end()
    controller.phase = None
    select_task(model, 0)
    return _finish(recipe, run_dir, model, report, controller, state, phases, val_sets, crop_of, dist)


def _run_phase(
    recipe: Recipe,
    spec: PhaseSpec,
    model: nn.Module,
    controller: PNGController,
    meta: dict[str, Any],
    phase_dir: Path,
    saved: Checkpoint | None,
    val_sets: dict[str, Any],
    crop_of: dict[str, int],
    show_progress: bool,
    dist: DistInfo,
) -> TrainState:
    phase_recipe = task_recipe(recipe, spec.scale, seed_offset=spec.index, task=spec.task_name)
    train_set = build_train_dataset(phase_recipe)
    per_process = max(1, recipe.data.train.batch_size // dist.world_size)
    loader = build_train_loader(
        train_set, per_process, recipe.data.train.num_workers, phase_recipe.seed, distributed=dist.distributed
    )
    train_spec = phase_train_spec(recipe.train, spec)
    val_set, crop = val_sets[spec.task_name], crop_of[spec.task_name]

    def validate(m: nn.Module) -> EvalResult:
        return evaluate_model(m, val_set, crop, recipe.eval.test_y_channel, dist.device, with_ssim=True)

    trainer = Trainer(
        model,
        RestorationTask(recipe.train.loss),
        loader,
        train_spec,
        phase_dir,
        meta,
        controller=controller,
        validate=validate,
        dist=dist,
        show_progress=show_progress,
    )
    if saved is not None:
        trainer.restore(saved)
        log.info("resumed PNG phase %s at step %d", spec.name, saved.step)
    return trainer.fit()


def phase_train_spec(train: TrainSpec, spec: PhaseSpec) -> TrainSpec:
    """The recipe's train section for one phase: its steps and lr; logging/checkpoints capped to it."""
    return train.model_copy(
        update={
            "steps": spec.steps,
            "lr": spec.lr,
            "val_every": min(train.val_every, spec.steps),
            "ckpt_every": min(train.ckpt_every, spec.steps),
            "log_every": min(train.log_every, spec.steps),
        }
    )


def evaluate_tasks(
    model: nn.Module,
    recipe: Recipe,
    device: torch.device | None = None,
    source: DataSource | None = None,
    tile: int | None = None,
) -> dict[str, EvalResult]:
    """Every task's PSNR/SSIM at its own scale on the recipe's validation images, or on ``source``
    (a benchmark's test images; ``tile``: also the PSNR of fixed HR tiles, for paired intervals)."""
    tasks = list(model.tasks) if isinstance(model, MultiTaskSR) else list(getattr(model, "png_tasks", ()))
    scales = task_scales(model, recipe, len(tasks))
    results: dict[str, EvalResult] = {}
    for t, (task, scale) in enumerate(zip(tasks, scales, strict=True)):
        crop = recipe.eval.crop_border if recipe.eval.crop_border is not None else scale
        spec = recipe.task.for_png_task(task)
        dataset = build_val_dataset(recipe, scale, spec) if source is None else build_eval_dataset(source, scale, spec)
        previous = model.task_index if isinstance(model, MultiTaskSR) else 0
        select_task(model, t)
        try:
            results[task] = evaluate_model(
                model, dataset, crop, recipe.eval.test_y_channel, device, with_ssim=True, tile=tile
            )
        finally:
            select_task(model, previous)
    return results


def _finish(
    recipe: Recipe,
    run_dir: Path,
    model: nn.Module,
    report: SparsifyReport,
    controller: PNGController,
    state: TrainState,
    phases: list[PhaseSpec],
    val_sets: dict[str, Any],
    crop_of: dict[str, int],
    dist: DistInfo,
) -> PNGRunResult:
    total_steps = sum(p.steps for p in phases)
    results: dict[str, EvalResult] = {}
    storage: PNGStorage | None = None
    if dist.is_main:
        meta = {
            "recipe": recipe.model_dump(mode="json"),
            "model": {"name": recipe.model.name, "scale": recipe.model.scale},
            "sparsity": png_config(recipe).model_dump(mode="json"),
            "png": {"phase": "done"},
            "step": total_steps,
            "controller": controller.state_dict(),
        }
        last = save_checkpoint(run_dir / "checkpoints" / "last.safetensors", model, meta)
        atomic_write_bytes(last.with_name("best.safetensors"), last.read_bytes())
        atomic_write_bytes(last.with_name("best.json"), last.with_suffix(".json").read_bytes())
        results = evaluate_tasks(model, recipe, dist.device)
        storage = png_storage(model)
        summary = {
            "step": total_steps,
            "phases": [{"phase": p.name, "steps": p.steps, "lr": p.lr} for p in phases],
            "tasks": {
                name: {
                    "psnr": r.psnr,
                    "ssim": r.ssim,
                    "n": t.n,
                    "m": t.m,
                    "macs_g": t.macs / 1e9,
                    "prunable_macs_fraction": t.prunable_macs_fraction,
                    "params_nonzero": t.params_nonzero,
                }
                for (name, r), t in zip(results.items(), storage.tasks, strict=True)
            },
            "storage": storage.summary(),
        }
        first = next(iter(results.values()))
        summary.update({"val_psnr": first.psnr, "val_ssim": first.ssim})
        atomic_write_text(run_dir / "final.json", json.dumps(summary, indent=2))
        atomic_write_text(run_dir / "png_storage.txt", storage.table() + "\n")
        dense = "\n".join(f"  dense   {d.name:<32} {d.kind:<16} {d.reason}" for d in report.dense)
        atomic_write_text(run_dir / "sparsity.txt", f"method png\n{png_layer_table(model)}\n{dense}\n")
        for name, r in results.items():
            log.info("PNG task %s: PSNR %.3f dB, SSIM %.4f", name, r.psnr, r.ssim)
    barrier(dist)
    final = next(iter(results.values())) if results else None
    return PNGRunResult(run_dir, model, state, report, controller, final, tasks=results, storage=storage)


def has_png_progress(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds (part of) a PNG run."""
    return (Path(run_dir) / "phases").is_dir()


class PNGHooks(MethodHooks):
    """``--task`` switches task layers and masks; a denoising task is scored at its own noise level."""

    def activate_task(self, model: nn.Module, task: str) -> int:
        return activate_task(model, task)

    def eval_task(self, model: nn.Module, spec: TaskSpec, task: str | None) -> TaskSpec:
        if spec.kind != "denoise":
            return spec
        return spec.for_png_task(task if task is not None else _active_task_name(model))

    def eval_extras(self, model: nn.Module, recipe: Recipe, cost: CostReport) -> dict[str, Any]:
        return png_eval_extras(model, cost)


def _active_task_name(model: nn.Module) -> str:
    """Name of the task a PNG model runs now (its masks' route)."""
    names = tuple(getattr(model, "png_tasks", ()))
    route = active_route(model)
    if not names or route >= len(names):
        raise CheckpointError("this PNG checkpoint does not name its tasks; pass --task")
    return names[route]
