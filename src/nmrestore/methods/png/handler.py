"""``sparsify_`` for PNG: attach one PNG mask per prunable layer, return the controller."""

from __future__ import annotations

from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.methods.png.config import PNGConfig
from nmrestore.methods.png.controller import PNGController
from nmrestore.methods.png.mask import PNGMask
from nmrestore.methods.png.tasks import owned_prefixes, owner_of, png_masks, png_tasks
from nmrestore.models.multitask import MultiTaskSR
from nmrestore.sparsity.api import (
    LayerInfo,
    attach_masks,
    register_method,
)
from nmrestore.sparsity.parametrization import NMMask


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
