"""SLS: layer-wise N:M learned under a compute budget (Oh et al., CVPR 2022).

Every prunable layer learns its own N. It holds M-1 *priority scores* s (init 1);
``p = cumprod(clamp(s, 0, 1.03))`` and rank k >= 1 of every group of M is kept while p stays above
0.5, so N_l = 1 + (number of kept ranks) lies in 1..M and the mask is always "the N_l best ranks"
(magnitude ranks, refreshed periodically). The loss gets ``lam * coef * C / C_ref`` with
``C = sum_l N_l / M * cost_l``; ``coef`` grows by ``alpha`` whenever the compression ratio stalls.
As soon as C <= budget * C_ref every N is frozen and the run continues as plain fine-tuning.

What this module fixes in the published code (github JungHunOh/SLS_CVPR2022):

* it runs wherever the model runs (CPU or GPU); nothing is hard-wired to CUDA;
* it never ends above budget: past ``search_steps`` (or on :meth:`SLSController.finalize`) N is
  lowered where the learned scores are least sure, until the budget holds, and the run says so;
* the frozen N used for evaluation *is* the checkpoint's (``route_n`` + a ``frozen`` buffer in the
  model's ``state_dict``), never re-derived from scores that an optimizer may still move;
* the mask is always a prefix of the ranks: with the 1.03 clamp, p can climb back above 0.5 after
  a dip (0.45 * 1.03**4 > 0.5), which in the published code keeps rank 5 after dropping ranks 1-4.
  Here rank k is kept only if p_j > 0.5 for every j <= k.

Design choices (see the docstrings of :class:`SLSConfig` and :class:`SLSController` for details):
straight-through estimator with identity backward (the paper's); scores projected back into
[0, score_clamp] after each step so the clamp never traps them with zero gradient; the cost is
normalised (lambda does not depend on patch size or model size). As in the published code, the
ranks keep being re-selected after N is frozen and the annealing looks at the last epoch's growth;
the earlier nmrestore variants are options (``refresh_after_freeze=False``, ``anneal_rule="interval"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from nmrestore.cost import CostReport, count_cost
from nmrestore.errors import BudgetError, SparsityError
from nmrestore.sparsity import nm
from nmrestore.sparsity.api import (
    PRUNABLE_TYPES,
    Controller,
    LayerInfo,
    NMConfig,
    attach_masks,
    register_method,
)
from nmrestore.sparsity.parametrization import SRSTE_LAMBDA, GradMode, NMMask, dense_weight, nm_layers

logger = logging.getLogger(__name__)

BudgetKind = Literal["prunable_macs", "macs", "params"]

#: Threshold on the cumulative priority p above which a rank is kept (the paper's).
KEEP_THRESHOLD = 0.5

#: Relative slack when comparing a cost with the budget (float rounding of large MAC counts).
_BUDGET_RTOL = 1e-9


class SLSConfig(NMConfig):
    """Layer-wise N:M searched under a compute budget (SLS).

    ``n`` and ``routes`` of the base config do not apply: every layer starts dense (N = M) and
    learns its N; a single route is supported.

    Defaults follow the published code (JungHunOh/SLS_CVPR2022, CARN x4: batch 16, LR patch 48,
    an epoch of 1000 batches): M = 32; the masks ("pruning units") re-selected by magnitude at every
    epoch, before and after N is frozen; every second epoch, ``coef *= 1.2`` if the compression
    ratio grew by less than 0.2 *during the last epoch* (``anneal_rule="last_epoch"``; an epoch is
    ``anneal_interval // 2`` steps); the best model is picked after epoch 200 of 300, hence the
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
        if self.anneal_rule == "last_epoch" and self.anneal_interval < 2:
            raise ValueError("anneal_rule 'last_epoch' needs anneal_interval >= 2 (two epochs)")
        return self


# -- the mask ----------------------------------------------------------------------------------
class _HardThreshold(torch.autograd.Function):
    """Forward the prefix indicator b_k = 1[p_j > 0.5 for all j <= k]; backward identity (STE)."""

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:  # type: ignore[override]
        return torch.cumprod((p > KEEP_THRESHOLD).to(p.dtype), 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class SLSMask(NMMask):
    """An :class:`NMMask` whose N is learned from M-1 priority scores, then frozen.

    While searching, :meth:`keep` is ``[1, b_1, ..., b_{M-1}]`` with b from the scores (hard
    forward, straight-through backward), so the mask is rebuilt every forward and gradients reach
    ``scores``. Once frozen, ``route_n`` holds N, the scores are ignored (and stop requiring
    gradients) and the mask is a cached uniform ``rank < N`` table. ``scores`` and the ``frozen``
    buffer are in the ``state_dict``, so a checkpoint restores either state exactly.
    """

    def __init__(
        self,
        weight: Tensor,
        m: int,
        in_axis: int = 1,
        grad_mode: GradMode | str = GradMode.HARD,
        srste_lambda: float = SRSTE_LAMBDA,
        score_init: float = 1.0,
        score_clamp: float = 1.03,
        criterion: nm.Criterion = nm.magnitude,
    ) -> None:
        super().__init__(weight, m, m, in_axis, grad_mode, srste_lambda, criterion)
        if m < 2:
            raise SparsityError(f"sls needs M >= 2, got {m}")
        self.score_clamp = float(score_clamp)
        self.scores = nn.Parameter(torch.full((m - 1,), float(score_init), device=weight.device))
        self.register_buffer("frozen", torch.tensor(False, device=weight.device))
        self._is_frozen = False
        self.sync_n()

    # -- scores -> N ---------------------------------------------------------------------------
    def priorities(self) -> Tensor:
        """p_k = prod_{j<=k} clamp(s_j, 0, score_clamp), differentiable in the scores."""
        return torch.cumprod(self.scores.clamp(0.0, self.score_clamp), 0)

    def learned_keep(self) -> Tensor:
        """Keep table from the scores, ``[1, b_1..b_{M-1}]``; straight-through to the scores."""
        b = _HardThreshold.apply(self.priorities())
        return torch.cat([b.new_ones(1), b])

    def soft_n(self) -> Tensor:
        """N = 1 + sum(b) as a tensor whose gradient reaches the scores (via the STE)."""
        return 1 + _HardThreshold.apply(self.priorities()).sum()

    @torch.no_grad()
    def scores_n(self) -> int:
        """N the scores currently select (whatever the frozen state)."""
        return 1 + int(_HardThreshold.apply(self.priorities()).sum())

    def hard_n(self) -> int:
        """The N in force: the frozen N, or the one the scores select while searching."""
        return self.n if self._is_frozen else self.scores_n()

    def sync_n(self) -> None:
        """Copy the scores' N into ``route_n`` so reports and cost counts see it while searching."""
        if not self._is_frozen:
            self.route_n[0] = self.scores_n()

    @torch.no_grad()
    def project_scores(self) -> None:
        """Keep the scores in [0, score_clamp] (projected gradient: the clamp never traps them)."""
        self.scores.clamp_(0.0, self.score_clamp)

    # -- freezing ------------------------------------------------------------------------------
    @property
    def is_frozen(self) -> bool:
        return self._is_frozen

    def freeze(self, n: int | None = None) -> None:
        """Fix N (the scores' N by default): ``route_n`` holds it, the scores are no longer used."""
        value = self.scores_n() if n is None else int(n)
        self.set_n(value)
        self.frozen.fill_(True)
        self._set_frozen(True)

    def unfreeze(self) -> None:
        """Resume the search from the stored scores."""
        self.frozen.fill_(False)
        self._set_frozen(False)
        self.sync_n()

    def _set_frozen(self, frozen: bool) -> None:
        self._is_frozen = frozen
        self.scores.requires_grad_(not frozen)
        if frozen:
            self.scores.grad = None  # an optimizer skips parameters without a gradient
        self._mask_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._set_frozen(bool(self.frozen))

    # -- NMMask interface ----------------------------------------------------------------------
    def keep(self) -> Tensor:
        if self._is_frozen:
            return super().keep()
        return self.learned_keep()

    @property
    def learns_keep(self) -> bool:
        return not self._is_frozen

    def extra_repr(self) -> str:
        state = "frozen" if self._is_frozen else "searching"
        return f"N={self.hard_n()}, M={self.m}, {state}, grad_mode={self.grad_mode.value}"


def sls_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, SLSMask]]:
    """Every (name, layer, mask) of ``model`` carrying an :class:`SLSMask`."""
    for name, module, mask in nm_layers(model):
        if isinstance(mask, SLSMask):
            yield name, module, mask


# -- cost bookkeeping --------------------------------------------------------------------------
def _in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES):
            channels = getattr(module, "in_channels", None)
            if channels is None:
                raise SparsityError(
                    "cannot count MACs of a model whose first layer is a Linear; use budget_kind='params'"
                )
            return int(channels)
    return 3


def _count(model: nn.Module, input_size: tuple[int, int] | None) -> CostReport:
    """Dense per-layer MACs, with an error that says what to do when the forward cannot be traced."""
    try:
        return count_cost(model, input_size, in_channels=_in_channels(model))
    except SparsityError:
        raise
    except Exception as exc:  # a model that takes no image input of that shape
        raise SparsityError(
            f"cannot count the MACs of this model ({type(exc).__name__}: {exc}); "
            "set input_size to a size its forward accepts, or use budget_kind='params'"
        ) from exc


class _Budget:
    """Per-layer costs for one budget kind: ``C = fixed + sum_l N_l / M * cost_l``."""

    def __init__(
        self, names: list[str], costs: list[float], fixed: float, reference: float, kind: str
    ) -> None:
        self.names = names
        self.costs = costs
        self.fixed = fixed
        self.reference = reference
        self.kind = kind

    @classmethod
    def build(cls, model: nn.Module, layers: list[LayerInfo], config: SLSConfig) -> _Budget:
        names = [layer.name for layer in layers]
        if config.budget_kind == "params":
            costs = [float(dense_weight(layer.module).numel()) for layer in layers]
            return cls(names, costs, 0.0, float(sum(costs)), "params")
        report = _count(model, config.input_size)
        macs = {layer.name: float(layer.dense_macs) for layer in report.layers}
        costs = [macs.get(name, 0.0) for name in names]
        prunable = sum(costs)
        if config.budget_kind == "macs":
            reference = float(report.dense_macs)
            fixed = reference - prunable  # dense layers and non-Conv/Linear MACs count at full cost
        else:
            reference, fixed = prunable, 0.0
        if reference <= 0:
            raise SparsityError("the prunable layers perform no MACs for this input; check input_size")
        return cls(names, costs, fixed, reference, config.budget_kind)

    def fraction(self, ns: list[int], m: int) -> float:
        return (self.fixed + sum(n / m * c for n, c in zip(ns, self.costs, strict=True))) / self.reference

    def weights(self, m: int) -> list[float]:
        """d(C / C_ref) / dN_l: each layer's cost of one more kept rank, normalised (O(1) numbers)."""
        return [c / (m * self.reference) for c in self.costs]

    def minimum(self, m: int) -> float:
        return self.fraction([1] * len(self.costs), m)


def _meets(fraction: float, budget: float) -> bool:
    return fraction <= budget * (1 + _BUDGET_RTOL)


# -- the controller ----------------------------------------------------------------------------
class SLSController(Controller):
    """Training-time state of SLS: cost term, annealing, rank refresh, freezing, projection.

    The Trainer calls :meth:`step` after every optimizer step and adds :meth:`regularizer` to the
    loss. Policy:

    * **refresh**: ranks are recomputed from the dense weights (magnitude) every ``refresh_every``
      steps and once when N is frozen; with ``refresh_after_freeze`` (the published code's default)
      they keep being refreshed after freezing, otherwise the masks stay fixed. The ranks are
      buffers of the masks, so the checkpoint holds exactly the mask that was evaluated.
    * **annealing** (``anneal_rule="last_epoch"``, the published code's): the ratio C_ref / C is
      recorded at the end of every epoch of ``anneal_interval // 2`` steps; at the end of every
      second epoch, ``coef *= alpha`` if it grew by less than ``anneal_threshold`` during that last
      epoch. ``"interval"`` compares the growth over the whole ``anneal_interval`` instead.
    * **freezing**: as soon as the hard-N cost is within budget every layer's N is frozen and the
      cost term is dropped.
    * **deadline**: at ``step >= search_steps`` (or :meth:`finalize`), if the budget is not met,
      N is lowered one at a time in the layer whose scores are closest to dropping their last kept
      rank (see :meth:`project`), then frozen; ``projected`` and ``message`` record it and it is logged.

    The masks (model ``state_dict``) are the source of truth for the frozen N; the controller's
    own state is scalars only (JSON-serialisable).

    Once frozen the scores take no part in the forward (and stop requiring gradients), so a
    DistributedDataParallel wrapper must be built with ``find_unused_parameters=True``
    (:attr:`find_unused_parameters` says so) or rebuilt when :attr:`frozen` flips.
    """

    #: DDP hint: parameters (the scores) drop out of the graph once N is frozen.
    find_unused_parameters = True

    def __init__(
        self, modules: list[nn.Module], masks: list[SLSMask], budget: _Budget, config: SLSConfig
    ) -> None:
        self.config = config
        self.modules = modules
        self.masks = masks
        self.budget = budget
        self.coef = 1.0
        self.last_ratio: float | None = None  # compression ratio at the start of the interval
        self.interval_start: int | None = None
        self.epoch_ratio: float | None = None  # "last_epoch": the ratio at the end of the previous epoch
        self.projected = False
        self.message = ""
        self.steps = 0
        self.frozen_at: int | None = None

    # -- measurements --------------------------------------------------------------------------
    @property
    def frozen(self) -> bool:
        return all(mask.is_frozen for mask in self.masks)

    def ns(self) -> list[int]:
        """The N in force per layer (frozen, or what the scores select)."""
        return [mask.hard_n() for mask in self.masks]

    def fraction(self) -> float:
        """Current cost as a fraction of the budget's reference (hard N)."""
        return self.budget.fraction(self.ns(), self.config.m)

    def compression_ratio(self) -> float:
        return 1.0 / self.fraction()

    def layer_names(self) -> list[str]:
        return list(self.budget.names)

    # -- Controller protocol -------------------------------------------------------------------
    def regularizer(self) -> dict[str, Tensor]:
        """``{"sls_cost": lam * coef * C / C_ref}`` while searching (gradient reaches the scores)."""
        if self.frozen:
            return {}
        total: Tensor | float = self.budget.fixed / self.budget.reference
        for mask, weight in zip(self.masks, self.budget.weights(self.config.m), strict=True):
            if weight:
                total = total + mask.soft_n() * weight
        if not isinstance(total, Tensor):  # no prunable layer costs anything: nothing to learn
            return {}
        return {"sls_cost": self.config.lam * self.coef * total}

    def step(self, step: int) -> None:
        """After an optimizer step: project scores, refresh ranks, anneal, freeze or project onto budget."""
        self.steps = int(step)
        every = self.config.refresh_every
        if self.frozen:
            if self.config.refresh_after_freeze and every and step % every == 0:
                self._refresh()  # N stays frozen; only which weights are kept moves (SR-STE-style)
            return
        for mask in self.masks:
            mask.project_scores()
            mask.sync_n()
        if every and step % every == 0:
            self._refresh()
        fraction = self.fraction()
        if _meets(fraction, self.config.budget):
            self._freeze(f"budget met at step {step}: {fraction:.4f} <= {self.config.budget:.4f}")
            return
        if step >= self.config.search_steps:
            self.project()
            return
        self._anneal(step, 1.0 / fraction)

    def state_dict(self) -> dict[str, Any]:
        return {
            "coef": self.coef,
            "last_ratio": self.last_ratio,
            "interval_start": self.interval_start,
            "epoch_ratio": self.epoch_ratio,
            "frozen": self.frozen,
            "frozen_at": self.frozen_at,
            "projected": self.projected,
            "message": self.message,
            "steps": self.steps,
            "fraction": self.fraction(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.last_ratio = None if state.get("last_ratio") is None else float(state["last_ratio"])
        self.interval_start = None if state.get("interval_start") is None else int(state["interval_start"])
        self.epoch_ratio = None if state.get("epoch_ratio") is None else float(state["epoch_ratio"])
        self.frozen_at = None if state.get("frozen_at") is None else int(state["frozen_at"])
        self.projected = bool(state.get("projected", False))
        self.message = str(state.get("message", ""))
        self.steps = int(state.get("steps", 0))

    # -- optional hooks a Trainer may call -----------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups for the scores (own lr if ``score_lr``; never weight decay).

        A Trainer that finds this method puts these groups first and every other parameter of
        ``model`` in its default group.
        """
        scores = [mask.scores for mask in self.masks]
        group: dict[str, Any] = {"params": scores, "weight_decay": 0.0, "name": "sls_scores"}
        if self.config.score_lr is not None:
            group["lr"] = self.config.score_lr
        return [group]

    def finalize(self) -> None:
        """End of training: guarantee the budget (project and freeze if the search did not finish)."""
        if self.frozen:
            return
        fraction = self.fraction()
        if _meets(fraction, self.config.budget):
            self._freeze(f"budget met at the end of training: {fraction:.4f} <= {self.config.budget:.4f}")
        else:
            self.project()

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        """The per-layer N table (text + JSON) and the N-per-layer chart, for the run folder."""
        import json

        rows = sls_layer_table(model)
        run_dir.mkdir(parents=True, exist_ok=True)
        text = format_sls_table(rows)
        text += f"\nachieved budget ({self.config.budget_kind}): {achieved_budget(model, self.config):.4f}"
        text += f" <= {self.config.budget:.4f}" + (f"\n{self.message}" if self.message else "")
        table = run_dir / "sls_layers.txt"
        table.write_text(text + "\n")
        data = run_dir / "sls_layers.json"
        data.write_text(json.dumps({"layers": rows, "state": self.state_dict()}, indent=2, default=str))
        return [table, data, plot_n_per_layer(model, run_dir / "sls_n_per_layer.png")]

    def metrics(self) -> dict[str, float]:
        """Scalars worth logging every few steps."""
        return {"sls_fraction": self.fraction(), "sls_coef": self.coef, "sls_frozen": float(self.frozen)}

    # -- internals -----------------------------------------------------------------------------
    def _refresh(self) -> None:
        for module, mask in zip(self.modules, self.masks, strict=True):
            mask.refresh(dense_weight(module))

    def _anneal(self, step: int, ratio: float) -> None:
        if self.config.anneal_rule == "last_epoch":
            self._anneal_last_epoch(step, ratio)
            return
        if self.interval_start is None or self.last_ratio is None:
            self.interval_start, self.last_ratio = step, ratio
            return
        if step - self.interval_start >= self.config.anneal_interval:
            if ratio - self.last_ratio < self.config.anneal_threshold:
                self.coef *= self.config.alpha
                logger.debug("sls: compression ratio %.3f stalled; coef -> %.4g", ratio, self.coef)
            self.interval_start, self.last_ratio = step, ratio

    def _anneal_last_epoch(self, step: int, ratio: float) -> None:
        # The published trainer appends the ratio at every epoch end and, at every even epoch,
        # compares the last two entries: the growth during that epoch alone.
        epoch = self.config.anneal_interval // 2
        if step % epoch:
            return
        if (step // epoch) % 2 == 0 and self.epoch_ratio is not None:
            if ratio - self.epoch_ratio < self.config.anneal_threshold:
                self.coef *= self.config.alpha
                logger.debug("sls: compression ratio %.3f grew too little; coef -> %.4g", ratio, self.coef)
            self.epoch_ratio = None
        else:
            self.epoch_ratio = ratio

    def _freeze(self, message: str, ns: list[int] | None = None) -> None:
        self._refresh()
        for i, mask in enumerate(self.masks):
            mask.freeze(None if ns is None else ns[i])
        self.frozen_at = self.steps
        self.message = message
        logger.info("sls: %s; N frozen: %s", message, self.ns())

    def project(self) -> None:
        """Lower N until the budget holds, then freeze (records ``projected`` and a message).

        Each move lowers by one the N of the layer whose last kept rank has the smallest margin
        ``p - 0.5``: the rank the search was closest to dropping. The margin is not weighted by
        the layer's cost: the scores train with Adam, which moves every score at about the same
        speed whatever its gradient's size, so the unweighted margin is the best guess of what
        the search would have pruned next. Ties (e.g. scores that never moved) go to the layer
        with the largest N, then the most expensive one, so a search that learned nothing is
        projected onto (nearly) uniform N:M -- the safe baseline -- rather than onto one layer.
        """
        m = self.config.m
        ns = self.ns()
        before = self.budget.fraction(ns, m)
        with torch.no_grad():
            # p of rank k = 1..M-1, made non-increasing as the prefix rule reads it
            prio = [torch.cummin(mask.priorities(), 0).values.tolist() for mask in self.masks]
        moves = 0
        while not _meets(self.budget.fraction(ns, m), self.config.budget):
            candidates = [
                (max(prio[i][n - 2] - KEEP_THRESHOLD, 0.0), -n, -cost, i)
                for i, (n, cost) in enumerate(zip(ns, self.budget.costs, strict=True))
                if n > 1 and cost > 0
            ]
            if not candidates:  # cannot happen: the handler checked that 1:M everywhere meets the budget
                raise BudgetError(f"cannot meet budget {self.config.budget} even at 1:{m} everywhere")
            ns[min(candidates)[3]] -= 1
            moves += 1
        after = self.budget.fraction(ns, m)
        self.projected = True
        message = (
            f"search ended at step {self.steps} above budget ({before:.4f} > {self.config.budget:.4f}); "
            f"projected onto it by {moves} N-decrements -> {after:.4f}"
        )
        logger.warning("sls: %s", message)
        self._freeze(message, ns)


# -- registration ------------------------------------------------------------------------------
def _mask_factory(config: SLSConfig) -> Callable[[LayerInfo], NMMask]:
    def make(layer: LayerInfo) -> NMMask:
        return SLSMask(
            layer.module.weight,
            config.m,
            layer.in_axis,
            config.grad_mode,
            config.srste_lambda,
            config.score_init,
            config.score_clamp,
        )

    return make


@register_method("sls", SLSConfig)
def _sls(model: nn.Module, layers: list[LayerInfo], config: SLSConfig) -> SLSController:
    """Check the budget is reachable, attach :class:`SLSMask` es, return the controller."""
    budget = _Budget.build(model, layers, config)
    minimum = budget.minimum(config.m)
    if not _meets(minimum, config.budget):
        raise BudgetError(
            f"budget {config.budget:g} ({config.budget_kind}) is below what sls can reach: 1:{config.m} "
            f"on every prunable layer gives {minimum:.4f}; ask for at least {math.ceil(minimum * 1e4) / 1e4:.4f} "
            "(or a larger M, or fewer dense layers)"
        )
    attach_masks(layers, config, mask_factory=_mask_factory(config))
    modules = [layer.module for layer in layers]
    masks: list[SLSMask] = []
    for module in modules:
        mask = module.parametrizations.weight[0]
        if not isinstance(mask, SLSMask):  # pragma: no cover - attach_masks registered it just above
            raise SparsityError(f"expected an SLSMask on {type(module).__name__}")
        masks.append(mask)
    controller = SLSController(modules, masks, budget, config)
    if _meets(controller.fraction(), config.budget):  # budget 1.0: nothing to search
        controller._freeze(f"budget met before any search step: {controller.fraction():.4f}")
    return controller


# -- outputs -----------------------------------------------------------------------------------
def _layer_n(mask: NMMask) -> int:
    return mask.hard_n() if isinstance(mask, SLSMask) else mask.n


def sls_layer_table(model: nn.Module, cost: CostReport | None = None) -> list[dict[str, Any]]:
    """One row per Conv/Linear layer: name, shape, share of the network's MACs, N, M, density.

    Dense layers are listed too (``n``/``m`` None, density 1) so the table shows the whole network.
    """
    report = cost if cost is not None else _count(model, None)
    masks = {name: mask for name, _, mask in nm_layers(model)}
    total = report.dense_macs or 1
    rows: list[dict[str, Any]] = []
    for layer in report.layers:
        mask = masks.get(layer.name)
        n = None if mask is None else _layer_n(mask)
        m = None if mask is None else mask.m
        rows.append(
            {
                "name": layer.name,
                "shape": tuple(layer.shape),
                "share_of_macs": layer.dense_macs / total,
                "dense_macs": layer.dense_macs,
                "n": n,
                "m": m,
                "density": 1.0 if n is None or m is None else n / m,
                "frozen": None if not isinstance(mask, SLSMask) else mask.is_frozen,
            }
        )
    return rows


def format_sls_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text rendering of :func:`sls_layer_table`."""
    lines = [f"{'layer':<34} {'shape':<16} {'MACs share':>10} {'N:M':>7} {'density':>8}"]
    for row in rows:
        shape = "x".join(str(s) for s in row["shape"])
        nm_text = "dense" if row["n"] is None else f"{row['n']}:{row['m']}"
        lines.append(
            f"{row['name']:<34} {shape:<16} {row['share_of_macs']:>10.1%} {nm_text:>7} {row['density']:>8.3f}"
        )
    eff = sum(row["share_of_macs"] * row["density"] for row in rows)
    lines.append(f"Conv/Linear MACs kept: {eff:.1%} of the network's dense MACs")
    return "\n".join(lines)


def plot_n_per_layer(model: nn.Module, path: str | Path, cost: CostReport | None = None) -> Path:
    """Bar chart of N/M per layer beside each layer's share of MACs, saved as a PNG.

    Uses matplotlib's object API with the Agg canvas, so no global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    rows = sls_layer_table(model, cost)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    x = list(range(len(rows)))
    width = 0.4
    fig = Figure(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = ["tab:blue" if row["n"] is not None else "lightgray" for row in rows]
    ax.bar([i - width / 2 for i in x], [row["density"] for row in rows], width, color=colors)
    ax.set_ylabel("N / M")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    shares = [100 * row["share_of_macs"] for row in rows]
    ax2.bar([i + width / 2 for i in x], shares, width, color="tab:orange")
    ax2.set_ylabel("share of dense MACs (%)")
    ax2.set_ylim(0, max(shares, default=1.0) * 1.05 or 1.0)
    ax.set_xticks(x, [row["name"] for row in rows], rotation=90, fontsize=7)
    legend = [
        Patch(color="tab:blue", label="N/M (pruned layer)"),
        Patch(color="lightgray", label="dense layer"),
        Patch(color="tab:orange", label="share of MACs"),
    ]
    fig.legend(handles=legend, loc="outside lower center", ncols=3, fontsize=8)
    ax.set_title("SLS: learned N per layer vs. share of MACs", fontsize=10)
    fig.savefig(out, format="png", dpi=120)
    return out


def achieved_budget(model: nn.Module, config: SLSConfig) -> float:
    """The model's current cost as a fraction of ``config``'s budget reference (compare with budget)."""
    masks = {name: mask for name, _, mask in nm_layers(model)}
    if not masks:
        raise SparsityError("the model has no N:M masks")
    if config.budget_kind == "params":
        params = [
            (dense_weight(module).numel(), _layer_n(mask), mask.m) for _, module, mask in nm_layers(model)
        ]
        total = sum(p for p, _, _ in params)
        return sum(p * n / m for p, n, m in params) / total
    report = _count(model, config.input_size)
    kept = 0.0
    prunable = 0.0
    for layer in report.layers:
        mask = masks.get(layer.name)
        if mask is None:
            continue
        prunable += layer.dense_macs
        kept += layer.dense_macs * _layer_n(mask) / mask.m
    if config.budget_kind == "macs":
        return (report.dense_macs - prunable + kept) / report.dense_macs
    return kept / prunable if prunable else 1.0


__all__ = [
    "KEEP_THRESHOLD",
    "SLSConfig",
    "SLSController",
    "SLSMask",
    "achieved_budget",
    "format_sls_table",
    "plot_n_per_layer",
    "sls_layer_table",
    "sls_masks",
]
