"""From a recipe to a trained model: build the model, data and Trainer, train, and reload.

These are the few functions the CLI (and users' scripts) call; everything else is composed here.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmrestore.data.builtin import load_builtin
from nmrestore.data.datasets import ImageList, SREvalDataset, SRTrainDataset, load_folder, split_holdout
from nmrestore.data.loader import build_train_loader
from nmrestore.data.restoration import DegradedEvalDataset, DegradedTrainDataset
from nmrestore.engine.checkpoint import Checkpoint, check_compatible, load_checkpoint, load_model_state
from nmrestore.engine.distributed import DistInfo, distributed_run
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.runlock import run_lock
from nmrestore.engine.task import RestorationTask
from nmrestore.engine.trainer import Trainer, TrainState
from nmrestore.errors import CheckpointError, DatasetError, NMRestoreError, RecipeError, short_repr
from nmrestore.io_atomic import atomic_write_text
from nmrestore.models import create_model
from nmrestore.models.multitask import is_multitask
from nmrestore.models.registry import MAX_MODEL_BYTES, check_model_kwargs, check_model_size
from nmrestore.recipes.schema import DataSource, Recipe, TaskSpec, recipe_from_dict
from nmrestore.sparsity.api import Controller, NMConfig, SparsifyReport, sparsify_, squash_
from nmrestore.sparsity.parametrization import nm_layers

log = logging.getLogger("nmrestore")


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _images(source: DataSource, scale: int, default_split: str) -> tuple[ImageList, ImageList | None]:
    if source.source == "builtin":
        split = source.split or default_split
        if split not in ("train", "test"):
            raise RecipeError(f"the built-in set has splits 'train' and 'test', not {split!r}")
        gt, lq = load_builtin(split), None  # type: ignore[arg-type]
    else:
        assert source.root is not None
        pairs = load_folder(source.root, scale, split=source.split)
        gt, lq = pairs.gt, pairs.lq
    if source.max_images is not None:
        gt = gt[: source.max_images]
        lq = lq[: source.max_images] if lq is not None else None
    return gt, lq


#: What the training loop iterates: SR (or paired scale-1) patches, or patches degraded on the fly.
TrainDataset = SRTrainDataset | DegradedTrainDataset
EvalDataset = SREvalDataset | DegradedEvalDataset


def build_train_dataset(recipe: Recipe) -> TrainDataset:
    """The recipe's training patches: LR/HR pairs for SR, and for deblurring/denoising either the
    source's own pairs (GoPro, ``lq/`` + ``gt/``) or the task's degradation applied on the fly."""
    spec = recipe.data.train
    gt, lq = _images(spec, recipe.model.scale, "train")
    if recipe.data.val is None:  # the bottom strips are the validation set: never trained on
        (gt, lq), _ = _holdout(recipe, gt, lq, recipe.model.scale)
    degradation = recipe.task.degradation()
    if degradation is not None and lq is None:
        return DegradedTrainDataset(gt, degradation, spec.patch_size, spec.samples_per_epoch, recipe.seed, spec.augment)
    return SRTrainDataset(
        gt, recipe.model.scale, spec.patch_size, spec.samples_per_epoch, recipe.seed, lr_images=lq, augment=spec.augment
    )


def _holdout(
    recipe: Recipe, gt: ImageList, lq: ImageList | None, scale: int
) -> tuple[tuple[ImageList, ImageList | None], tuple[ImageList, ImageList | None]]:
    # at least one LR patch of rows stays on each side, so every image still yields training patches
    return split_holdout(gt, lq, scale, recipe.data.holdout, recipe.data.train.patch_size)


def build_val_dataset(recipe: Recipe, scale: int | None = None, task: TaskSpec | None = None) -> EvalDataset:
    """The recipe's validation images: ``data.val``, or else the held-out bottom strips of the training
    images (``data.holdout``). ``scale``/``task`` default to the recipe's (PNG validates per task)."""
    scale = recipe.model.scale if scale is None else scale
    task = recipe.task if task is None else task
    if recipe.data.val is not None:
        return build_eval_dataset(recipe.data.val, scale, task)
    gt, lq = _images(recipe.data.train, scale, "train")
    _, (held_gt, held_lq) = _holdout(recipe, gt, lq, scale)
    if not held_gt:
        raise DatasetError(
            f"data.holdout {recipe.data.holdout}: the training images are too small to hold out a strip of "
            f"{recipe.data.train.patch_size} LR rows; give a data.val set instead"
        )
    degradation = task.degradation()
    if degradation is not None and held_lq is None:
        return DegradedEvalDataset(held_gt, degradation)
    return SREvalDataset(held_gt, scale, lr_images=held_lq)


def build_eval_dataset(source: DataSource, scale: int, task: TaskSpec | None = None) -> EvalDataset:
    """Whole evaluation images for ``task`` (SR when None): the source's pairs, bicubic LR, or the
    task's degradation made once per image with a fixed seed."""
    gt, lq = _images(source, scale, "test")
    degradation = task.degradation() if task is not None else None
    if degradation is not None and lq is None:
        return DegradedEvalDataset(gt, degradation)
    return SREvalDataset(gt, scale, lr_images=lq)


def base_model(recipe: Recipe) -> nn.Module:
    return create_model(recipe.model.name, scale=recipe.model.scale, **recipe.model.kwargs)


def apply_sparsity(model: nn.Module, recipe: Recipe) -> SparsifyReport | None:
    if recipe.sparsity is None:
        return None
    importlib.import_module("nmrestore.methods")
    return sparsify_(model, recipe.sparsity)


def load_weights_from(model: nn.Module, recipe: Recipe, path: Path) -> None:
    """Initialise ``model`` (dense) from a checkpoint of the same architecture, dense or sparse.

    A sparse checkpoint is rebuilt with its own recipe and squashed to dense-with-zeros first, so
    one can fine-tune any method's result with another method.
    """
    ckpt = load_checkpoint(path)
    # a multi-task model's checkpoint holds every task; its scale only names the task that was active
    check_compatible(ckpt, recipe.model.name, None if is_multitask(model) else recipe.model.scale)
    source, _ = model_from_checkpoint(ckpt)
    squash_(source)
    load_model_state(model, source.state_dict(), str(path))


def model_from_checkpoint(ckpt: Checkpoint | str | Path, allow_large: bool = False) -> tuple[nn.Module, Recipe]:
    """Rebuild the exact model a checkpoint was saved from (architecture, masks, routes, N).

    The file is untrusted: its embedded recipe is validated like a recipe file, the model's
    keywords against its builder, and its size is estimated on the ``meta`` device and refused
    above :data:`~nmrestore.models.registry.MAX_MODEL_BYTES` unless ``allow_large``, all before
    any weight is allocated.
    """
    if not isinstance(ckpt, Checkpoint):
        ckpt = load_checkpoint(ckpt)
    if "recipe" not in ckpt.meta:
        raise CheckpointError(f"{ckpt.path} has no embedded recipe")
    recipe = recipe_from_dict(ckpt.meta["recipe"], f"{ckpt.path} (embedded recipe)")
    saved = ckpt.meta.get("model")
    # (the scale may differ: a PNG phase checkpoint records the scale of its task)
    if isinstance(saved, dict) and saved.get("name", recipe.model.name) != recipe.model.name:
        raise CheckpointError(
            f"{ckpt.path}: metadata says model {short_repr(saved.get('name'))} "
            f"but the embedded recipe {recipe.model.name!r}"
        )
    try:
        if allow_large:
            check_model_kwargs(recipe.model.name, recipe.model.kwargs)
        else:
            check_model_size(recipe.model.name, recipe.model.scale, recipe.model.kwargs, MAX_MODEL_BYTES)
    except NMRestoreError as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{ckpt.path} (embedded recipe): {exc}") from None
    model = base_model(recipe)
    if ckpt.is_sparse or getattr(recipe.sparsity, "changes_shapes", False):
        apply_sparsity(model, recipe)
    load_model_state(model, ckpt.model_state, str(ckpt.path))
    return model, recipe


#: ``program(recipe, run_dir, resume, show_progress) -> RunResult``: a method's own training.
TrainingProgram = Callable[[Recipe, str | Path, bool, bool], "RunResult"]


def training_program(config: NMConfig | None) -> TrainingProgram | None:
    """The training program a method config declares (``NMConfig.training_program``), or None.

    The registry is the config class itself: it names its program as ``"module:function"`` and the
    module is imported here on first use, so method cores never import the engine and the engine
    never imports (or names) a method's program.
    """
    path = None if config is None else type(config).training_program
    if path is None:
        return None
    module, _, name = path.partition(":")
    program = getattr(importlib.import_module(module), name, None)
    if not callable(program):
        raise RecipeError(f"{type(config).__name__}.training_program = {path!r} names no function")
    return program  # type: ignore[no-any-return]


@dataclass
class RunResult:
    run_dir: Path
    model: nn.Module
    state: TrainState
    report: SparsifyReport | None
    controller: Controller | None
    final: EvalResult | None


def train(
    recipe: Recipe,
    run_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
) -> RunResult:
    """Train ``recipe`` into ``run_dir`` (one process or under torchrun); resumable.

    A method whose config names a training program (ClassPruning's stages, PNG's task schedule) is
    trained by that program; every other recipe by the plain Trainer loop below. The run folder is
    locked for the whole run (:mod:`nmrestore.engine.runlock`): a second run into the same folder
    stops with :class:`~nmrestore.engine.runlock.RunInUseError` and changes nothing.
    """
    with run_lock(run_dir):
        return _dispatch(recipe, Path(run_dir), resume, show_progress)


def _dispatch(recipe: Recipe, run_dir: Path, resume: bool, show_progress: bool) -> RunResult:
    program = training_program(recipe.sparsity)
    if program is not None:
        return program(recipe, run_dir, resume, show_progress)
    with distributed_run(recipe.train.device) as dist:
        return _train(recipe, run_dir, resume, show_progress, dist)


def _train(recipe: Recipe, run_dir: Path, resume: bool, show_progress: bool, dist: DistInfo) -> RunResult:
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed + dist.rank)
    last = run_dir / "checkpoints" / "last.safetensors"
    if not resume and last.exists():
        raise RecipeError(f"{run_dir} already holds a run; pass --resume to continue it or choose another folder")
    if resume and last.exists():
        saved = load_checkpoint(last)
        if saved.meta.get("recipe") != json.loads(json.dumps(recipe.model_dump(mode="json"))):
            raise RecipeError(f"{last} was trained with another recipe; resume with the recipe saved in {run_dir}")
    else:
        saved = None

    model = base_model(recipe)
    if recipe.train.init_from is not None and saved is None:
        load_weights_from(model, recipe, recipe.train.init_from)
    report = apply_sparsity(model, recipe)
    controller = report.controller if report else None
    if saved is not None:
        load_model_state(model, saved.model_state, str(last))
    model.to(dist.device)

    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        if report is not None:
            atomic_write_text(run_dir / "sparsity.txt", report.table() + "\n")

    train_set = build_train_dataset(recipe)
    per_process = max(1, recipe.data.train.batch_size // dist.world_size)
    loader = build_train_loader(
        train_set, per_process, recipe.data.train.num_workers, recipe.seed, distributed=dist.distributed
    )
    val_set = build_val_dataset(recipe)
    crop = recipe.eval.crop_border if recipe.eval.crop_border is not None else recipe.model.scale

    validated: dict[int, EvalResult] = {}  # step -> score, so the final step is not scored twice

    def validate(m: nn.Module) -> EvalResult:
        result = evaluate_model(m, val_set, crop, recipe.eval.test_y_channel, dist.device, with_ssim=True)
        validated[trainer.state.step] = result
        return result

    meta: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "sparsity": None if recipe.sparsity is None else recipe.sparsity.model_dump(mode="json"),
    }
    trainer = Trainer(
        model,
        RestorationTask(recipe.train.loss),
        loader,
        recipe.train,
        run_dir,
        meta,
        controller=controller,
        validate=validate,
        dist=dist,
        show_progress=show_progress,
    )
    if saved is not None:
        trainer.restore(saved)
        log.info("resumed %s at step %d", run_dir, saved.step)
    state = trainer.fit()
    if dist.is_main and controller is not None:
        controller.write_artifacts(model, run_dir)  # method-specific tables and charts (e.g. SLS's N per layer)
    final = (validated.get(state.step) or validate(model)) if dist.is_main else None
    if dist.is_main and final is not None:
        summary = {
            "step": state.step,
            "val_psnr": final.psnr,
            "val_ssim": final.ssim,
            "best_psnr": state.best_psnr,
            "best_step": state.best_step,
            "layers_pruned": len(list(nm_layers(model))),
        }
        atomic_write_text(run_dir / "final.json", json.dumps(summary, indent=2))
    return RunResult(run_dir, model, state, report, controller, final)
