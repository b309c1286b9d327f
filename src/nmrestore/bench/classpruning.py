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
from nmrestore.data.datasets import ImageList, SRTrainDataset
from nmrestore.data.restoration import DegradedTrainDataset
from nmrestore.engine.runner import _images, train
from nmrestore.methods.classpruning.classifier import route_classifier
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.classpruning.program.evaluation import adaptive_report_row
from nmrestore.methods.classpruning.program.tasks import JointTask, SandwichTask
from nmrestore.recipes.schema import Recipe, recipe_from_dict
from nmrestore.runtime.timing import Timings, interleaved, paired_median

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

    MAC columns are the average over all patches of the test images (ClassSR's convention, the
    classifier included); ``macs_fraction_whole_image`` is against the dense net on whole images.
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
            f"{row['macs_fraction_whole_image']:.1%} of whole-image dense MACs; patch {patch[0]}/{config.stride}",
        }
    )
    return row


def load_train_images(recipe: Recipe) -> ImageList:
    gt, _ = _images(recipe.data.train, recipe.model.scale, "train")
    return gt


def register_bench_rows(settings: dict[str, Any] | None = None) -> None:
    """Register (or re-register with other ``settings``) :func:`bench_rows` as method ``classpruning``."""
    register_row_producer("classpruning", per_budget=False, replace=True)(partial(bench_rows, settings=settings))


register_bench_rows()
