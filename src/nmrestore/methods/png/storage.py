"""PNG's storage and cost report against separate dense and N:M models, and the storage bound."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from nmrestore.cost import CostReport, count_cost
from nmrestore.errors import SparsityError
from nmrestore.methods.png.config import PNGConfig
from nmrestore.methods.png.packing import mask_nbytes, pack_png
from nmrestore.methods.png.tasks import (
    active_route,
    owned_prefixes,
    owner_of,
    png_masks,
    png_tasks,
    use_png_task,
)
from nmrestore.models.multitask import MultiTaskSR
from nmrestore.sparsity.api import (
    eligible_layers,
)

BYTES_PER_VALUE = 4  # fp32 storage


def png_eval_extras(model: nn.Module, cost: CostReport) -> dict[str, Any]:
    """What ``nmrestore eval`` adds for a PNG checkpoint: the active task's cost and the storage report."""
    route = active_route(model)
    storage = png_storage(model)
    task = model.task if isinstance(model, MultiTaskSR) else storage.tasks[route].task
    return {
        "task": task,
        "cost": cost.summary(route),
        "png_storage": storage.summary(),
        "png_tasks": [
            {
                "task": t.task,
                "n": t.n,
                "m": t.m,
                "macs_g": t.macs / 1e9,
                "prunable_macs_fraction": t.prunable_macs_fraction,
            }
            for t in storage.tasks
        ],
        "extra_lines": [f"task {task} (route {route})", storage.table()],
    }


@dataclass(frozen=True)
class TaskStorage:
    """One task's share of the storage, its cost, and what a separate model for it would weigh."""

    task: str
    n: int
    m: int
    own_bytes: int  # the task's own layers (packed) and dense tensors
    shared_mask_bytes: int  # the task's masks over the shared layers
    dense_model_bytes: int  # a separate dense single-task model
    nm_model_bytes: int  # a separate single-task N_t:M model, packed the same way
    macs: float  # effective MACs at a 1280x720 output
    dense_macs: int
    prunable_macs_fraction: float  # effective / dense MACs of the layers the task runs under N:M
    params_nonzero: int  # weights the task computes with (+ biases and dense tensors)


@dataclass(frozen=True)
class PNGStorage:
    """Bytes of the multi-task model against separate models (all fp32 values)."""

    tasks: tuple[TaskStorage, ...]
    shared_values_bytes: int
    shared_dense_bytes: int
    union_positions: int
    shared_positions: int

    @property
    def shared_mask_bytes(self) -> int:
        """Every task's masks over the shared layers."""
        return sum(t.shared_mask_bytes for t in self.tasks)

    @property
    def task_bytes(self) -> int:
        """Every task's own layers."""
        return sum(t.own_bytes for t in self.tasks)

    @property
    def total_bytes(self) -> int:
        """The whole multi-task model."""
        return self.shared_values_bytes + self.shared_mask_bytes + self.shared_dense_bytes + self.task_bytes

    @property
    def union_fraction(self) -> float:
        """Kept shared positions (any task) / all shared positions."""
        return self.union_positions / self.shared_positions if self.shared_positions else 0.0

    @property
    def one_dense_bytes(self) -> float:
        """ "One dense model": the mean of the tasks' separate dense models."""
        return sum(t.dense_model_bytes for t in self.tasks) / len(self.tasks)

    @property
    def separate_dense_bytes(self) -> int:
        """T separately trained dense single-task models."""
        return sum(t.dense_model_bytes for t in self.tasks)

    @property
    def separate_nm_bytes(self) -> int:
        """T separately trained single-task N_t:M models, packed like PNG."""
        return sum(t.nm_model_bytes for t in self.tasks)

    def ratio(self, total: float | None = None) -> float:
        """``total`` (PNG's by default) in units of one dense model."""
        return (self.total_bytes if total is None else total) / self.one_dense_bytes

    def summary(self) -> dict[str, float | int]:
        """Bytes and ratios as a flat dict (JSON, final.json, eval --json)."""
        smallest = min(t.dense_model_bytes for t in self.tasks)
        return {
            "png_bytes": self.total_bytes,
            "shared_values_bytes": self.shared_values_bytes,
            "shared_mask_bytes": self.shared_mask_bytes,
            "shared_dense_bytes": self.shared_dense_bytes,
            "task_bytes": self.task_bytes,
            "union_fraction": self.union_fraction,
            "one_dense_bytes": self.one_dense_bytes,
            "png_vs_one_dense": self.ratio(),
            "png_vs_smallest_dense": self.total_bytes / smallest,
            "separate_dense_bytes": self.separate_dense_bytes,
            "separate_dense_vs_one_dense": self.ratio(self.separate_dense_bytes),
            "separate_nm_bytes": self.separate_nm_bytes,
            "separate_nm_vs_one_dense": self.ratio(self.separate_nm_bytes),
        }

    def table(self) -> str:
        """A plain-text report: per task, then the totals."""
        lines = [
            f"{'task':<8} {'N:M':>5} {'GMACs':>9} {'prunable':>9} {'own B':>11} {'masks B':>9} "
            f"{'dense model B':>14} {'N:M model B':>12}"
        ]
        for t in self.tasks:
            lines.append(
                f"{t.task:<8} {f'{t.n}:{t.m}':>5} {t.macs / 1e9:>9.3f} {t.prunable_macs_fraction:>9.2%} "
                f"{t.own_bytes:>11,} {t.shared_mask_bytes:>9,} {t.dense_model_bytes:>14,} {t.nm_model_bytes:>12,}"
            )
        s = self.summary()
        lines += [
            f"shared values {self.shared_values_bytes:,} B (union of kept positions: {self.union_fraction:.1%} of "
            f"{self.shared_positions:,}), shared masks {self.shared_mask_bytes:,} B, shared dense {self.shared_dense_bytes:,} B, "
            f"task layers {self.task_bytes:,} B",
            f"PNG total {self.total_bytes:,} B = {s['png_vs_one_dense']:.3f}x one dense model "
            f"({self.one_dense_bytes:,.0f} B, mean of the tasks'; {s['png_vs_smallest_dense']:.3f}x the smallest); "
            f"{len(self.tasks)} dense models {self.separate_dense_bytes:,} B = {s['separate_dense_vs_one_dense']:.3f}x; "
            f"{len(self.tasks)} N:M models {self.separate_nm_bytes:,} B = {s['separate_nm_vs_one_dense']:.3f}x",
        ]
        return "\n".join(lines)


def png_storage(model: nn.Module, output_size: tuple[int, int] | None = None) -> PNGStorage:
    """Storage of ``model`` from its packed form, per-task MACs, and the separate-model baselines.

    ``output_size`` (height, width) of the HR output for MACs; 1280x720 by default.
    """
    packed = pack_png(model)
    tasks, ns, m = packed.tasks, packed.ns, packed.m
    masks = png_masks(model)
    prefixes = owned_prefixes(model, tasks)
    masked_ids = {id(module.parametrizations.weight.original): mask for _, module, mask in masks}
    union = sum(int(mask.union_mask().sum()) for _, _, mask in masks if mask.shared)
    shared_positions = sum(mask.task_bits.numel() for _, _, mask in masks if mask.shared)
    per_task: list[TaskStorage] = []
    for t, task in enumerate(tasks):
        dense_bytes = nm_bytes = nonzero = 0
        for pname, param in model.named_parameters():
            owner = owner_of(pname, prefixes)
            if owner not in (-1, t):
                continue
            dense_bytes += param.numel() * BYTES_PER_VALUE
            mask = masked_ids.get(id(param))
            if mask is None:
                nm_bytes += param.numel() * BYTES_PER_VALUE
                nonzero += param.numel()
            else:
                kept = param.numel() // m * ns[t]
                nm_bytes += kept * BYTES_PER_VALUE + mask_nbytes(param.numel(), ns[t], m)
                nonzero += kept
        shared_masks = sum(
            packed.tensors[name].numel()
            for name, cat in packed.categories.items()
            if cat == "shared_masks" and name.endswith(f".mask.{task}")
        )
        with use_png_task(model, t):
            cost = count_cost(model, _input_size(model, output_size))
        prunable = cost.prunable_macs(t) / cost.prunable_dense_macs if cost.prunable_dense_macs else 1.0
        per_task.append(
            TaskStorage(
                task=task,
                n=ns[t],
                m=m,
                own_bytes=packed.nbytes(f"task:{task}"),
                shared_mask_bytes=shared_masks,
                dense_model_bytes=dense_bytes,
                nm_model_bytes=nm_bytes,
                macs=cost.macs(t),
                dense_macs=cost.dense_macs,
                prunable_macs_fraction=prunable,
                params_nonzero=nonzero,
            )
        )
    storage = PNGStorage(
        tasks=tuple(per_task),
        shared_values_bytes=packed.nbytes("shared_values"),
        shared_dense_bytes=packed.nbytes("shared_dense"),
        union_positions=union,
        shared_positions=shared_positions,
    )
    if storage.total_bytes != packed.nbytes():
        raise SparsityError(
            f"storage figures do not add up: {storage.total_bytes} != {packed.nbytes()} packed bytes"
        )
    return storage


def _input_size(model: nn.Module, output_size: tuple[int, int] | None) -> tuple[int, int] | None:
    if output_size is None:
        return None
    scale = int(getattr(model, "scale", 1))
    return output_size[0] // scale, output_size[1] // scale


def storage_bound(model: nn.Module, config: PNGConfig) -> dict[str, float]:
    """Worst-case PNG bytes of an unsparsified ``model`` under ``config``, from shapes alone.

    The union of kept shared positions is at most :meth:`PNGConfig.union_bound` per group, so this
    holds for any training. Works on a ``meta``-device model (paper-scale sizes without weights).
    """
    tasks = png_tasks(model, config)
    prefixes = owned_prefixes(model, tasks)
    layers, _ = eligible_layers(model, config.m, dense_first_last=config.dense_first_last)
    masked = {id(layer.module.weight): layer for layer in layers}
    m = config.m
    total = 0.0
    dense = [0] * len(tasks)
    for pname, param in model.named_parameters():
        owner = owner_of(pname, prefixes)
        numel = param.numel()
        for t in range(len(tasks)):
            if owner in (-1, t):
                dense[t] += numel * BYTES_PER_VALUE
        if id(param) not in masked:
            total += numel * BYTES_PER_VALUE
        elif owner >= 0:
            n = config.ns[owner]
            total += numel // m * n * BYTES_PER_VALUE + mask_nbytes(numel, n, m)
        else:
            total += numel // m * config.union_bound() * BYTES_PER_VALUE
            total += sum(mask_nbytes(numel, n, m) for n in config.ns)
    one_dense = sum(dense) / len(dense)
    return {
        "png_bytes_bound": total,
        "one_dense_bytes": one_dense,
        "smallest_dense_bytes": float(min(dense)),
        "png_vs_one_dense_bound": total / one_dense,
        "png_vs_smallest_dense_bound": total / min(dense),
        "union_bound": config.union_bound() / m,
    }
