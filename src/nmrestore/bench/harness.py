"""The benchmark harness: the CPU protocol (docs/ARCHITECTURE.md) as one function, :func:`run_benchmark`.

One dense model per (architecture, scale, data, schedule) is trained once on the training photos
(the built-in ones, or the ``train`` split of ``data_root`` such as the 2K photo set) and cached under
a hash of its recipe; every method is then fine-tuned from that checkpoint for the *same* number of
steps and scored on the test photos (Y PSNR/SSIM, crop = scale), next to bicubic and the dense model
itself. Validation never uses the test photos: it runs on ``data_root``'s ``valid`` split, or on the
held-out strips of the training photos, and only at the end (no checkpoint is selected). Each row
keeps its per-image PSNR and the PSNR of every fixed ``ci_tile`` HR tile, from which
:mod:`nmrestore.bench.evidence` computes paired 95% confidence intervals. A killed run continues:
the dense model and each fine-tune resume from their last checkpoints. Each row also carries the cost at a 1280x720 output
(effective MACs, whole-network and prunable-only fractions, non-zero params, packed bytes) and the
training-step time relative to the dense model, measured in the same process, interleaved.
With ``BenchConfig.task`` = ``deblur`` / ``denoise`` the same protocol runs at scale 1 on photos
degraded on the fly (test photos with a fixed seed per image), scored on RGB PSNR/SSIM without crop,
with the degraded input itself (method ``input``) as the no-network baseline instead of bicubic.

Methods produce rows through a registry (:func:`register_row_producer`), so a later method or task
adds its rows here without touching the loop. Nothing in this module writes docs: the CLI and
``benchmarks/bench_sr.py`` decide where the table, the plot and the JSON go.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from nmrestore.bench.evidence import attach_deltas, evidence_checks, format_delta
from nmrestore.cost import CostReport, count_cost
from nmrestore.data.datasets import SREvalDataset
from nmrestore.engine.checkpoint import load_checkpoint
from nmrestore.engine.evaluate import EvalResult, bicubic_restorer, evaluate_fn, evaluate_model
from nmrestore.engine.runner import (
    RunResult,
    build_eval_dataset,
    build_train_dataset,
    model_from_checkpoint,
    train,
)
from nmrestore.errors import NMRestoreError
from nmrestore.methods.filter import FilterController
from nmrestore.methods.sls.controller import SLSController
from nmrestore.recipes.schema import BlurSpec, DataSource, Recipe, recipe_from_dict
from nmrestore.runtime.timing import Timings, interleaved
from nmrestore.sparsity.api import Controller, eligible_layers, parse_nm

log = logging.getLogger("nmrestore.bench")

#: Bump when the way dense models are trained for the cache changes without the recipe changing.
CACHE_VERSION = 1

#: Recipe keys that do not change the trained weights' meaning (excluded from the cache key).
_VOLATILE_TRAIN_KEYS = ("threads", "device", "tensorboard", "log_every", "ckpt_every", "val_every", "amp")

Row = dict[str, Any]
Echo = Callable[[str], None]

#: Columns every row has (JSON and tables), in display order.
ROW_KEYS: tuple[str, ...] = (
    "task",
    "model",
    "scale",
    "method",
    "budget",
    "psnr",
    "ssim",
    "macs_g",
    "macs_fraction",
    "prunable_macs_fraction",
    "params",
    "params_nonzero",
    "packed_bytes",
    "step_ms",
    "step_time_ratio",
    "finetune_steps",
    "note",
)


# -- configuration -------------------------------------------------------------------------------
class BenchConfig(BaseModel):
    """What to benchmark and how long to train (every fine-tune gets ``finetune_steps``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task: Literal["sr", "deblur", "denoise"] = "sr"
    sigma: float = Field(25.0, gt=0, le=255, description="denoise: noise std on the 0..255 scale")
    blur: BlurSpec = Field(default_factory=BlurSpec, description="deblur: the synthetic motion blur")
    model: str = "edsr_small"
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    scale: int = Field(2, ge=1, le=8)
    dense_steps: int = Field(3000, ge=1)
    dense_lr: float = Field(5e-4, gt=0)
    finetune_steps: int = Field(300, ge=1)
    finetune_lr: float = Field(1e-4, gt=0)
    budgets: tuple[str, ...] = ("2:4", "8:32", "4:32", "2:32")
    methods: tuple[str, ...] = ("dense_ft", "oneshot", "srste", "sls", "filter")
    patch_size: int = Field(32, ge=4)
    batch_size: int = Field(16, ge=1)
    samples_per_epoch: int = Field(800, ge=1)
    max_train_images: int | None = Field(None, ge=1)
    max_test_images: int | None = Field(None, ge=1)
    data_root: Path | None = Field(
        None, description="a DIV2K-style folder with train/valid/test splits (nmrestore data photos); None: built-in"
    )
    ci_tile: int | None = Field(96, ge=8, description="HR tile side of the paired bootstrap; None: no tiles")
    timing: bool = True
    seed: int = Field(0, ge=0)
    quick: bool = False
    timing_rounds: int = Field(7, ge=1, description="interleaved timed steps per model (median taken)")
    timing_warmup: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    cache_dir: Path | None = None  # None: $NMRESTORE_BENCH_CACHE or ~/.cache/nmrestore/bench
    work_dir: Path | None = None  # fine-tune runs; None: a temporary folder, removed afterwards
    show_progress: bool = False

    @field_validator("budgets")
    @classmethod
    def _budgets_parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for budget in value:
            parse_nm(budget)
        return value


def quick_config(**overrides: Any) -> BenchConfig:
    """A smoke-sized run (about 5 minutes on 2 cores): short dense training, short fine-tunes."""
    values: dict[str, Any] = {
        "quick": True,
        "dense_steps": 300,
        "finetune_steps": 30,
        "batch_size": 8,
        "patch_size": 32,
        "timing_rounds": 5,
        "timing_warmup": 1,
    }
    values.update(overrides)
    return BenchConfig(**values)


def full_config(**overrides: Any) -> BenchConfig:
    """The documented run: edsr_small x2, dense 3000 steps, every method fine-tuned 300 steps (batch 16).

    3000 dense steps put edsr_small x2 more than 1 dB above bicubic on the built-in test photos;
    300 fine-tune steps at lr 1e-4 are demo_oneshot.yaml's (one-shot 2:4 recovers to dense there).
    """
    return BenchConfig(**overrides)


# -- the dense model (cached) ------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get("NMRESTORE_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nmrestore" / "bench"


def _data(config: BenchConfig) -> dict[str, Any]:
    train = {
        "patch_size": config.patch_size,
        "batch_size": config.batch_size,
        "samples_per_epoch": config.samples_per_epoch,
        "max_images": config.max_train_images,
    }
    if config.data_root is None:  # validation: the held-out bottom strips of the training photos
        return {"train": {"source": "builtin", **train}}
    root = str(config.data_root)
    return {
        "train": {"source": "folder", "root": root, "split": "train", **train},
        "val": {"source": "folder", "root": root, "split": "valid"},
    }


def test_source(config: BenchConfig) -> DataSource:
    """The images every row is scored on: the built-in test photos or ``data_root``'s test split."""
    if config.data_root is None:
        return DataSource(source="builtin", split="test", max_images=config.max_test_images)
    return DataSource(source="folder", root=config.data_root, split="test", max_images=config.max_test_images)


def _train_section(config: BenchConfig, steps: int, lr: float, milestones: list[float]) -> dict[str, Any]:
    return {
        "steps": steps,
        "lr": lr,
        "schedule": {"kind": "multistep", "milestones": milestones, "gamma": 0.5},
        # validation only at the end: nothing is selected on the test images
        "val_every": steps,
        "ckpt_every": max(1, steps // 4),
        "log_every": max(1, min(25, steps)),
        "device": config.device,
        # threads stay out of recipes (they are set on the process): a rerun with other threads
        # can resume a half-trained cached model, whose saved recipe must match exactly
    }


def task_section(config: BenchConfig) -> dict[str, Any]:
    """The recipes' ``task`` section; empty for SR, so SR recipes (and their cache hashes) are unchanged."""
    if config.task == "denoise":
        return {"task": {"kind": "denoise", "sigma": config.sigma}}
    if config.task == "deblur":
        return {"task": {"kind": "deblur", "blur": config.blur.model_dump(mode="json")}}
    return {}


def dense_recipe(config: BenchConfig) -> Recipe:
    """The recipe of the benchmark's dense model (its hash is the cache key)."""
    return recipe_from_dict(
        {
            "name": f"bench-dense-{config.model}-x{config.scale}",
            "seed": config.seed,
            **task_section(config),
            "model": {"name": config.model, "scale": config.scale, "kwargs": dict(config.model_kwargs)},
            "data": _data(config),
            "train": _train_section(config, config.dense_steps, config.dense_lr, [0.6, 0.85]),
        },
        "benchmark dense recipe",
    )


def recipe_digest(recipe: Recipe) -> str:
    """A stable hash of what determines the trained weights (not threads, device or logging)."""
    data = recipe.model_dump(mode="json")
    data.pop("name", None)
    for key in _VOLATILE_TRAIN_KEYS:
        data["train"].pop(key, None)
    text = json.dumps({"version": CACHE_VERSION, "recipe": data}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DenseCheckpoint:
    """The cached dense model: where it is and whether this call trained it."""

    path: Path  # the final checkpoint (last step; never selected on the test images)
    run_dir: Path
    digest: str
    reused: bool


def ensure_dense(config: BenchConfig, echo: Echo | None = None) -> DenseCheckpoint:
    """Train the dense model of ``config`` unless the cache already holds it (same recipe hash).

    A run killed half-way is resumed from its last checkpoint; a finished run is marked by
    ``done.json`` in its folder and reused as is.
    """
    recipe = dense_recipe(config)
    digest = recipe_digest(recipe)
    run_dir = (config.cache_dir or default_cache_dir()) / digest
    done = run_dir / "done.json"
    path = run_dir / "checkpoints" / "last.safetensors"
    if done.is_file() and path.is_file():
        return DenseCheckpoint(path, run_dir, digest, reused=True)
    if path.is_file():  # a run killed half-way: resume it with the recipe it was started with
        saved = load_checkpoint(path).meta.get("recipe")
        previous = None if saved is None else recipe_from_dict(saved, f"{path} (embedded recipe)")
        if previous is not None and recipe_digest(previous) == digest:
            recipe = previous
        else:
            shutil.rmtree(run_dir)
    if config.threads:
        torch.set_num_threads(config.threads)
    if echo:
        echo(f"training the dense {config.model} x{config.scale} ({config.dense_steps} steps) into {run_dir}")
    started = time.perf_counter()
    result = train(recipe, run_dir, resume=True, show_progress=config.show_progress)
    summary = {
        "recipe": recipe.model_dump(mode="json"),
        "digest": digest,
        "val_psnr": None if result.final is None else result.final.psnr,
        "seconds": time.perf_counter() - started,
    }
    done.write_text(json.dumps(summary, indent=2))
    return DenseCheckpoint(path, run_dir, digest, reused=False)


# -- the context producers see -------------------------------------------------------------------
@dataclass
class Timed:
    """A trained model kept for the step-time measurement (with its controller, if any)."""

    model: nn.Module
    controller: Controller | None = None


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
            "data": _data(config),
            "train": {
                **_train_section(config, config.finetune_steps, config.finetune_lr, [0.67]),
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
            self.timed[_row_key(row)] = Timed(model, controller)
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


def _row_key(row: Row) -> str:
    return f"{row['task']}:{row['method']}@{row['budget']}"


# -- row producers -------------------------------------------------------------------------------
#: ``producer(context, budget) -> row, rows or None`` (None: not applicable; say why in context.notes).
#: A list is for methods whose one run makes several rows (PNG: one row per task).
RowProducer = Callable[[BenchContext, str | None], Row | list[Row] | None]


@dataclass(frozen=True)
class _Producer:
    fn: RowProducer
    per_budget: bool


_PRODUCERS: dict[str, _Producer] = {}


#: Producers that live beside their method's training code, imported on first use (their modules
#: are heavy and import this one): method -> module with a ``register_bench_rows()`` function.
_LAZY_PRODUCERS: dict[str, str] = {
    "classpruning": "nmrestore.engine.adaptive",
    "png": "nmrestore.bench.multitask",
}


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


def _load_lazy_producer(name: str) -> None:
    if name in _PRODUCERS or name not in _LAZY_PRODUCERS:
        return
    importlib.import_module(_LAZY_PRODUCERS[name]).register_bench_rows()


def list_row_producers() -> list[str]:
    return sorted(set(_PRODUCERS) | set(_LAZY_PRODUCERS))


def _method_registered(name: str, context: BenchContext) -> bool:
    try:
        importlib.import_module("nmrestore.methods")
    except Exception as exc:  # a method module mid-edit must not take every row down
        context.notes.append(f"nmrestore.methods does not import ({exc!r})")
        return False
    from nmrestore.sparsity.api import list_methods

    return name in list_methods()


def _finetuned_row(
    context: BenchContext, method: str, budget: str | None, sparsity: dict[str, Any] | None, **kw: Any
) -> Row:
    label = method if budget is None else f"{method}-{budget}"
    result = context.finetune(label, sparsity)
    row = context.row(
        method,
        budget if budget is not None else 1.0,
        result.model,
        _evaluate(context, result.model),  # the test photos; result.final is the validation score
        controller=result.controller,
        **kw,
    )
    row["finetune_steps"] = context.config.finetune_steps
    return row


@register_row_producer("dense_ft", per_budget=False)
def _dense_ft(context: BenchContext, budget: str | None) -> Row:
    """The dense model fine-tuned for the same steps: the control for 'fine-tuning alone'."""
    return _finetuned_row(context, "dense_ft", None, None)


@register_row_producer("oneshot")
def _oneshot(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    return _finetuned_row(context, "oneshot", budget, {"method": "oneshot", "n": n, "m": m})


@register_row_producer("srste")
def _srste(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    return _finetuned_row(context, "srste", budget, {"method": "srste", "n": n, "m": m})


@register_row_producer("filter")
def _filter(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    if not _method_registered("filter", context):
        context.notes.append("filter rows skipped: method 'filter' is not registered")
        return None
    _, m = parse_nm(budget)
    row = _finetuned_row(
        context,
        "filter",
        budget,
        {"method": "filter", "budget": budget},
        prunable_names=context.nm_prunable_names(m),
    )
    controller = context.timed[_row_key(row)].controller
    if isinstance(controller, FilterController):
        report = controller.report
        row["target_macs_fraction"] = report.target_fraction
        row["note"] = (
            f"target {report.target_fraction:.4f}, channels "
            + "/".join(f"{g.after}" for g in report.groups[:2])
            + (" ..." if len(report.groups) > 2 else "")
        )
    return row


#: Epochs per SLS search in the harness, and the compression-ratio growth per epoch the annealing asks
#: for over a whole search: the published code's 0.2 per 1000-step epoch over its 200-epoch search
#: is 40 in all, which covers every budget down to 1/41 of the MACs (2:32 needs 16).
SLS_EPOCHS = 100
SLS_RATIO_GROWTH = 0.2 * 200


def sls_settings(steps: int, budget: float) -> dict[str, Any]:
    """SLS scaled to a short fine-tune: search in the first half, fine-tune with N frozen after.

    The published code's schedule compressed into ``steps``: the search (the first half) holds
    :data:`SLS_EPOCHS` epochs; masks are re-selected every epoch, also after N is frozen; every second
    epoch the cost coefficient grows by 1.2 if the ratio grew by less than the threshold during the
    last epoch, the threshold being :data:`SLS_RATIO_GROWTH` spread over the search's epochs, so a
    short search gets the published annealing budget, not just its constants.
    """
    search = max(1, steps // 2)
    epoch = max(1, search // SLS_EPOCHS)
    return {
        "method": "sls",
        "m": 32,
        "budget": budget,
        "budget_kind": "prunable_macs",
        "search_steps": search,
        "refresh_every": epoch,
        "anneal_interval": 2 * epoch,
        "anneal_threshold": SLS_RATIO_GROWTH * epoch / search,
        "score_lr": 0.01,
    }


@register_row_producer("sls")
def _sls(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    if m != 32 or n == m:
        return None  # SLS rows are the M = 32 budgets (8:32, 4:32, 2:32), as in the paper
    if not _method_registered("sls", context):
        note = "SLS rows skipped: nmrestore.methods.sls is not importable/registered yet"
        if note not in context.notes:
            context.notes.append(note)
        return None
    row = _finetuned_row(context, "sls", budget, sls_settings(context.config.finetune_steps, n / m))
    controller = context.timed[_row_key(row)].controller
    message = controller.message if isinstance(controller, SLSController) else ""
    if isinstance(controller, SLSController) and controller.projected:
        row["note"] = f"projected onto the budget: {message}"
    elif message:
        row["note"] = message
    return row


# -- timing --------------------------------------------------------------------------------------
def _training_batch(config: BenchConfig) -> dict[str, Tensor]:
    recipe = dense_recipe(config)
    dataset = build_train_dataset(recipe)
    samples = [dataset[i] for i in range(config.batch_size)]
    return {key: torch.stack([s[key] for s in samples]) for key in ("lq", "gt")}


def measure_step_times(
    models: dict[str, Timed],
    batch: dict[str, Tensor],
    rounds: int,
    warmup: int = 1,
    lr: float = 1e-6,
    first_step: int = 1,
) -> Timings:
    """Seconds per training step of each model on the same batch, interleaved (:mod:`~nmrestore.runtime.timing`).

    A step is what the Trainer does: forward, L1 loss (+ the controller's regularizer), backward,
    Adam step, ``controller.step`` (SR-STE's rank refresh happens here).
    """
    optimizers = {
        key: torch.optim.Adam([p for p in t.model.parameters() if p.requires_grad], lr=lr)
        for key, t in models.items()
    }
    steps = dict.fromkeys(models, first_step)  # each model steps once per round

    def train_step(key: str) -> None:
        timed = models[key]
        model = timed.model
        device = next(model.parameters()).device
        lq, gt = batch["lq"].to(device), batch["gt"].to(device)
        model.train()
        loss = F.l1_loss(model(lq), gt)
        if timed.controller is not None:
            for extra in timed.controller.regularizer().values():
                loss = loss + extra
        optimizers[key].zero_grad(set_to_none=True)
        loss.backward()
        optimizers[key].step()
        if timed.controller is not None:
            timed.controller.step(steps[key])
        steps[key] += 1

    cuda = any(next(t.model.parameters()).device.type == "cuda" for t in models.values())
    return interleaved(
        {key: partial(train_step, key) for key in models},
        rounds,
        warmup,
        sync=torch.cuda.synchronize if cuda else None,
    )


# -- the benchmark -------------------------------------------------------------------------------
def _evaluate(context: BenchContext, model: nn.Module) -> EvalResult:
    return evaluate_model(
        model, context.eval_set, context.crop, context.y_channel, with_ssim=True, tile=context.config.ci_tile
    )


def per_image_columns(result: EvalResult) -> Row:
    """``per_image`` (name, PSNR, SSIM of every test image) and ``tiles`` (every tile's PSNR, in order)."""
    per_image = [{k: v for k, v in r.items() if k != "tiles"} for r in result.per_image]
    tiles = [round(float(v), 4) for r in result.per_image for v in r.get("tiles", ())]
    return {"per_image": per_image, "tiles": tiles or None}


def run_benchmark(config: BenchConfig, notes: list[str] | None = None, echo: Echo | None = None) -> list[Row]:
    """Run the protocol for ``config``; returns one row per (method, budget) plus bicubic and dense.

    ``notes`` (if given) receives what was skipped and why; ``echo`` gets progress lines.
    """
    for method in config.methods:
        _load_lazy_producer(method)
    unknown = [m for m in config.methods if m not in _PRODUCERS]
    if unknown:
        raise NMRestoreError(
            f"no benchmark rows for method(s) {unknown}; known: {', '.join(list_row_producers())}"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    notes = notes if notes is not None else []
    dense = ensure_dense(config, echo)
    if dense.reused and echo:
        echo(f"reusing the cached dense model {dense.path}")
    dense_model, _ = model_from_checkpoint(dense.path)
    device = torch.device(
        "cuda"
        if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    dense_model.to(device)
    recipe = dense_recipe(config)
    eval_set = build_eval_dataset(test_source(config), config.scale, recipe.task)
    temporary = config.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="nmrestore-bench-")) if temporary else Path(config.work_dir)  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    context = BenchContext(
        config, dense, dense_model, count_cost(dense_model), eval_set, work_dir, notes, echo=echo
    )
    try:
        rows: list[Row] = []
        # the no-network baseline: bicubic upscaling for SR, the degraded input itself otherwise
        sr = config.task == "sr"
        baseline = bicubic_restorer(config.scale) if sr else (lambda lq: lq)
        bicubic = evaluate_fn(
            baseline, eval_set, context.crop, context.y_channel, with_ssim=True, tile=config.ci_tile
        )
        rows.append(
            {
                **{key: None for key in ROW_KEYS},
                "task": config.task,
                "model": config.model,
                "scale": config.scale,
                "method": "bicubic" if sr else "input",
                "psnr": bicubic.psnr,
                "ssim": bicubic.ssim,
                "macs_g": 0.0,
                "macs_fraction": 0.0,
                "note": "MATLAB-style bicubic upscaling (MACs not counted)"
                if sr
                else f"the degraded input ({recipe.task.degradation().describe()})",  # type: ignore[union-attr]
                **per_image_columns(bicubic),
            }
        )
        dense_row = context.row("dense", 1.0, dense_model, _evaluate(context, dense_model))
        dense_row["note"] = f"{config.dense_steps} steps, cache {dense.digest}" + (
            " (reused)" if dense.reused else ""
        )
        rows.append(dense_row)
        for method in config.methods:
            producer = _PRODUCERS[method]
            budgets: Sequence[str | None] = config.budgets if producer.per_budget else [None]
            for budget in budgets:
                made = producer.fn(context, budget)
                rows.extend([] if made is None else made if isinstance(made, list) else [made])
        attach_deltas(rows)
        if not config.timing:
            return rows
        context.say(f"timing {len(context.timed)} models ({config.timing_rounds} interleaved rounds)")
        timings = measure_step_times(
            context.timed,
            _training_batch(config),
            config.timing_rounds,
            config.timing_warmup,
            first_step=config.finetune_steps + 1,
        )
        for row in rows:
            key = _row_key(row)
            if timings.samples.get(key) and row.get("step_time_ratio") is None:  # a producer's own timing stands
                row["step_ms"] = timings.median(key) * 1e3
                row["step_time_ratio"] = timings.ratio(key, _row_key(dense_row))
        return rows
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)


# -- checks and output ---------------------------------------------------------------------------
def check_rows(rows: list[Row], tolerance: float = 0.02) -> list[tuple[str, bool]]:
    """The protocol's claims, each with pass/fail: 2:4 costs ~nothing, budgets are exact/met."""
    results: list[tuple[str, bool]] = []
    dense = next((r for r in rows if r["method"] == "dense"), None)
    oneshot24 = next((r for r in rows if r["method"] == "oneshot" and r["budget"] == "2:4"), None)
    if dense and oneshot24:
        gap = dense["psnr"] - oneshot24["psnr"]
        results.append((f"one-shot 2:4 within 0.1 dB of dense (gap {gap:+.3f} dB)", gap <= 0.1))
    for row in rows:
        budget = row.get("budget")
        if row["method"] in ("oneshot", "srste") and isinstance(budget, str):
            n, m = parse_nm(budget)
            ok = abs(row["prunable_macs_fraction"] - n / m) < 1e-9
            results.append(
                (f"{row['method']} {budget}: prunable MACs {row['prunable_macs_fraction']:.6f} = {n}/{m}", ok)
            )
        if row["method"] == "filter" and "target_macs_fraction" in row:
            target = row["target_macs_fraction"]
            ok = abs(row["macs_fraction"] - target) <= tolerance * target
            results.append(
                (f"filter {budget}: MACs {row['macs_fraction']:.4f} within 2% of {target:.4f}", ok)
            )
        if row["method"] == "sls" and isinstance(budget, str):
            n, m = parse_nm(budget)
            ok = row["prunable_macs_fraction"] <= n / m * (1 + 1e-9)
            results.append(
                (f"sls {budget}: prunable MACs {row['prunable_macs_fraction']:.4f} <= {n / m:.4f}", ok)
            )
    return results + evidence_checks(rows)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


#: The columns of the printed/markdown table.
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("method", "method", 0),
    ("budget", "budget", 0),
    ("psnr", "PSNR", 5),
    ("ssim", "SSIM", 4),
    ("macs_g", "GMACs", 4),
    ("macs_fraction", "MACs %", 0),
    ("prunable_macs_fraction", "prunable %", 0),
    ("params_nonzero", "params (nz)", 0),
    ("packed_bytes", "packed B", 0),
    ("step_time_ratio", "step x", 3),
    ("vs_dense", "Δ vs dense, 95% CI", 0),
)


def _cell(row: Row, key: str, digits: int) -> str:
    value = row.get(key)
    if key == "budget" and row.get("method") in ("dense", "dense_ft"):
        return "-"
    if key in ("macs_fraction", "prunable_macs_fraction") and isinstance(value, float):
        return f"{100 * value:.2f}"
    if key == "psnr" and isinstance(value, float):
        return f"{value:.3f}"
    if key == "ssim" and isinstance(value, float):
        return f"{value:.4f}"
    if key == "vs_dense":
        return format_delta(value)
    return _fmt(value, digits or 4)


def format_table(rows: list[Row]) -> str:
    """A plain-text table for the terminal."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    body = [[_cell(row, key, digits) for key, _, digits in TABLE_COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for r in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The same table in Markdown."""
    lines = [
        "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, digits) for key, _, digits in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def describe(config: BenchConfig) -> str:
    """One paragraph: what was trained how long, on what."""
    train = "all" if config.max_train_images is None else str(config.max_train_images)
    test = "all" if config.max_test_images is None else str(config.max_test_images)
    if config.data_root is None:
        train_set, test_set = f"{train} built-in training images", f"{test} built-in test images"
        val_set = "the held-out bottom strips of the training images"
    else:
        train_set = f"{train} training images of {config.data_root} (train split)"
        test_set = f"{test} images of its test split"
        val_set = "its valid split"
    ci = (
        f" 'Δ vs dense': mean paired difference of the PSNR of fixed {config.ci_tile}x{config.ci_tile} HR tiles"
        " with its 95% bootstrap interval (BCa, 10,000 resamples, seed 0)."
        if config.ci_tile
        else ""
    )
    if config.task == "sr":
        what, patch, metric = f"{config.model} x{config.scale}", "LR patch", f"Y-channel PSNR/SSIM, crop {config.scale}"
    else:
        degradation = dense_recipe(config).task.degradation()
        assert degradation is not None
        what = f"{config.model}, {config.task} ({degradation.describe()}, made on the fly; test inputs with a fixed seed per image)"
        patch, metric = "patch", "RGB PSNR/SSIM, no border crop"
    return (
        f"{what}; dense: {config.dense_steps} steps at lr {config.dense_lr:g}; every method "
        f"fine-tuned {config.finetune_steps} steps at lr {config.finetune_lr:g} from it (batch {config.batch_size}, "
        f"{patch} {config.patch_size}, {train_set}; validated at the end only, on {val_set}); scored on "
        f"{test_set}, {metric}; last checkpoints. MACs for a 1280x720 output; 'MACs %' of the dense whole "
        f"network, 'prunable %' of the layers N:M prunes; 'step x' = training-step time / dense, measured "
        f"interleaved in the same process (median of {config.timing_rounds}).{ci}"
    )


def machine() -> str:
    """Where the figures were measured (one line)."""
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def plot_psnr_macs(rows: list[Row], path: str | Path, title: str | None = None) -> Path:
    """PSNR against effective GMACs: one line per method, bicubic and dense(-ft) as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = {
        "bicubic": ("k", "x", 80),
        "input": ("k", "x", 80),
        "dense": ("k", "*", 160),
        "dense_ft": ("tab:grey", "D", 40),
    }
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        selected = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs_g"])
        xs = [r["macs_g"] for r in selected]
        ys = [r["psnr"] for r in selected]
        if method in points:
            color, marker, size = points[method]
            ax.scatter(
                xs,
                ys,
                color=color,
                marker=marker,
                s=size,
                label=method,
                zorder=4 if method == "dense_ft" else 3,
            )
            if method in ("bicubic", "input"):
                ax.axhline(ys[0], color="k", linestyle=":", linewidth=0.8)
        else:
            ax.plot(xs, ys, marker="o", label=method)
            for r in selected:
                ax.annotate(
                    str(r["budget"]),
                    (r["macs_g"], r["psnr"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("effective GMACs (1280x720 output)")
    sr = all(str(r.get("task") or "sr").startswith("sr") for r in rows)
    ax.set_ylabel("PSNR (dB, Y channel)" if sr else "PSNR (dB, RGB)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(
    rows: list[Row],
    path: str | Path,
    config: BenchConfig | None = None,
    notes: list[str] | None = None,
    command: str | None = None,
) -> Path:
    """The rows (and the config, notes, command and date) as JSON."""
    from datetime import datetime, timezone

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": None if config is None else config.model_dump(mode="json"),
        "machine": machine(),
        "notes": list(notes or []),
        "checks": [{"check": text, "ok": ok} for text, ok in check_rows(rows)],
        "rows": rows,
    }
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def config_from_overrides(quick: bool = False, overrides: Sequence[str] = ()) -> BenchConfig:
    """The quick or full preset with ``key=value`` overrides (values parsed as YAML), validated."""
    from pydantic import ValidationError

    from nmrestore.errors import RecipeError
    from nmrestore.recipes.schema import apply_overrides

    preset = quick_config() if quick else full_config()
    data = apply_overrides(preset.model_dump(), list(overrides))
    try:
        return BenchConfig(**data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in exc.errors()
        )
        allowed = ", ".join(sorted(BenchConfig.model_fields))
        raise RecipeError(f"bad benchmark setting ({problems}); settings: {allowed}") from None


def write_report(
    rows: list[Row],
    config: BenchConfig,
    out_dir: str | Path,
    notes: Sequence[str] = (),
    command: str | None = None,
) -> Path:
    """``out_dir``/bench_<task>.md (table, checks, notes) beside its plot ``bench_<task>_psnr_macs.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_psnr_macs(rows, out_dir / f"bench_{config.task}_psnr_macs.png", plot_title(config))
    page = out_dir / f"bench_{config.task}.md"
    header = f"# Benchmark: {config.task}\n\n"
    if command:
        header += f"Command: `{command}`  \n"
    header += f"Machine: {machine()}\n\n"
    page.write_text(header + report_body(rows, config, notes, plot.name) + "\n")
    return page


def plot_title(config: BenchConfig) -> str:
    what = f"x{config.scale}" if config.task == "sr" else config.task
    return f"{config.model} {what}: PSNR vs MACs ({'quick' if config.quick else 'full'} run)"


def report_body(rows: list[Row], config: BenchConfig, notes: Sequence[str], plot: str | None = None) -> str:
    """The Markdown body shared by the CLI report and docs/BENCHMARKS.md: setup, table, checks, plot."""
    parts = [describe(config), "", markdown_table(rows), ""]
    checks = check_rows(rows)
    if checks:
        parts += ["Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks] + [""]
    if notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    if plot:
        parts += [f"![PSNR against MACs]({plot})", ""]
    return "\n".join(parts)


def copy_config(config: BenchConfig, **changes: Any) -> BenchConfig:
    """``config`` with some fields changed (validated again)."""
    data = copy.deepcopy(config.model_dump())
    data.update(changes)
    return BenchConfig(**data)


__all__ = [
    "ROW_KEYS",
    "BenchConfig",
    "BenchContext",
    "DenseCheckpoint",
    "RowProducer",
    "Timed",
    "check_rows",
    "config_from_overrides",
    "copy_config",
    "default_cache_dir",
    "dense_recipe",
    "describe",
    "ensure_dense",
    "format_table",
    "full_config",
    "list_row_producers",
    "machine",
    "markdown_table",
    "measure_step_times",
    "plot_psnr_macs",
    "plot_title",
    "quick_config",
    "recipe_digest",
    "register_row_producer",
    "report_body",
    "run_benchmark",
    "sls_settings",
    "write_json",
    "write_report",
]
