"""``sparsify_`` for SLS: check the budget is reachable, attach SLS masks, return the controller."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn

from nmrestore.errors import BudgetError, SparsityError
from nmrestore.methods.sls.budget import Budget, meets_budget
from nmrestore.methods.sls.config import SLSConfig
from nmrestore.methods.sls.controller import SLSController
from nmrestore.methods.sls.mask import SLSMask
from nmrestore.sparsity.api import (
    LayerInfo,
    attach_masks,
    register_method,
)
from nmrestore.sparsity.parametrization import NMMask


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
            out_block=config.out_block,
        )

    return make


@register_method("sls", SLSConfig)
def _sls(model: nn.Module, layers: list[LayerInfo], config: SLSConfig) -> SLSController:
    """Check the budget is reachable, attach :class:`SLSMask` es, return the controller."""
    budget = Budget.build(model, layers, config)
    minimum = budget.minimum(config.m)
    if not meets_budget(minimum, config.budget):
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
    if meets_budget(controller.fraction(), config.budget):  # budget 1.0: nothing to search
        controller._freeze(f"budget met before any search step: {controller.fraction():.4f}")
    return controller
