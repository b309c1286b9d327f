"""One-shot N:M (the NVIDIA ASP recipe): magnitude masks from a trained model, then fine-tune.

The masks are computed once, when ``sparsify_`` runs, and stay fixed; pruned weights get no
gradient (``hard``), so fine-tuning only adapts the kept weights.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from nmrestore.sparsity.api import LayerInfo, NMConfig, attach_masks, register_method
from nmrestore.sparsity.parametrization import GradMode


class OneShotConfig(NMConfig):
    """Uniform N:M from the current weights' magnitudes, masks fixed during fine-tuning."""

    method: Literal["oneshot"] = "oneshot"  # type: ignore[assignment]
    grad_mode: GradMode = GradMode.HARD


@register_method("oneshot", OneShotConfig)
def _oneshot(model: nn.Module, layers: list[LayerInfo], config: OneShotConfig) -> None:
    attach_masks(layers, config)
    return None
