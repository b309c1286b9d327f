"""SLS's typed config: budget, search schedule, annealing, score settings."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from nmrestore.sparsity.api import (
    NMConfig,
)
from nmrestore.sparsity.parametrization import GradMode

BudgetKind = Literal["prunable_macs", "macs", "params"]


#: Threshold on the cumulative priority p above which a rank is kept (the paper's).
KEEP_THRESHOLD = 0.5


class SLSConfig(NMConfig):
    """Layer-wise N:M searched under a compute budget (SLS).

    ``n`` and ``routes`` of the base config do not apply: every layer starts dense (N = M) and
    learns its N; a single route is supported.

    Defaults follow the published code (JungHunOh/SLS_CVPR2022, CARN x4: batch 16, LR patch 48,
    an epoch of 1000 batches): M = 32; the masks ("pruning units") re-selected by magnitude at every
    epoch, before and after N is frozen; every second epoch, ``coef *= 1.2`` if the compression
    ratio grew by less than 0.2 *during the last epoch* (``anneal_rule="last_epoch"``; an epoch is
    ``max(1, anneal_interval // 2)`` steps); the best model is picked after epoch 200 of 300, hence the
    200k-step deadline. Short runs must set ``search_steps`` (and usually
    ``anneal_interval``/``refresh_every``) to fit their length.

    Deviations, each a named option: ``anneal_rule="interval"`` compares the growth over the whole
    ``anneal_interval`` (nmrestore's earlier rule: it anneals less, since a ratio rising 0.15 per
    epoch grows 0.3 per interval and never triggers it); ``refresh_after_freeze=False`` keeps the
    masks fixed once N is frozen (the fine-tuning then trains exactly the model that is saved, as
    one-shot N:M does; the published code keeps re-selecting them).

    ``lam`` multiplies the *normalised* cost C / C_ref (in [1/M, 1]), so it does not depend on the
    model, the patch size or the batch. Its size only matters relative to the task loss's gradient
    on the scores: with Adam (whose step ignores a gradient's scale) a cost push far above every
    layer's task signal lowers all scores at the same speed and every layer ends with the same N;
    the search is only layer-wise when the push sits inside the spread of the task signals. The
    default 0.01 does: on edsr_small x2 (built-in images in [0, 1], L1, at N = 8:32) the task
    gradient on the boundary scores ranges over 1e-5..1e-3 across layers while the cost gradient is
    0.013 * lam (0.05 * lam for the 4x-wide upsampler). It also sits near the paper's balance:
    lambda = 1e-10 on raw MACs of a 48x48 LR patch is ~0.4 in normalised units for CARN/EDSR x4 on
    images in [0, 255], i.e. ~1.5e-3 with the 255x smaller task gradients of [0, 1] images. Too
    small is cheap to fix (``alpha`` raises ``coef`` whenever compression stalls); too large is not.

    ``score_lr`` gives the scores their own learning rate (see :meth:`SLSController.param_groups`):
    Adam moves a score about one lr per step, so at the paper's 1e-4 dropping a layer to N = 8:32
    takes ~1000 steps -- fine for 300k-step runs, too slow for short ones. ``input_size`` is the LR
    input (height, width) for the MAC counts; None means the 1280x720-output convention.

    ``refresh_after_freeze`` (default True, the published code's ``update_pruning_units()`` every
    epoch whether frozen or not): the ranks keep being recomputed every ``refresh_every`` steps after
    N is frozen; the frozen *N* never changes, only which weights are kept. With
    ``grad_mode="srste"`` and ``refresh_every=1`` the fine-tuning phase is SR-STE's training at the
    learned layer-wise N. False: refreshed once at the freeze, then fixed.
    """

    method: Literal["sls"] = "sls"  # type: ignore[assignment]
    eval_hooks: ClassVar[str | None] = "nmrestore.methods.sls.program:SLSHooks"
    m: int = Field(32, ge=2, le=255)
    grad_mode: GradMode = GradMode.HARD
    budget: float = Field(0.25, gt=0, le=1)
    budget_kind: BudgetKind = "prunable_macs"
    lam: float = Field(0.01, gt=0)
    alpha: float = Field(1.2, ge=1)
    anneal_interval: int = Field(2000, ge=1)
    anneal_threshold: float = Field(0.2, ge=0)
    anneal_rule: Literal["last_epoch", "interval"] = "last_epoch"
    refresh_every: int = Field(1000, ge=0)  # 0: ranks are only refreshed when N is frozen (once)
    refresh_after_freeze: bool = True
    search_steps: int = Field(200_000, ge=0)
    score_init: float = Field(1.0, gt=0)
    score_clamp: float = Field(1.03, gt=KEEP_THRESHOLD)
    score_lr: float | None = Field(None, gt=0)
    input_size: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _sls_ranges(self) -> SLSConfig:
        if self.routes is not None and len(self.routes) > 1:
            raise ValueError("sls learns one N per layer for a single route; routes are not supported")
        if self.score_init > self.score_clamp:
            raise ValueError(
                f"score_init ({self.score_init}) must not exceed score_clamp ({self.score_clamp})"
            )
        if self.input_size is not None and min(self.input_size) < 1:
            raise ValueError(f"input_size must be positive, got {self.input_size}")
        return self
