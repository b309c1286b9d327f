"""PNG's typed config: the tasks, N per task, the per-phase step counts."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from nmrestore.sparsity.api import (
    NMConfig,
)
from nmrestore.sparsity.parametrization import GradMode

#: Tasks fit in the bits of one uint8 per weight.
MAX_TASKS = 8


Phase = Literal["train", "finetune"]


PHASES: tuple[Phase, ...] = ("train", "finetune")


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
    training_program: ClassVar[str | None] = "nmrestore.methods.png.program:train_png"
    eval_hooks: ClassVar[str | None] = "nmrestore.methods.png.program:PNGHooks"
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
        if self.out_block != 1:
            raise ValueError("png grows each task's positions per output channel; it has no out_block (use 1)")
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
