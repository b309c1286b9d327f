"""What a benchmark run is: :class:`BenchConfig`, its recipes, and the cached dense model every method starts from."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from nmrestore.engine.checkpoint import load_checkpoint, upgrade_legacy_checkpoints
from nmrestore.engine.runner import (
    train,
)
from nmrestore.errors import RecipeError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.recipes.schema import BlurSpec, DataSource, Recipe, apply_overrides, recipe_from_dict
from nmrestore.sparsity.api import parse_nm

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
    row_cache: Path | None = Field(
        None, description="a JSON file of finished fine-tune rows keyed by recipe hash: reused, not retrained"
    )
    cached_only: bool = Field(False, description="report only the rows the row cache holds; train nothing new")
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


def default_cache_dir() -> Path:
    env = os.environ.get("NMRESTORE_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "nmrestore" / "bench"


def data_section(config: BenchConfig) -> dict[str, Any]:
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


def train_section(config: BenchConfig, steps: int, lr: float, milestones: list[float]) -> dict[str, Any]:
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
            "data": data_section(config),
            "train": train_section(config, config.dense_steps, config.dense_lr, [0.6, 0.85]),
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
    return ensure_trained(dense_recipe(config), config, echo)


def ensure_trained(recipe: Recipe, config: BenchConfig, echo: Echo | None = None) -> DenseCheckpoint:
    """Train ``recipe`` into ``config``'s cache unless it holds it already (see :func:`ensure_dense`)."""
    digest = recipe_digest(recipe)
    run_dir = (config.cache_dir or default_cache_dir()) / digest
    done = run_dir / "done.json"
    path = run_dir / "checkpoints" / "last.safetensors"
    if run_dir.is_dir():
        upgrade_legacy_checkpoints(run_dir)  # cached before checkpoints' digest covered metadata
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
        echo(f"training {recipe.name} ({recipe.model.name} x{recipe.model.scale}, {recipe.train.steps} steps) into {run_dir}")
    started = time.perf_counter()
    result = train(recipe, run_dir, resume=True, show_progress=config.show_progress)
    summary = {
        "recipe": recipe.model_dump(mode="json"),
        "digest": digest,
        "val_psnr": None if result.final is None else result.final.psnr,
        "seconds": time.perf_counter() - started,
    }
    atomic_write_text(done, json.dumps(summary, indent=2))
    return DenseCheckpoint(path, run_dir, digest, reused=False)


def config_from_overrides(quick: bool = False, overrides: Sequence[str] = ()) -> BenchConfig:
    """The quick or full preset with ``key=value`` overrides (values parsed as YAML), validated."""
    from pydantic import ValidationError

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


def copy_config(config: BenchConfig, **changes: Any) -> BenchConfig:
    """``config`` with some fields changed (validated again)."""
    data = copy.deepcopy(config.model_dump())
    data.update(changes)
    return BenchConfig(**data)
