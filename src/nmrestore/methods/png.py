"""PNG: one network for several tasks through N:M prune-and-grow (DESIGN.md §3.4).

After "Micro-Structured Prune-and-Grow Networks for Flexible Image Restoration" (Jiang et al.,
CVPRW 2021), known from its abstract; the algorithm below is this project's design.

Tasks come in order (SR x2, x3, x4 by default). Layers whose shape differs per task (a
multi-task model's upsamplers, see :mod:`nmrestore.models.multitask`) belong to one task; every
other prunable layer is *shared* and each task sees it through its own N:M mask (one route per
task). Per task t:

1. **train** -- task 1 trains densely; a later task *grows*: every position that no earlier task
   keeps becomes trainable again, and task t trains on (earlier tasks' positions, frozen) + (free
   positions, trainable);
2. **prune** -- task t keeps the top N_t of that union in every group of M (magnitude), optionally
   taking at most ``max_grow`` free positions per group, so storage has a hard bound;
3. **finetune** -- task t fine-tunes only its own kept weights; unused free positions return to
   the pool, and everything task t keeps is frozen for the tasks after it.

Freezing is exact: frozen entries get zero gradient (a hook), fully frozen tensors leave the
optimizer (``requires_grad=False``), and after every optimizer step the frozen entries are copied
back from a snapshot, so neither Adam's moments nor weight decay can move them. Earlier tasks
therefore compute bit-identical outputs while later tasks train. Shared dense layers (the first
and last conv) and the biases of shared layers belong to task 1 and are frozen after it.

Masks are not nested rank prefixes here (task t keeps the top N_t of *its* union), so
:class:`PNGMask` holds them as bits: ``task_bits`` (uint8, bit t = task t keeps the weight), in the
``state_dict`` like every other mask state; ``route_n[t]`` is N_t (M while task t is unpruned).

Storage (:func:`png_storage`) is measured on a real packed format (:func:`pack_png`): the values
of the union of kept shared positions, one mask per task (bitmap or packed in-group indices,
whichever is smaller), the dense shared layers, and each task's own layers packed at N_t:M.
:func:`unpack_png_` restores every task bit-exactly from it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from nmrestore.cost import CostReport, count_cost
from nmrestore.errors import SparsityError
from nmrestore.models.multitask import MultiTaskSR
from nmrestore.sparsity import nm
from nmrestore.sparsity.api import (
    Controller,
    LayerInfo,
    NMConfig,
    attach_masks,
    eligible_layers,
    register_method,
)
from nmrestore.sparsity.parametrization import GradMode, NMMask, nm_layers, set_route

log = logging.getLogger(__name__)

#: Tasks fit in the bits of one uint8 per weight.
MAX_TASKS = 8
BYTES_PER_VALUE = 4  # fp32 storage

Phase = Literal["train", "finetune"]
PHASES: tuple[Phase, ...] = ("train", "finetune")


# -- configuration ---------------------------------------------------------------------------------
class PNGSteps(BaseModel):
    """Optimizer steps of each phase (the PNG runner trains one phase after another)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dense: int = Field(1000, ge=0, description="task 1's dense training (0: start from train.init_from)")
    grow: int = Field(500, ge=1, description="each later task's training with earlier positions frozen")
    finetune: int = Field(200, ge=0, description="every task's fine-tuning after its prune")
    finetune_lr_factor: float = Field(0.2, gt=0, le=1, description="fine-tuning lr = train.lr x this")


class PNGConfig(NMConfig):
    """Multi-task N:M prune-and-grow.

    ``ns`` gives N_t per task (the route of task t), in the model's task order; ``n`` and
    ``routes`` of the base config do not apply. ``tasks`` defaults to the multi-task model's own
    tasks (they must match when both are given); a model without tasks (e.g. one network at
    several compression rates) needs them here.

    ``max_grow`` (one value for every later task, or one per task with the first ignored) caps the
    free positions per group of M that a later task may claim, so the union of kept shared
    positions is at most ``min(M, N_1 + sum(max_grow))`` per group whatever training does; None
    leaves it uncapped (the union may then reach M, the whole dense tensor).
    """

    method: Literal["png"] = "png"  # type: ignore[assignment]
    m: int = Field(8, ge=2, le=255)
    ns: tuple[int, ...] = (4, 4, 4)
    tasks: tuple[str, ...] | None = None
    max_grow: int | tuple[int | None, ...] | None = 1
    grow_init: Literal["keep", "zero"] = "keep"
    steps: PNGSteps = Field(default_factory=PNGSteps)
    grad_mode: GradMode = GradMode.HARD

    def route_ns(self) -> tuple[int, ...]:
        """N per route: one route per task."""
        return self.ns

    @model_validator(mode="after")
    def _png_ranges(self) -> PNGConfig:
        if not 1 <= len(self.ns) <= MAX_TASKS:
            raise ValueError(f"ns needs one N per task (1..{MAX_TASKS} tasks), got {len(self.ns)}")
        if self.tasks is not None and len(self.tasks) != len(self.ns):
            raise ValueError(f"{len(self.tasks)} tasks but {len(self.ns)} values in ns")
        if self.tasks is not None and len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat a name: {list(self.tasks)}")
        if self.grad_mode is not GradMode.HARD:
            raise ValueError("PNG needs grad_mode 'hard': masked-out positions must get no gradient")
        if self.routes is not None and tuple(self.routes) != tuple(self.ns):
            raise ValueError("set N per task with 'ns' (routes are the tasks' N)")
        if isinstance(self.max_grow, tuple) and len(self.max_grow) != len(self.ns):
            raise ValueError(f"max_grow has {len(self.max_grow)} values for {len(self.ns)} tasks")
        for t in range(1, len(self.ns)):
            grow = self.grow_cap(t)
            if grow is not None and not 0 <= grow <= self.m:
                raise ValueError(f"max_grow must be in 0..M={self.m}, got {grow}")
            reachable = self.m if grow is None else min(self.m, self.ns[0] + grow)
            if self.ns[t] > reachable:
                raise ValueError(
                    f"task {t + 1} wants N={self.ns[t]} but can reach only {reachable} positions per group "
                    f"(N_1={self.ns[0]} + max_grow={grow}); raise max_grow or lower N"
                )
        return self

    def grow_cap(self, task: int) -> int | None:
        """Free positions per group task ``task`` may claim (None: no cap; task 0 is never capped)."""
        if task == 0:
            return None
        if isinstance(self.max_grow, tuple):
            return self.max_grow[task]
        return self.max_grow

    def union_bound(self) -> int:
        """Most kept shared positions per group of M, whatever the training does."""
        total = self.ns[0]
        for t in range(1, len(self.ns)):
            cap = self.grow_cap(t)
            total += self.m if cap is None else cap
        return min(self.m, total)


# -- the mask --------------------------------------------------------------------------------------
class PNGMask(NMMask):
    """Per-task N:M masks as bits: ``task_bits`` bit t set = task t keeps the weight.

    ``owner`` is -1 for a shared layer (route t uses bit t) or the index of the task owning the
    layer (every route uses the owner's bit; only that task runs the layer). ``ranks`` hold the
    last pruned task's order (kept first) so they stay a valid permutation for :func:`check_nm`;
    masks come from the bits only.
    """

    task_bits: Tensor

    def __init__(self, weight: Tensor, m: int, num_tasks: int, owner: int = -1, in_axis: int = 1) -> None:
        if not 1 <= num_tasks <= MAX_TASKS:
            raise SparsityError(f"PNG supports 1..{MAX_TASKS} tasks, got {num_tasks}")
        if not -1 <= owner < num_tasks:
            raise SparsityError(f"owner {owner} is not a task index (0..{num_tasks - 1}) or -1 (shared)")
        super().__init__(weight, m, [m] * num_tasks, in_axis, GradMode.HARD)
        self.owner = owner
        self.num_tasks = num_tasks
        # Nothing pruned yet: every task keeps every position (its route is dense until pruned).
        full = (1 << num_tasks) - 1
        self.register_buffer("task_bits", torch.full(tuple(weight.shape), full, dtype=torch.uint8))

    @property
    def shared(self) -> bool:
        """True when every task uses this layer (through its own bit)."""
        return self.owner < 0

    def _bit(self, task: int) -> int:
        return self.owner if self.owner >= 0 else task

    def task_mask(self, task: int) -> Tensor:
        """Boolean mask of ``task`` (the owner's for an owned layer)."""
        return ((self.task_bits >> self._bit(task)) & 1).bool()

    def earlier_mask(self, task: int) -> Tensor:
        """Positions kept by any task before ``task`` (what ``task`` must not change)."""
        if task == 0:
            return torch.zeros_like(self.task_bits, dtype=torch.bool)
        return (self.task_bits & ((1 << task) - 1)) != 0

    def union_mask(self) -> Tensor:
        """Positions kept by any task (for an owned layer: by its owner)."""
        if self.owner >= 0:
            return self.task_mask(self.owner)
        return self.task_bits != 0

    def mask(self) -> Tensor:
        """Float mask of the active route, from the bits (cached per route)."""
        cached = self._mask_cache.get(self.route)
        if cached is None or cached.device != self.task_bits.device:
            cached = self.task_mask(self.route).float()
            self._mask_cache[self.route] = cached
        return cached

    @torch.no_grad()
    def open_task(self, task: int) -> None:
        """Make every position visible to ``task`` (its training before the prune)."""
        bit = self._bit(task)
        self.task_bits |= 1 << bit
        if self.owner >= 0:
            self.route_n.fill_(self.m)
        else:
            self.route_n[task] = self.m
        self._mask_cache.clear()

    @torch.no_grad()
    def set_task_mask(self, task: int, keep: Tensor, n: int) -> None:
        """Store ``keep`` (N kept per group) as ``task``'s mask; ranks follow it (kept first)."""
        bit = self._bit(task)
        cleared = self.task_bits & (0xFF ^ (1 << bit))
        self.task_bits.copy_(cleared | (keep.to(torch.uint8) << bit))
        if self.owner >= 0:
            self.route_n.fill_(n)
        else:
            self.route_n[task] = n
        # a stable sort lists the kept positions first, in index order
        self.ranks.copy_(nm.ranks_from_scores(keep.float(), self.m, self.in_axis))
        self._mask_cache.clear()

    def extra_repr(self) -> str:
        where = "shared" if self.owner < 0 else f"task {self.owner}"
        return f"{super().extra_repr()}, {where}"


def select_top(weight: Tensor, candidates: Tensor, n: int, m: int, in_axis: int) -> Tensor:
    """The N largest-|w| candidates of every group of M (each group must hold >= N candidates)."""
    scores = torch.where(candidates, weight.detach().abs(), torch.full_like(weight, -1.0))
    keep = nm.ranks_from_scores(scores, m, in_axis) < n
    if bool((keep & ~candidates).any()):
        raise SparsityError(f"a group holds fewer than N={n} candidate positions")
    return keep


def prune_choice(mask: PNGMask, weight: Tensor, task: int, n: int, grow_cap: int | None) -> Tensor:
    """Task ``task``'s kept positions: top N of (earlier tasks' positions + at most ``grow_cap`` free ones)."""
    if mask.owner >= 0:
        return select_top(weight, torch.ones_like(weight, dtype=torch.bool), n, mask.m, mask.in_axis)
    earlier = mask.earlier_mask(task)
    free = ~earlier
    if grow_cap is None or task == 0:
        allowed_new = free
    elif grow_cap == 0:
        allowed_new = torch.zeros_like(free)
    else:
        allowed_new = _top_free(weight, free, grow_cap, mask)
    return select_top(weight, earlier | allowed_new, n, mask.m, mask.in_axis)


def _top_free(weight: Tensor, free: Tensor, cap: int, mask: PNGMask) -> Tensor:
    """The ``cap`` largest free positions of every group (fewer where fewer are free)."""
    scores = torch.where(free, weight.detach().abs(), torch.full_like(weight, -1.0))
    return (nm.ranks_from_scores(scores, mask.m, mask.in_axis) < cap) & free


# -- tasks -----------------------------------------------------------------------------------------
def png_tasks(model: nn.Module, config: PNGConfig) -> tuple[str, ...]:
    """The task names of ``model`` under ``config`` (the model's own for a multi-task model)."""
    if isinstance(model, MultiTaskSR):
        if config.tasks is not None and tuple(config.tasks) != model.tasks:
            raise SparsityError(
                f"sparsity.tasks {list(config.tasks)} differ from the model's tasks {list(model.tasks)}"
            )
        tasks = model.tasks
    elif config.tasks is not None:
        tasks = tuple(config.tasks)
    else:
        raise SparsityError(
            f"PNG needs tasks: use a multi-task model (e.g. edsr_small_multiscale) or set sparsity.tasks "
            f"for {type(model).__name__}"
        )
    if len(tasks) != len(config.ns):
        raise SparsityError(
            f"the model has {len(tasks)} tasks ({', '.join(tasks)}) but ns has {len(config.ns)} values"
        )
    return tasks


def owner_of(name: str, prefixes: dict[int, tuple[str, ...]]) -> int:
    """Index of the task owning module or parameter ``name`` (-1: shared)."""
    for task, owned in prefixes.items():
        if any(name == p or name.startswith(p + ".") for p in owned):
            return task
    return -1


def owned_prefixes(model: nn.Module, tasks: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """Task index -> module-name prefixes it owns (empty for a model without task layers)."""
    if not isinstance(model, MultiTaskSR):
        return {}
    modules = model.task_modules()
    return {i: tuple(modules.get(task, ())) for i, task in enumerate(tasks)}


def select_task(model: nn.Module, task: str | int) -> int:
    """Activate ``task`` (name or index) everywhere: the model's task layers and the masks' route."""
    tasks = model.tasks if isinstance(model, MultiTaskSR) else None
    routes = [mask for _, _, mask in nm_layers(model) if isinstance(mask, PNGMask)]
    names: tuple[str, ...] | None = tasks
    if names is None:
        names = tuple(getattr(model, "png_tasks", ()))
    if isinstance(task, int):
        index = task
        if names and not 0 <= index < len(names):
            raise SparsityError(f"task index {index} out of range (tasks: {', '.join(names)})")
    else:
        if task not in (names or ()):
            raise SparsityError(f"unknown task {task!r}; tasks: {', '.join(names or ()) or 'none'}")
        index = names.index(task)
    if isinstance(model, MultiTaskSR):
        model.set_task(model.tasks[index])
    if routes:
        set_route(model, index)
    return index


def activate_task(model: nn.Module, task: str) -> int:
    """``select_task`` for the CLI (``--task x3``): returns the active scale (1 without scales)."""
    if not isinstance(model, MultiTaskSR) and not png_masks(model):
        raise SparsityError(f"--task needs a multi-task model; {type(model).__name__} has no tasks")
    select_task(model, task)
    return int(getattr(model, "scale", 1))


def png_eval_extras(model: nn.Module, cost: CostReport) -> dict[str, Any]:
    """What ``nmrestore eval`` adds for a PNG checkpoint: the active task's cost and the storage report."""
    route = _route_of(model)
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


@contextmanager
def use_png_task(model: nn.Module, task: str | int) -> Iterator[int]:
    """Run a block with ``task`` active (layers and masks), restoring the previous one afterwards."""
    previous = model.task_index if isinstance(model, MultiTaskSR) else _route_of(model)
    index = select_task(model, task)
    try:
        yield index
    finally:
        select_task(model, previous)


def _route_of(model: nn.Module) -> int:
    for _, _, mask in nm_layers(model):
        return mask.route
    return 0


def png_masks(model: nn.Module) -> list[tuple[str, nn.Module, PNGMask]]:
    """Every (layer name, layer, PNG mask) of ``model``."""
    return [(name, module, mask) for name, module, mask in nm_layers(model) if isinstance(mask, PNGMask)]


def png_layer_table(model: nn.Module) -> str:
    """Per layer: owner (shared or a task), N per task, and the kept share of its weights (any task)."""
    masks = png_masks(model)
    tasks = _png_task_names(model, masks[0][2].num_tasks) if masks else ()
    lines = [
        f"{'layer':<34} {'owner':<8} {'N per task (' + '/'.join(tasks) + ')':<24} {'kept (any task)':>15}"
    ]
    for name, _, mask in masks:
        owner = "shared" if mask.shared else tasks[mask.owner]
        ns = "/".join(str(int(v)) for v in mask.route_n) if mask.shared else str(int(mask.route_n[0]))
        kept = float(mask.union_mask().float().mean())
        lines.append(f"{name:<34} {owner:<8} {ns + ':' + str(mask.m):<24} {kept:>15.1%}")
    return "\n".join(lines)


# -- the handler -----------------------------------------------------------------------------------
@register_method("png", PNGConfig)
def _png(model: nn.Module, layers: list[LayerInfo], config: PNGConfig) -> PNGController:
    tasks = png_tasks(model, config)
    prefixes = owned_prefixes(model, tasks)

    def factory(layer: LayerInfo) -> NMMask:
        owner = owner_of(layer.name, prefixes)
        return PNGMask(layer.module.weight, config.m, len(tasks), owner, layer.in_axis)

    attach_masks(layers, config, factory)
    if not isinstance(model, MultiTaskSR):
        model.png_tasks = tasks  # lets select_task resolve names on a plain model
    if not any(mask.shared for _, _, mask in png_masks(model)):
        raise SparsityError("PNG found no shared prunable layer: every prunable layer belongs to one task")
    return PNGController(model, config, tasks)


# -- the controller --------------------------------------------------------------------------------
@dataclass
class _Frozen:
    param: nn.Parameter
    where: Tensor  # bool, True = frozen
    values: Tensor  # the frozen entries, row-major


@dataclass
class _ParamRole:
    name: str
    param: nn.Parameter
    owner: int  # -1 shared
    mask: PNGMask | None  # the layer's mask when this is a masked weight


class PNGController(Controller):
    """The schedule's state: which task and phase run, what is frozen, and the prunes.

    The PNG runner (:mod:`nmrestore.engine.png_runner`) calls :meth:`begin` before every phase's
    Trainer and :meth:`end` after it; the Trainer calls :meth:`step` after every optimizer step
    (which restores the frozen entries). :meth:`state_dict` records (task, phase) in checkpoints.
    """

    def __init__(self, model: nn.Module, config: PNGConfig, tasks: Sequence[str]) -> None:
        self.model = model
        self.config = config
        self.tasks = tuple(tasks)
        self.task = 0
        self.phase: Phase | None = None
        self._frozen: list[_Frozen] = []
        self._hooks: list[Any] = []
        self._requires_grad: dict[int, bool] = {}
        prefixes = owned_prefixes(model, self.tasks)
        masked = {id(module.parametrizations.weight.original): mask for _, module, mask in png_masks(model)}
        self._roles = [
            _ParamRole(name, p, owner_of(name, prefixes), masked.get(id(p)))
            for name, p in model.named_parameters()
        ]

    # -- schedule --------------------------------------------------------------------------------
    def begin(self, task: int, phase: Phase, fresh: bool = True) -> None:
        """Enter ``phase`` of ``task``: on a fresh start open (train) or prune (finetune) its masks,
        then activate the task and freeze everything it must not change.

        ``fresh=False`` resumes a phase from a checkpoint: the masks are already in the state.
        """
        if not 0 <= task < len(self.tasks):
            raise SparsityError(f"task index {task} out of range (tasks: {', '.join(self.tasks)})")
        if phase not in PHASES:
            raise SparsityError(f"unknown PNG phase {phase!r}; phases: {', '.join(PHASES)}")
        self.end()
        if fresh and phase == "train":
            self.open(task)
        elif fresh and phase == "finetune":
            self.prune(task)
        self.task, self.phase = task, phase
        select_task(self.model, task)
        self._freeze(task)

    def end(self) -> None:
        """Leave the current phase: drop gradient hooks and give every tensor its gradient back."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._frozen.clear()
        for role in self._roles:
            if id(role.param) in self._requires_grad:
                role.param.requires_grad_(self._requires_grad[id(role.param)])
        self._requires_grad.clear()

    @torch.no_grad()
    def open(self, task: int) -> None:
        """Task ``task`` sees every position of its layers (dense, or grow into the free ones)."""
        for _, module, mask in png_masks(self.model):
            if mask.shared or mask.owner == task:
                mask.open_task(task)
                if self.config.grow_init == "zero" and task > 0 and mask.shared:
                    weight = module.parametrizations.weight.original
                    weight.masked_fill_(~mask.earlier_mask(task), 0.0)

    @torch.no_grad()
    def prune(self, task: int) -> None:
        """Task ``task`` keeps the top N_t of (earlier positions + grown ones) in every group."""
        n = self.config.ns[task]
        cap = self.config.grow_cap(task)
        for _, module, mask in png_masks(self.model):
            if mask.shared or mask.owner == task:
                weight = module.parametrizations.weight.original
                keep = prune_choice(mask, weight, task, n, cap)
                mask.set_task_mask(task, keep, n)

    def _freeze(self, task: int) -> None:
        for role in self._roles:
            if role.owner >= 0:
                trainable: bool | None = role.owner == task
            elif task == 0:
                trainable = True
            elif role.mask is not None:
                trainable = None  # partly: the earlier tasks' positions are frozen
            else:
                trainable = False  # shared dense tensors and shared biases belong to task 1
            param = role.param
            if trainable is None:
                assert role.mask is not None
                where = role.mask.earlier_mask(task).to(param.device)
                if bool(where.all()):
                    trainable = False
                else:
                    self._frozen.append(_Frozen(param, where, param.detach()[where].clone()))
                    keep = (~where).to(param.dtype)
                    self._hooks.append(param.register_hook(lambda grad, keep=keep: grad * keep))
                    continue
            if not trainable and param.requires_grad:
                self._requires_grad[id(param)] = True
                param.requires_grad_(False)

    # -- Controller protocol ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, step: int) -> None:
        """Put every frozen entry back (Adam moments or weight decay must not move them)."""
        for frozen in self._frozen:
            frozen.param.masked_scatter_(frozen.where, frozen.values)

    def regularizer(self) -> dict[str, Tensor]:
        """PNG adds no loss term."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The phase being run (masks live in the model's state_dict)."""
        return {"task": self.task, "phase": self.phase, "tasks": list(self.tasks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Re-enter the saved phase (masks come from the model's state_dict, not from here)."""
        if state.get("tasks") is not None and tuple(state["tasks"]) != self.tasks:
            raise SparsityError(f"checkpoint tasks {state['tasks']} differ from {list(self.tasks)}")
        phase = state.get("phase")
        if phase is not None:
            self.begin(int(state["task"]), phase, fresh=False)

    def trainable_count(self) -> int:
        """Entries the current phase may change (for logs and tests)."""
        frozen = {id(f.param): int(f.where.sum()) for f in self._frozen}
        return sum(r.param.numel() - frozen.get(id(r.param), 0) for r in self._roles if r.param.requires_grad)


# -- packing: the storage format -------------------------------------------------------------------
Category = str  # "shared_values" | "shared_masks" | "shared_dense" | "task:<name>"


@dataclass
class PNGPacked:
    """Everything needed to run every task: named tensors, each in one storage category."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    categories: dict[str, Category] = field(default_factory=dict)
    encodings: dict[str, str] = field(default_factory=dict)  # mask tensor -> "bitmap" | "index"
    tasks: tuple[str, ...] = ()
    ns: tuple[int, ...] = ()
    m: int = 0

    def add(self, name: str, tensor: Tensor, category: Category) -> None:
        """Store ``tensor`` (a CPU copy) under ``name`` in ``category``."""
        if name in self.tensors:
            raise SparsityError(f"packed tensor {name!r} added twice")
        self.tensors[name] = tensor.detach().cpu().contiguous()
        self.categories[name] = category

    def nbytes(self, category: Category | None = None) -> int:
        """Bytes of every tensor (of ``category`` when given)."""
        return sum(
            t.numel() * t.element_size()
            for name, t in self.tensors.items()
            if category is None or self.categories[name] == category
        )


def mask_nbytes(numel: int, n: int, m: int) -> int:
    """Bytes of one N:M mask over ``numel`` weights: a bitmap or packed indices, whichever is smaller."""
    bitmap = math.ceil(numel / 8)
    index = math.ceil(numel // m * n * nm.index_bits(m) / 8)
    return min(bitmap, index)


def _encode_mask(keep: Tensor, n: int, m: int, in_axis: int) -> tuple[Tensor, str]:
    numel = keep.numel()
    if mask_nbytes(numel, n, m) < math.ceil(numel / 8):
        ones = keep.float()
        packed = nm.pack(ones, nm.ranks_from_scores(ones, m, in_axis), n, m, in_axis)
        return packed.indices, "index"
    bits = np.packbits(keep.detach().cpu().numpy().reshape(-1).astype(np.uint8))
    return torch.from_numpy(bits.copy()), "bitmap"


def _decode_mask(data: Tensor, encoding: str, shape: tuple[int, ...], n: int, m: int, in_axis: int) -> Tensor:
    numel = math.prod(shape)
    if encoding == "bitmap":
        bits = np.unpackbits(data.numpy())[:numel].astype(bool)
        return torch.from_numpy(bits.copy()).reshape(shape)
    group_shape = nm.to_groups(torch.empty(shape), m, in_axis).shape[:-1]
    packed = nm.PackedNM(torch.ones(*group_shape, n), data, shape, n, m, in_axis)
    return nm.unpack(packed) != 0


def _task_ns(model: nn.Module) -> tuple[int, ...]:
    for _, _, mask in png_masks(model):
        if mask.shared:
            return tuple(int(v) for v in mask.route_n)
    raise SparsityError("the model has no shared PNG layer")


def pack_png(model: nn.Module) -> PNGPacked:
    """The deployable multi-task model: union values, per-task masks, dense parts, task layers.

    Shared masked layers store the values of positions any task keeps (fp32, row-major) and one
    mask per task; a task's own layers store their kept values and one mask; every other tensor
    (dense layers, biases) is stored as is, in the category of the task that owns it ("shared"
    when none does). A task not pruned yet counts as dense (its mask keeps every position).
    """
    masks = png_masks(model)
    if not masks:
        raise SparsityError("the model has no PNG masks (sparsify_ it with PNGConfig first)")
    tasks = _png_task_names(model, masks[0][2].num_tasks)
    ns = _task_ns(model)
    m = masks[0][2].m
    packed = PNGPacked(tasks=tasks, ns=ns, m=m)
    prefixes = owned_prefixes(model, tasks)
    masked_ids: set[int] = set()
    for name, module, mask in masks:
        weight = module.parametrizations.weight.original.detach()
        masked_ids.add(id(module.parametrizations.weight.original))
        if mask.shared:
            packed.add(f"{name}.values", weight[mask.union_mask()], "shared_values")
            for t, task in enumerate(tasks):
                data, encoding = _encode_mask(mask.task_mask(t), ns[t], m, mask.in_axis)
                packed.add(f"{name}.mask.{task}", data, "shared_masks")
                packed.encodings[f"{name}.mask.{task}"] = encoding
        else:
            task = tasks[mask.owner]
            n = int(mask.route_n[0])
            keep = mask.task_mask(mask.owner)
            packed.add(f"{name}.values", weight[keep], f"task:{task}")
            data, encoding = _encode_mask(keep, n, m, mask.in_axis)
            packed.add(f"{name}.mask.{task}", data, f"task:{task}")
            packed.encodings[f"{name}.mask.{task}"] = encoding
    for pname, param in model.named_parameters():
        if id(param) in masked_ids:
            continue
        owner = owner_of(pname, prefixes)
        packed.add(pname, param, "shared_dense" if owner < 0 else f"task:{tasks[owner]}")
    return packed


def _png_task_names(model: nn.Module, count: int) -> tuple[str, ...]:
    if isinstance(model, MultiTaskSR):
        return model.tasks
    names = tuple(getattr(model, "png_tasks", ()))
    return names if len(names) == count else tuple(f"task{i + 1}" for i in range(count))


@torch.no_grad()
def unpack_png_(model: nn.Module, packed: PNGPacked) -> nn.Module:
    """Load a :class:`PNGPacked` into a model of the same architecture carrying PNG masks."""
    masked_ids: set[int] = set()
    tasks = packed.tasks
    for name, module, mask in png_masks(model):
        original = module.parametrizations.weight.original
        masked_ids.add(id(original))
        shape = tuple(original.shape)
        bits = torch.zeros(shape, dtype=torch.uint8)
        if mask.shared:
            for t, task in enumerate(tasks):
                key = f"{name}.mask.{task}"
                keep = _decode_mask(
                    packed.tensors[key], packed.encodings[key], shape, packed.ns[t], packed.m, mask.in_axis
                )
                bits |= keep.to(torch.uint8) << t
            mask.route_n.copy_(torch.tensor(packed.ns))
        else:
            task = tasks[mask.owner]
            key = f"{name}.mask.{task}"
            n = packed.ns[mask.owner]
            keep = _decode_mask(packed.tensors[key], packed.encodings[key], shape, n, packed.m, mask.in_axis)
            bits = keep.to(torch.uint8) << mask.owner
            mask.route_n.fill_(n)
        mask.task_bits.copy_(bits.to(mask.task_bits.device))
        mask._mask_cache.clear()
        dense = torch.zeros(shape, dtype=original.dtype)
        dense[mask.union_mask().cpu()] = packed.tensors[f"{name}.values"].to(original.dtype)
        original.copy_(dense.to(original.device))
    for pname, param in model.named_parameters():
        if id(param) not in masked_ids:
            param.copy_(packed.tensors[pname].to(param.device))
    return model


# -- storage and cost report -----------------------------------------------------------------------
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


__all__ = [
    "MAX_TASKS",
    "PNGConfig",
    "PNGController",
    "PNGMask",
    "PNGPacked",
    "PNGSteps",
    "PNGStorage",
    "TaskStorage",
    "activate_task",
    "mask_nbytes",
    "owner_of",
    "pack_png",
    "png_eval_extras",
    "png_layer_table",
    "png_masks",
    "png_storage",
    "png_tasks",
    "prune_choice",
    "select_task",
    "storage_bound",
    "unpack_png_",
    "use_png_task",
]
