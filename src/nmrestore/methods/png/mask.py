"""PNG's mask: one bit per task and weight (``task_bits``), and the prune/grow choices."""

from __future__ import annotations

import torch
from torch import Tensor

from nmrestore.errors import SparsityError
from nmrestore.methods.png.config import MAX_TASKS
from nmrestore.sparsity import nm
from nmrestore.sparsity.parametrization import GradMode, NMMask


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
