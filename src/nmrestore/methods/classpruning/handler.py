"""``sparsify_`` for ClassPruning: K nested routes over one weight tensor plus the route classifier."""

from __future__ import annotations

import logging

from torch import nn

from nmrestore.methods.classpruning.classifier import RouteClassifier, update_route_costs
from nmrestore.methods.classpruning.config import CLASSIFIER_ATTR, ClassPruningConfig
from nmrestore.methods.srste import RefreshController
from nmrestore.sparsity.api import LayerInfo, attach_masks, register_method
from nmrestore.sparsity.parametrization import set_route

logger = logging.getLogger(__name__)


class RouteController(RefreshController):
    """Stage A's training-time state: optional periodic rank refresh (all routes share the ranks)."""

    #: the classifier takes no part in stage A's forward (DDP must allow unused parameters)
    find_unused_parameters = True


@register_method("classpruning", ClassPruningConfig)
def _classpruning(model: nn.Module, layers: list[LayerInfo], config: ClassPruningConfig) -> RouteController:
    """Attach K-route masks, activate the full route, attach the classifier."""
    attach_masks(layers, config)
    set_route(model, config.num_routes - 1)
    device = next(model.parameters()).device
    classifier = RouteClassifier(config.num_routes, config.classifier_channels, config.classifier_convs)
    model.add_module(CLASSIFIER_ATTR, classifier.to(device))
    # the inference pipeline's defaults (not state: the recipe rebuilds them with the model)
    model.nm_adaptive_settings = (  # type: ignore[assignment]
        config.patch_size,
        config.stride,
        config.blend,
        config.inference,
    )
    try:
        update_route_costs(model, config.patch_size)
    except Exception as exc:  # a model that cannot be traced at this size keeps placeholder costs
        logger.warning(
            "classpruning: cannot count MACs on a %d-pixel patch (%s); route costs are placeholders",
            config.patch_size,
            exc,
        )
    return RouteController(model, config.refresh_every)
