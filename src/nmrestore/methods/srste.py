"""SR-STE (Zhou et al., ICLR 2021): masks recomputed from the dense weights during training.

The forward uses the N:M-masked weight; the backward passes the dense gradient plus the
sparse-refined term ``lambda * (1 - mask) * w`` to every weight, so pruned weights can come back
when they grow. Works from a trained model or from scratch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from torch import Tensor, nn

from nmrestore.sparsity.api import Controller, LayerInfo, NMConfig, attach_masks, register_method
from nmrestore.sparsity.parametrization import GradMode, refresh_


class SRSTEConfig(NMConfig):
    """Uniform N:M with SR-STE gradients and periodic rank refresh (every step by default)."""

    method: Literal["srste"] = "srste"  # type: ignore[assignment]
    grad_mode: GradMode = GradMode.SRSTE
    refresh_every: int = Field(1, ge=1, description="optimizer steps between mask recomputations")
    freeze_at: int | None = Field(None, ge=0, description="step after which masks stay fixed (None: never)")


class RefreshController(Controller):
    """Recomputes every layer's ranks from its dense weight every ``refresh_every`` steps (0: never)."""

    def __init__(self, model: nn.Module, refresh_every: int, freeze_at: int | None = None) -> None:
        self.model = model
        self.refresh_every = refresh_every
        self.freeze_at = freeze_at
        self.refreshes = 0

    def step(self, step: int) -> None:
        if self.freeze_at is not None and step > self.freeze_at:
            return
        if self.refresh_every and step % self.refresh_every == 0:
            refresh_(self.model)
            self.refreshes += 1

    def regularizer(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"refreshes": self.refreshes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.refreshes = int(state.get("refreshes", 0))


@register_method("srste", SRSTEConfig)
def _srste(model: nn.Module, layers: list[LayerInfo], config: SRSTEConfig) -> RefreshController:
    attach_masks(layers, config)
    return RefreshController(model, config.refresh_every, config.freeze_at)
