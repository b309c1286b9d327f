"""PNG's training-time state: entering a task's phase, growing, pruning and exact freezing."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.errors import SparsityError
from nmrestore.methods.png.config import PHASES, Phase, PNGConfig
from nmrestore.methods.png.mask import PNGMask, prune_choice
from nmrestore.methods.png.tasks import owned_prefixes, owner_of, png_masks, select_task
from nmrestore.sparsity.api import (
    Controller,
)

log = logging.getLogger(__name__)


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

    The PNG schedule (:mod:`nmrestore.methods.png.program`) calls :meth:`begin` before every phase's
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
