"""``sparsify_`` for filter pruning: prune in place to the target, attach no mask, return the controller."""

from __future__ import annotations

import logging

from torch import nn

from nmrestore.methods.filter.config import FilterConfig
from nmrestore.methods.filter.controller import FilterController
from nmrestore.methods.filter.prune import filter_prune_, target_fraction_of
from nmrestore.sparsity.api import (
    LayerInfo,
    register_method,
)

log = logging.getLogger(__name__)


@register_method("filter", FilterConfig)
def _filter(model: nn.Module, layers: list[LayerInfo], config: FilterConfig) -> FilterController:
    target = target_fraction_of(model, config)
    report = filter_prune_(
        model,
        target,
        config.trace_size,
        prunable=[layer.name for layer in layers],
        tolerance=config.tolerance,
        input_size=config.input_size,
        min_channels=config.min_channels,
    )
    log.info("%s", report.table())
    return FilterController(report)
