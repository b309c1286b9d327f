"""SLS's training-time state: the cost term, annealing, freezing N, projection onto the budget."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.errors import BudgetError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.methods.sls.budget import Budget, meets_budget
from nmrestore.methods.sls.config import KEEP_THRESHOLD, SLSConfig
from nmrestore.methods.sls.mask import SLSMask
from nmrestore.methods.sls.report import achieved_budget, format_sls_table, plot_n_per_layer, sls_layer_table
from nmrestore.sparsity.api import (
    Controller,
)
from nmrestore.sparsity.parametrization import dense_weight

logger = logging.getLogger(__name__)


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
        self, modules: list[nn.Module], masks: list[SLSMask], budget: Budget, config: SLSConfig
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
        if meets_budget(fraction, self.config.budget):
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
        if meets_budget(fraction, self.config.budget):
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
        atomic_write_text(table, text + "\n")
        data = run_dir / "sls_layers.json"
        atomic_write_text(data, json.dumps({"layers": rows, "state": self.state_dict()}, indent=2, default=str))
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
        epoch = max(1, self.config.anneal_interval // 2)  # an interval of 1 step: 1-step epochs
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
        while not meets_budget(self.budget.fraction(ns, m), self.config.budget):
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
