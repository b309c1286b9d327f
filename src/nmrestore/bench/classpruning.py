"""The benchmark harness's ``classpruning`` rows: the three stages scaled to ``finetune_steps``, scored through the patch pipeline."""

from __future__ import annotations

import copy
import shutil
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.bench.context import BenchContext, register_row_producer
from nmrestore.cost import count_cost
from nmrestore.data.datasets import ImageList, SRTrainDataset
from nmrestore.data.restoration import DegradedTrainDataset
from nmrestore.engine.evaluate import evaluate_fn
from nmrestore.engine.runner import _images, train
from nmrestore.methods.classpruning.accounting import pooled_cost
from nmrestore.methods.classpruning.classifier import route_classifier
from nmrestore.methods.classpruning.classmap import save_class_map
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, AdaptiveResult
from nmrestore.methods.classpruning.program.evaluation import adaptive_report_row
from nmrestore.methods.classpruning.program.tasks import JointTask, SandwichTask
from nmrestore.methods.classpruning.routes import layer_route_ns
from nmrestore.recipes.schema import Recipe, recipe_from_dict
from nmrestore.runtime.timing import Timings, interleaved, paired_median
from nmrestore.sparsity.api import eligible_layers
from nmrestore.sparsity.parametrization import nm_layers

#: Stage settings for the benchmark harness's ``classpruning`` rows (scaled to ``finetune_steps``).
BENCH_SETTINGS: dict[str, Any] = {
    "method": "classpruning",
    "m": 32,
    "routes": [8, 16, 32],
    "classifier_channels": 64,
    "classifier_convs": 3,
    "patch_size": 32,
    "stride": 28,
    "labels": "budget",
    "budget_weights": "image",
    "label_stride": 16,
    "classifier_steps": 2000,
    "classifier_lr": 3e-3,
    "classifier_batch": 64,
    "joint_lr": 5e-5,
    "class_weight": 0.01,
    "budget_weight": 0.05,
    "budget_loss": "expected_macs",
    "target_macs_fraction": 0.55,
    "holdout_fraction": 0.2,
}


def bench_recipe(context: BenchContext, settings: dict[str, Any] | None = None) -> Recipe:
    """The harness's fine-tune recipe turned into ClassPruning's: stage A + stage C = ``finetune_steps``.

    A third of the SR-weight steps go to the joint stage (at least 1); the classifier gets steps of
    its own (it does not touch the SR weights; ``finetune_steps`` of them in the quick preset).
    """
    steps = int(context.config.finetune_steps)
    joint = max(1, steps // 3)
    quick = {"classifier_steps": steps, "label_stride": 32} if context.config.quick else {}
    sparsity = {**BENCH_SETTINGS, "joint_steps": joint, **quick, **(settings or {})}
    base = context.finetune_recipe("classpruning", sparsity)
    a_steps = max(1, steps - int(sparsity["joint_steps"]))
    train = base.train.model_copy(
        update={"steps": a_steps, "val_every": a_steps, "ckpt_every": max(1, a_steps // 4)}
    )
    data = base.model_dump(mode="json")
    data["train"] = train.model_dump(mode="json")
    return recipe_from_dict(data, "benchmark recipe classpruning")


def measure_stage_steps(
    model: nn.Module, dense: nn.Module, batch: dict[str, Tensor], config: ClassPruningConfig, rounds: int = 5
) -> Timings:
    """Seconds of one dense step, one stage-A step and one stage-C step, interleaved (one warm-up round)."""
    models = {
        "dense": copy.deepcopy(dense).train(),
        "a": copy.deepcopy(model).train(),
        "c": copy.deepcopy(model).train(),
    }
    tasks: dict[str, Any] = {
        "dense": None,
        "a": SandwichTask(config.num_routes, "l1", config.distill_weight, config.small_route_weight),
        "c": JointTask(config, route_classifier(models["c"]).route_cost.tolist()),
    }
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-7) for k, m in models.items()}

    def train_step(key: str) -> None:
        task = tasks[key]
        if task is None:
            losses = {"l1": F.l1_loss(models[key](batch["lq"]), batch["gt"])}
        else:
            losses = task.losses(models[key], batch)
        optimizers[key].zero_grad(set_to_none=True)
        sum(losses.values()).backward()  # type: ignore[union-attr]
        optimizers[key].step()

    return interleaved({key: partial(train_step, key) for key in models}, rounds, warmup=1)


def bench_rows(context: BenchContext, budget: str | None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The harness row of ClassPruning (method ``classpruning``), with ``routes`` and ``route_histogram``.

    MAC columns are whole-image MACs: everything the pipeline computes on the test images (overlap,
    classifier and blending included) over the dense net run once on each whole image;
    ``macs_fraction_per_patch`` is ClassSR's convention (over the dense net on the same patches).
    ``step_time_ratio`` is the mean cost of one SR-weight step (stage A and C mixed as trained)
    over a dense step, measured interleaved in this process.
    """
    recipe = bench_recipe(context, settings)
    config = recipe.sparsity
    assert isinstance(config, ClassPruningConfig)
    run_dir = Path(context.work_dir) / "classpruning"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    context.say(
        f"ClassPruning: stage A {recipe.train.steps} + classifier {config.classifier_steps} + joint "
        f"{config.joint_steps} steps"
    )
    result = train(recipe, run_dir, show_progress=context.config.show_progress)
    model = result.model.eval()
    adaptive_row, _ = adaptive_report_row(
        model,
        context.eval_set,
        context.crop,
        float(context.dense_cost.dense_macs),
        run_dir / "class_maps",
        test_y_channel=context.y_channel,
    )
    row = context.row("classpruning", "adaptive", model, result.final, timed=False)
    row.update(per_image=None, tiles=None)  # result.final scored the validation strips, not the test photos
    # the patch pipeline's scores on the test photos (per image too) replace them
    row.update({k: v for k, v in adaptive_row.items() if k not in ("method", "budget")})
    patch = (config.patch_size, config.patch_size)
    degradation = recipe.task.degradation()
    data: SRTrainDataset | DegradedTrainDataset = (
        DegradedTrainDataset(
            load_train_images(recipe), degradation, config.patch_size, recipe.data.train.batch_size, recipe.seed
        )
        if degradation is not None
        else SRTrainDataset(
            load_train_images(recipe),
            recipe.model.scale,
            config.patch_size,
            recipe.data.train.batch_size,
            recipe.seed,
        )
    )
    samples = [data[i] for i in range(recipe.data.train.batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("lq", "gt")}  # type: ignore[misc]
    t = measure_stage_steps(model, context.dense_model, batch, config, rounds=context.config.timing_rounds)
    a_steps, c_steps = recipe.train.steps, config.joint_steps
    # one SR-weight step as trained (stages A and C mixed), per round, against that round's dense step
    mixed = [(a_steps * a + c_steps * c) / (a_steps + c_steps) for a, c in zip(t.samples["a"], t.samples["c"], strict=True)]
    row.update(
        {
            "step_ms": statistics.median(mixed) * 1e3,
            "step_time_ratio": paired_median(mixed, t.samples["dense"]),
            "stage_a_step_ratio": t.ratio("a", "dense"),
            "stage_c_step_ratio": t.ratio("c", "dense"),
            "finetune_steps": a_steps + c_steps,
            "note": f"stages A {a_steps} + C {c_steps} SR steps (+{config.classifier_steps} classifier); "
            f"routes {row['routes']}, histogram {'/'.join(str(n) for n in row['route_histogram'])}, "
            f"{row['macs_fraction']:.1%} of whole-image dense MACs ({row['macs_fraction_per_patch']:.1%} per "
            f"patch); {config.inference} {patch[0]}"
            + (f"/{config.stride}" if config.inference == "patches" else ""),
        }
    )
    return row


@torch.no_grad()
def adaptive_test_row(
    model: nn.Module,
    samples: Any,
    crop: int,
    y_channel: bool,
    tile: int | None,
    dense_720p_macs: float,
    class_map_dir: Path | None = None,
    engine: nn.Module | None = None,
) -> dict[str, Any]:
    """A ClassPruning model scored through its own pipeline on the test set, as the static rows are scored.

    Per-image PSNR/SSIM and the ``tile`` HR tiles' PSNRs (the paired intervals' units), the route
    histogram and MACs per image and pooled -- whole-image first (``macs_fraction``: everything the
    pipeline computed over the dense network run once on each image), ClassSR's per-patch figure as
    ``macs_fraction_per_patch`` -- and ``macs_g`` at a 1280x720 output (the whole-image fraction of
    the dense network's 720p MACs). ``class_map_dir``: a class map per image is saved there.
    """
    pipeline = AdaptivePipeline(model, engine=engine)
    results: list[AdaptiveResult] = []

    def restore(lq: Tensor) -> Tensor:
        results.append(pipeline(lq))
        return results[-1].output

    scored = evaluate_fn(restore, samples, crop, y_channel, with_ssim=True, tile=tile)
    cost = pooled_cost(r.cost for r in results)
    assert cost is not None
    per_image = []
    for row, result in zip(scored.per_image, results, strict=True):
        entry = {k: v for k, v in row.items() if k != "tiles"}
        entry.update(result.summary())
        entry["route_pixels"] = list(result.cost.route_pixels)
        if class_map_dir is not None:
            entry["class_map"] = str(save_class_map(result, Path(class_map_dir) / f"{row['name']}_classmap.png"))
        per_image.append(entry)
    histogram = [sum(r.histogram[k] for r in results) for k in range(pipeline.num_routes)]
    ns = list(layer_route_ns(model).values())
    summary = count_cost(getattr(model, "module", model)).summary(pipeline.num_routes - 1)
    m = next(mask.m for _, _, mask in nm_layers(model))
    costs = results[0].costs
    return {
        "method": "classpruning",
        "budget": "adaptive",
        "psnr": scored.psnr,
        "ssim": scored.ssim,
        "macs_fraction": cost.fraction,
        "macs_fraction_per_patch": cost.per_patch_fraction,
        "macs_g": cost.fraction * dense_720p_macs / 1e9,
        "params": summary["params"],
        "params_nonzero": summary["params_nonzero"],
        "packed_bytes": summary["packed_bytes"],
        "mode": pipeline.mode,
        "tile": pipeline.patch_size,
        "stride": pipeline.stride,
        "routes": "/".join(str(n) for n in ns[0]) + f":{m}" if all(n == ns[0] for n in ns) else "per-layer (SLS)",
        "route_fractions": list(costs.fractions()),
        "route_histogram": histogram,
        "pipeline_cost": cost.to_dict(),
        "per_image": per_image,
        "tiles": [round(float(v), 4) for r in scored.per_image for v in r.get("tiles", ())] or None,
    }


def uniform_n_for(dense_model: nn.Module, fraction: float, m: int = 32) -> tuple[int, float]:
    """The smallest uniform N:m whose whole-network MACs fraction is >= ``fraction`` (and that fraction).

    The static baseline of an adaptive model: at least as many MACs as the adaptive model's
    whole-image figure, so a win of the adaptive model is never bought with more compute.
    """
    dense, prunable = _dense_and_prunable(dense_model, m)
    for n in range(1, m + 1):
        value = (dense - prunable + prunable * n / m) / dense
        if value >= fraction - 1e-12:
            return n, value
    return m, 1.0


def prunable_budget_for(dense_model: nn.Module, fraction: float, m: int = 32) -> float:
    """The prunable-MACs budget (SLS's ``budget_kind: prunable_macs``) that gives ``fraction`` of the
    whole network's MACs, the dense first and last convs included (clamped to (0, 1])."""
    dense, prunable = _dense_and_prunable(dense_model, m)
    return min(1.0, max(1e-6, (fraction * dense - (dense - prunable)) / prunable))


def _dense_and_prunable(dense_model: nn.Module, m: int) -> tuple[float, float]:
    cost = count_cost(dense_model)
    names = {layer.name for layer in eligible_layers(dense_model, m)[0]}
    prunable = sum(layer.dense_macs for layer in cost.layers if layer.name in names)
    return float(cost.dense_macs), float(prunable)


def load_train_images(recipe: Recipe) -> ImageList:
    gt, _ = _images(recipe.data.train, recipe.model.scale, "train")
    return gt


def register_bench_rows(settings: dict[str, Any] | None = None) -> None:
    """Register (or re-register with other ``settings``) :func:`bench_rows` as method ``classpruning``."""
    register_row_producer("classpruning", per_budget=False, replace=True)(partial(bench_rows, settings=settings))


register_bench_rows()
