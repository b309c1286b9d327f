"""What a row producer sees (:class:`BenchContext`) and the registry of row producers, one per method."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from nmrestore.bench.config import (
    BenchConfig,
    DenseCheckpoint,
    Echo,
    Row,
    data_section,
    task_section,
    train_section,
)
from nmrestore.bench.rowcache import row_digest
from nmrestore.bench.steps import Timed
from nmrestore.cost import CostReport, count_cost
from nmrestore.data.datasets import SREvalDataset
from nmrestore.engine.checkpoint import load_checkpoint
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.runner import (
    RunResult,
    train,
)
from nmrestore.errors import NMRestoreError
from nmrestore.recipes.schema import Recipe, recipe_from_dict
from nmrestore.sparsity.api import Controller, eligible_layers

log = logging.getLogger("nmrestore.bench")


@dataclass
class BenchContext:
    """Everything a row producer needs: the dense checkpoint and model, the test set, helpers."""

    config: BenchConfig
    dense: DenseCheckpoint
    dense_model: nn.Module
    dense_cost: CostReport
    eval_set: SREvalDataset
    work_dir: Path
    notes: list[str] = field(default_factory=list)
    timed: dict[str, Timed] = field(default_factory=dict)
    echo: Echo | None = None
    cached_rows: dict[str, Row] = field(default_factory=dict)

    @property
    def crop(self) -> int:
        return self.config.scale if self.config.task == "sr" else 0  # deblur/denoise: no border crop

    @property
    def y_channel(self) -> bool:
        return self.config.task == "sr"  # deblur/denoise: RGB PSNR/SSIM

    def say(self, message: str) -> None:
        log.info("%s", message)
        if self.echo:
            self.echo(message)

    def finetune_recipe(self, label: str, sparsity: dict[str, Any] | None) -> Recipe:
        """The fine-tune recipe: same data as the dense run, ``finetune_steps`` from the dense model."""
        config = self.config
        data: dict[str, Any] = {
            "name": f"bench-{label}",
            "seed": config.seed,
            **task_section(config),
            "model": {"name": config.model, "scale": config.scale, "kwargs": dict(config.model_kwargs)},
            "data": data_section(config),
            "train": {
                **train_section(config, config.finetune_steps, config.finetune_lr, [0.67]),
                "init_from": str(self.dense.path),
            },
        }
        if sparsity is not None:
            data["sparsity"] = sparsity
        return recipe_from_dict(data, f"benchmark recipe {label}")

    def finetune(self, label: str, sparsity: dict[str, Any] | None) -> RunResult:
        """Fine-tune the dense model with ``sparsity`` (a recipe ``sparsity`` mapping).

        A folder left by an earlier call with the same recipe is resumed from its last checkpoint (a
        finished one only reloads), so a killed benchmark continues where it stopped; any other
        folder content is replaced.
        """
        recipe = self.finetune_recipe(label, sparsity)
        run_dir = self.work_dir / label.replace(":", "of")
        last = run_dir / "checkpoints" / "last.safetensors"
        resume = last.is_file() and _same_recipe(last, recipe)
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)
        self.say(f"{'resuming' if resume else 'fine-tuning'} {label} ({self.config.finetune_steps} steps)")
        return train(recipe, run_dir, resume=resume, show_progress=self.config.show_progress)

    def row(
        self,
        method: str,
        budget: str | float | None,
        model: nn.Module,
        result: EvalResult,
        prunable_names: Iterable[str] | None = None,
        note: str = "",
        controller: Controller | None = None,
        timed: bool = True,
    ) -> Row:
        """A row with the cost columns filled in from ``count_cost(model)``.

        ``prunable_names`` (the layers N:M would prune) gives the prunable-MACs fraction of a model
        without masks (filter pruning); for masked models the masks' own N:M counts are used.
        """
        cost = count_cost(model)
        dense_total = self.dense_cost.dense_macs
        if prunable_names is not None:
            names = set(prunable_names)
            dense_part = sum(layer.dense_macs for layer in self.dense_cost.layers if layer.name in names)
            part = sum(layer.macs() for layer in cost.layers if layer.name in names)
            prunable_fraction = part / dense_part if dense_part else math.nan
        elif cost.prunable_dense_macs:
            prunable_fraction = cost.prunable_macs() / cost.prunable_dense_macs
        else:
            prunable_fraction = 1.0
        row: Row = {
            "task": self.config.task,
            "model": self.config.model,
            "scale": self.config.scale,
            "method": method,
            "budget": budget,
            "psnr": result.psnr,
            "ssim": result.ssim,
            "macs_g": cost.macs() / 1e9,
            "macs_fraction": cost.macs() / dense_total,
            "prunable_macs_fraction": prunable_fraction,
            "params": cost.params,
            "params_nonzero": cost.nonzero_params(),
            "packed_bytes": cost.packed_bytes(),
            "step_ms": None,
            "step_time_ratio": None,
            "finetune_steps": None,
            "note": note,
            **per_image_columns(result),
        }
        if timed:
            self.timed[row_key(row)] = Timed(model, controller)
        return row

    def nm_prunable_names(self, m: int) -> list[str]:
        """Layers uniform N:M with group size ``m`` prunes on this model (first/last dense)."""
        layers, _ = eligible_layers(self.dense_model, m)
        return [layer.name for layer in layers]


def _same_recipe(checkpoint: Path, recipe: Recipe) -> bool:
    try:
        saved = load_checkpoint(checkpoint).meta.get("recipe")
    except NMRestoreError:
        return False
    return saved == json.loads(json.dumps(recipe.model_dump(mode="json")))


def row_key(row: Row) -> str:
    return f"{row['task']}:{row['method']}@{row['budget']}"


#: ``producer(context, budget) -> row, rows or None`` (None: not applicable; say why in context.notes).
#: A list is for methods whose one run makes several rows (PNG: one row per task).
RowProducer = Callable[[BenchContext, str | None], Row | list[Row] | None]


@dataclass(frozen=True)
class _Producer:
    fn: RowProducer
    per_budget: bool


_PRODUCERS: dict[str, _Producer] = {}


def register_row_producer(
    name: str, per_budget: bool = True, replace: bool = False
) -> Callable[[RowProducer], RowProducer]:
    """Register the rows of method ``name``: called once per budget, or once with None.

    ``replace`` swaps an existing producer (e.g. the same method with other settings).
    """

    def wrap(fn: RowProducer) -> RowProducer:
        if name in _PRODUCERS and not replace:
            raise ValueError(f"row producer {name!r} is registered twice")
        _PRODUCERS[name] = _Producer(fn, per_budget)
        return fn

    return wrap


def row_producer(name: str) -> _Producer:
    """The registered producer of method ``name`` (KeyError if none)."""
    return _PRODUCERS[name]


def list_row_producers() -> list[str]:
    return sorted(_PRODUCERS)


def finetuned_row(
    context: BenchContext, method: str, budget: str | None, sparsity: dict[str, Any] | None, **kw: Any
) -> Row | None:
    """The row of ``method`` at ``budget`` fine-tuned from the dense model (or from the row cache;
    None with ``cached_only`` when the cache does not hold it)."""
    label = method if budget is None else f"{method}-{budget}"
    key = f"{method}@{budget}:{row_digest(context.finetune_recipe(label, sparsity), context.dense.digest)}"
    cached = context.cached_rows.get(key)
    if cached is not None:  # finished in an earlier run (maybe on another day): same recipe, same row
        context.say(f"reusing the cached row {label}")
        return {**cached, "cache_key": key}
    if context.config.cached_only:
        context.notes.append(f"{label}: not finished yet (not in the row cache)")
        return None
    result = context.finetune(label, sparsity)
    row = context.row(
        method,
        budget if budget is not None else 1.0,
        result.model,
        evaluate_on_test(context, result.model),  # the test photos; result.final is the validation score
        controller=result.controller,
        **kw,
    )
    row["finetune_steps"] = context.config.finetune_steps
    row["cache_key"] = key
    return row


def evaluate_on_test(context: BenchContext, model: nn.Module) -> EvalResult:
    return evaluate_model(
        model, context.eval_set, context.crop, context.y_channel, with_ssim=True, tile=context.config.ci_tile
    )


def per_image_columns(result: EvalResult) -> Row:
    """``per_image`` (name, PSNR, SSIM of every test image) and ``tiles`` (every tile's PSNR, in order)."""
    per_image = [{k: v for k, v in r.items() if k != "tiles"} for r in result.per_image]
    tiles = [round(float(v), 4) for r in result.per_image for v in r.get("tiles", ())]
    return {"per_image": per_image, "tiles": tiles or None}
