"""ClassPruning's training program (:func:`train_adaptive`, what ``nmrestore train`` runs for
``method: classpruning``): each stage a :class:`~nmrestore.engine.trainer.Trainer` run with its own checkpoints under
``<run>/stage_<x>/``, so a killed stage resumes where it stopped and finished stages are skipped:

* ``routes`` (only with ``route_budgets``): an SLS search per route budget, per-layer N made nested;
* ``a``: sandwich-rule route training -- every step runs the full route, the cheapest route and a
  random middle one, L1 each, the smaller routes also distilled towards the full route's output;
* ``b``: labels (cheapest route within delta dB of the full route, or PSNR quantiles) on a grid of
  training patches, then the classifier trained with cross-entropy (SR weights frozen);
* ``c``: joint fine-tuning with soft routing ``y = sum_k p_k f_k(x)``, loss L1 + w_c class loss
  + w_b budget loss (expected MACs pulled to the target; ClassSR's equal split as an option);
* then the cost shift ``tau`` is calibrated on held-out patches (the bottom strip of every training
  image, never trained on) so that hard routing meets the target, and the final model is written
  to ``<run>/checkpoints/{last,best}.safetensors`` (one file: masks, routes, classifier, tau).

Stage A is DDP-aware through the Trainer; stages B and C are replicated on every rank (each rank
computes the same thing, rank 0 writes), because their forward mixes the classifier and K routes.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.data.datasets import ImageList, SREvalDataset, SRTrainDataset, split_holdout
from nmrestore.data.degradations import Degradation
from nmrestore.data.loader import build_train_loader
from nmrestore.data.restoration import DegradedEvalDataset, DegradedTrainDataset
from nmrestore.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from nmrestore.engine.distributed import DistInfo, barrier, distributed_run
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.runner import (
    RunResult,
    _images,
    apply_sparsity,
    base_model,
    build_val_dataset,
    load_weights_from,
    seed_everything,
)
from nmrestore.engine.task import RestorationTask
from nmrestore.engine.trainer import Trainer, TrainState
from nmrestore.errors import RecipeError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.methods.classpruning.classifier import (
    calibrate_shift,
    classifier_logits,
    route_classifier,
    update_route_costs,
)
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.classpruning.labels import PatchLabelDataset, make_labels, route_psnrs
from nmrestore.methods.classpruning.patches import grid_patch_pairs, grid_patch_sources
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline
from nmrestore.methods.classpruning.program.evaluation import AdaptiveEvalResult, evaluate_adaptive
from nmrestore.methods.classpruning.program.tasks import ClassifierTask, JointTask, SandwichTask
from nmrestore.methods.classpruning.routes import layer_route_ns, nested_route_ns, set_layer_route_ns
from nmrestore.methods.sls import SLSConfig
from nmrestore.recipes.schema import Recipe, Schedule
from nmrestore.sparsity.api import sparsify_

log = logging.getLogger("nmrestore.adaptive")


@dataclass
class _Context:
    recipe: Recipe
    config: ClassPruningConfig
    run_dir: Path
    dist: DistInfo
    show_progress: bool
    meta: dict[str, Any]
    train_gt: ImageList
    train_lq: ImageList | None
    held_gt: ImageList
    held_lq: ImageList | None

    @property
    def scale(self) -> int:
        return self.recipe.model.scale

    @property
    def crop(self) -> int:
        ev = self.recipe.eval
        return ev.crop_border if ev.crop_border is not None else self.scale

    @property
    def degradation(self) -> Degradation | None:
        """Deblurring/denoising without paired inputs: the degradation made on the fly (None: SR or pairs)."""
        return self.recipe.task.degradation() if self.train_lq is None else None


def _stage_last(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints" / "last.safetensors"


def _check_recipe(path: Path, recipe: Recipe) -> None:
    saved = load_checkpoint(path)
    if saved.meta.get("recipe") != json.loads(json.dumps(recipe.model_dump(mode="json"))):
        raise RecipeError(f"{path} was trained with another recipe; resume with the recipe saved beside it")


def _run_stage(
    name: str,
    ctx: _Context,
    model: nn.Module,
    task: Any,
    loader: Any,
    steps: int,
    lr: float,
    controller: Any = None,
    validate: Any = None,
    dist: DistInfo | None = None,
    schedule: Schedule | None = None,
) -> TrainState:
    """One stage through the Trainer, resuming its own ``last`` checkpoint (skipped when finished)."""
    stage_dir = ctx.run_dir / f"stage_{name}"
    last = _stage_last(stage_dir)
    saved = load_checkpoint(last) if last.exists() else None
    if saved is not None:
        load_model_state(model, saved.model_state, str(last))
        if saved.step >= steps:
            log.info("classpruning: stage %s already finished (%d steps)", name, saved.step)
            return TrainState(step=saved.step)
    update: dict[str, Any] = {"steps": steps, "lr": lr, "init_from": None}
    if schedule is not None:
        update["schedule"] = schedule
    spec = ctx.recipe.train.model_copy(update=update)
    trainer = Trainer(
        model,
        task,
        loader,
        spec,
        stage_dir,
        {**ctx.meta, "stage": name},
        controller=controller,
        validate=validate,
        dist=dist or ctx.dist,
        show_progress=ctx.show_progress,
    )
    if saved is not None:
        trainer.restore(saved)
        log.info("classpruning: resumed stage %s at step %d", name, saved.step)
    return trainer.fit()


def _replicated(dist: DistInfo) -> DistInfo:
    """Every rank computes the whole stage (no DDP); only rank 0 writes."""
    return DistInfo(rank=dist.rank, world_size=1, local_rank=dist.local_rank, device=dist.device)


def _stage_routes(ctx: _Context, model: nn.Module, dense_state: dict[str, Tensor]) -> None:
    """SLS search per route budget; per-layer N nested by a running max; saved to routes.json."""
    config = ctx.config
    budgets = config.route_budgets
    if budgets is None:
        return
    out = ctx.run_dir / "stage_routes" / "routes.json"
    if out.exists():
        per_layer = json.loads(out.read_text())["layers"]
        set_layer_route_ns(model, per_layer)
        return
    names = list(layer_route_ns(model))
    per_route: list[list[int]] = []
    for k, budget in enumerate(budgets):
        if budget >= 1:
            per_route.append([config.m] * len(names))
            continue
        search = base_model(ctx.recipe)
        search.load_state_dict(dense_state)
        steps = config.route_search_steps
        sls = SLSConfig(
            m=config.m,
            budget=budget,
            budget_kind="prunable_macs",
            search_steps=steps,
            refresh_every=max(1, steps // 4),
            anneal_interval=max(1, steps // 20),
            score_lr=0.01,
            dense_first_last=config.dense_first_last,
            out_block=config.out_block,  # search N over the masks the routes will have
        )
        report = sparsify_(search, sls)
        search.to(ctx.dist.device)
        loader = _sr_loader(ctx, ctx.recipe.data.train.patch_size, offset=100 + k)
        _run_stage(
            f"routes/route_{k}",
            ctx,
            search,
            RestorationTask(ctx.recipe.train.loss),
            loader,
            steps,
            ctx.recipe.train.lr,
            controller=report.controller,
            dist=_replicated(ctx.dist),
        )
        found = layer_route_ns(search)
        per_route.append([found[n][0] for n in names])
    nested = nested_route_ns(per_route)
    per_layer = {n: [nested[k][i] for k in range(len(budgets))] for i, n in enumerate(names)}
    set_layer_route_ns(model, per_layer)
    if ctx.dist.is_main:
        atomic_write_text(out, json.dumps({"budgets": list(budgets), "layers": per_layer}, indent=2))


def _sr_loader(ctx: _Context, patch_size: int, offset: int) -> Any:
    spec = ctx.recipe.data.train
    dataset: SRTrainDataset | DegradedTrainDataset
    if ctx.degradation is not None:
        dataset = DegradedTrainDataset(
            ctx.train_gt,
            ctx.degradation,
            patch_size,
            spec.samples_per_epoch,
            ctx.recipe.seed + offset,
            augment=spec.augment,
        )
    else:
        dataset = SRTrainDataset(
            ctx.train_gt,
            ctx.scale,
            patch_size,
            spec.samples_per_epoch,
            ctx.recipe.seed + offset,
            lr_images=ctx.train_lq,
            augment=spec.augment,
        )
    return build_train_loader(
        dataset,
        max(1, spec.batch_size // ctx.dist.world_size),
        spec.num_workers,
        ctx.recipe.seed + offset,
        distributed=ctx.dist.distributed,
    )


def _held_set(ctx: _Context) -> SREvalDataset | DegradedEvalDataset | None:
    if not ctx.held_gt:
        return None
    if ctx.degradation is not None:
        return DegradedEvalDataset(ctx.held_gt, ctx.degradation)
    return SREvalDataset(ctx.held_gt, ctx.scale, lr_images=ctx.held_lq)


def _label_patches(ctx: _Context, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """LR patches, route PSNRs and labels for stage B (PSNRs cached in stage_b/labels.json)."""
    cfg = ctx.config
    lq, gt = grid_patch_pairs(
        ctx.train_gt, ctx.train_lq, ctx.scale, cfg.patch_size, cfg.label_stride, ctx.degradation
    )
    cache = ctx.run_dir / "stage_b" / "labels.json"
    if cache.exists():
        psnrs = torch.tensor(json.loads(cache.read_text())["psnr"], dtype=torch.float64)
        if psnrs.shape[0] != lq.shape[0]:
            raise RecipeError(f"{cache} holds {psnrs.shape[0]} patches, the data gives {lq.shape[0]}")
    else:
        psnrs = route_psnrs(model, lq, gt, ctx.crop, ctx.recipe.eval.test_y_channel)
        if ctx.dist.is_main:
            atomic_write_text(cache, json.dumps({"psnr": psnrs.tolist()}))
    sources = grid_patch_sources(ctx.train_gt, ctx.scale, cfg.patch_size, cfg.label_stride, ctx.train_lq)
    labels = make_labels(psnrs, cfg, route_classifier(model).route_cost.tolist(), sources)
    return lq, psnrs, labels


def _calibration_patches(ctx: _Context) -> Tensor:
    cfg = ctx.config
    if ctx.held_gt:
        lq, _ = grid_patch_pairs(ctx.held_gt, ctx.held_lq, ctx.scale, cfg.patch_size, cfg.stride, ctx.degradation)
    else:
        lq, _ = grid_patch_pairs(
            ctx.train_gt, ctx.train_lq, ctx.scale, cfg.patch_size, cfg.stride, ctx.degradation
        )
    return lq


def train_adaptive(
    recipe: Recipe, run_dir: str | Path, resume: bool = False, show_progress: bool = True
) -> RunResult:
    """Run ClassPruning's stages for ``recipe`` into ``run_dir`` (resumable stage by stage)."""
    run_dir = Path(run_dir)
    with distributed_run(recipe.train.device) as dist:
        return _train_adaptive(recipe, run_dir, resume, show_progress, dist)


def has_progress(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds any stage or final checkpoint (a run to ``resume``)."""
    run = Path(run_dir)
    return (run / "checkpoints" / "last.safetensors").exists() or any(run.glob("stage_*/**/last.safetensors"))


def _train_adaptive(
    recipe: Recipe, run_dir: Path, resume: bool, show_progress: bool, dist: DistInfo
) -> RunResult:
    config = recipe.sparsity
    if not isinstance(config, ClassPruningConfig):
        raise RecipeError("train_adaptive needs a recipe with sparsity.method: classpruning")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed + dist.rank)
    started = has_progress(run_dir)
    if started and not resume:
        raise RecipeError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another folder"
        )
    for path in sorted(run_dir.glob("stage_*/**/last.safetensors")):
        _check_recipe(path, recipe)

    model = base_model(recipe)
    if recipe.train.init_from is not None and not started:
        load_weights_from(model, recipe, recipe.train.init_from)
    dense_state = copy.deepcopy(model.state_dict())
    report = apply_sparsity(model, recipe)
    assert report is not None
    model.to(dist.device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        atomic_write_text(run_dir / "sparsity.txt", report.table() + "\n")

    gt, lq = _images(recipe.data.train, recipe.model.scale, "train")
    (train_gt, train_lq), (held_gt, held_lq) = split_holdout(
        gt,
        lq,
        recipe.model.scale,
        config.holdout_fraction,
        max(config.patch_size, recipe.data.train.patch_size),
    )
    meta: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "sparsity": config.model_dump(mode="json"),
    }
    ctx = _Context(recipe, config, run_dir, dist, show_progress, meta, train_gt, train_lq, held_gt, held_lq)
    held = _held_set(ctx)
    started_at = time.perf_counter()

    # -- routes (SLS per budget) ---------------------------------------------------------------
    _stage_routes(ctx, model, dense_state)
    if config.route_budgets is not None:
        update_route_costs(model, config.patch_size)
    pipeline = AdaptivePipeline(model, config.patch_size, config.stride)  # caches MAC counts
    costs = pipeline.costs((config.patch_size, config.patch_size))
    log.info("classpruning: route MACs (of dense, classifier included): %s", costs.fractions())

    # -- stage A: sandwich rule -----------------------------------------------------------------
    def validate_full(m: nn.Module) -> EvalResult:
        assert held is not None
        return evaluate_model(m, held, ctx.crop, recipe.eval.test_y_channel, dist.device, with_ssim=True)

    state_a = _run_stage(
        "a",
        ctx,
        model,
        SandwichTask(config.num_routes, recipe.train.loss, config.distill_weight, config.small_route_weight),
        _sr_loader(ctx, recipe.data.train.patch_size, offset=0),
        recipe.train.steps,
        recipe.train.lr,
        controller=report.controller,
        validate=validate_full if held is not None else None,
        schedule=recipe.train.schedule,
    )
    barrier(dist)

    # -- stage B: labels + classifier --------------------------------------------------------------
    summary: dict[str, Any] = {"route_costs": costs.to_dict()}
    classifier = route_classifier(model)
    if config.classifier_steps:
        patches, psnrs, labels = _label_patches(ctx, model)
        counts = torch.bincount(labels, minlength=config.num_routes).tolist()
        summary["labels"] = {
            "patches": len(labels),
            "histogram": counts,
            "rule": config.labels,
            "mean_psnr_per_route": psnrs.clamp(max=100).mean(0).tolist(),
        }
        log.info("classpruning: label histogram %s", counts)
        own = {id(p) for p in classifier.parameters()}
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        try:
            dataset = PatchLabelDataset(patches, labels, recipe.seed + 1, min_length=config.classifier_batch)
            loader = build_train_loader(
                dataset, config.classifier_batch, 0, recipe.seed + 1, distributed=False
            )
            _run_stage(
                "b",
                ctx,
                model,
                ClassifierTask(),
                loader,
                config.classifier_steps,
                config.classifier_lr,
                dist=_replicated(dist),
                schedule=Schedule(kind="cosine"),
            )
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        with torch.no_grad():
            predicted = classifier_logits(model, patches).argmax(1)
        summary["labels"]["train_accuracy"] = float((predicted == labels).double().mean())
    barrier(dist)

    # -- stage C: joint soft routing --------------------------------------------------------------
    def validate_adaptive(m: nn.Module) -> EvalResult:
        assert held is not None
        return evaluate_adaptive(pipeline, held, ctx.crop, recipe.eval.test_y_channel)

    state_c = state_a
    if config.joint_steps:
        task = JointTask(config, costs.fractions(), recipe.train.loss)
        state_c = _run_stage(
            "c",
            ctx,
            model,
            task,
            _sr_loader(ctx, config.patch_size, offset=2),
            config.joint_steps,
            config.joint_lr,
            validate=validate_adaptive if held is not None else None,
            dist=_replicated(dist),
            schedule=Schedule(kind="cosine"),
        )
    barrier(dist)

    # -- calibration + final model -----------------------------------------------------------------
    if config.calibrate:
        logits = classifier_logits(model, _calibration_patches(ctx))
        tau, reached = calibrate_shift(logits, classifier.route_cost, config.target_macs_fraction)
        classifier.cost_shift.fill_(tau)
        summary["calibration"] = {
            "shift": tau,
            "macs_fraction": reached,
            "patches": int(logits.shape[0]),
            "on": "held-out strips" if held is not None else "training patches",
        }
        log.info("classpruning: cost shift %.4g gives %.1f%% MACs on calibration patches", tau, 100 * reached)
    if held is not None:
        held_eval = evaluate_adaptive(pipeline, held, ctx.crop, recipe.eval.test_y_channel)
        summary["heldout"] = {
            "psnr": held_eval.psnr,
            "macs_fraction": held_eval.macs_fraction,
            "route_histogram": held_eval.histogram,
        }

    final: AdaptiveEvalResult | None = None
    total_steps = recipe.train.steps + config.classifier_steps + config.joint_steps
    if dist.is_main:
        val_set = build_val_dataset(recipe)
        final = evaluate_adaptive(pipeline, val_set, ctx.crop, recipe.eval.test_y_channel)
        metrics = {
            "val_psnr": final.psnr,
            "val_ssim": final.ssim,
            "val_macs_fraction": final.macs_fraction,
            "val_route_histogram": final.histogram,
        }
        final_meta = {**meta, "step": total_steps, "metrics": metrics, "adaptive": summary, "stage": "final"}
        for name in ("last", "best"):
            save_checkpoint(
                run_dir / "checkpoints" / f"{name}.safetensors", model, final_meta, with_rng=False
            )
        record = {
            "step": total_steps,
            "val_psnr": final.psnr,
            "val_ssim": final.ssim,
            "val_macs_fraction": final.macs_fraction,
            "val_macs_fraction_per_patch": final.macs_fraction_per_patch,
            "val_route_histogram": final.histogram,
            "elapsed_s": time.perf_counter() - started_at,
            **summary,
        }
        atomic_write_text(run_dir / "final.json", json.dumps(record, indent=2))
    barrier(dist)
    state = TrainState(step=total_steps, history=state_a.history + state_c.history)
    return RunResult(run_dir, model, state, report, report.controller, final)
