"""A restoration task turns a batch into a dict of losses; the Trainer only sums and steps.

Methods add their regularizers to the same dict (through their controller), so the Trainer needs
no method-specific code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossFn = Callable[[Tensor, Tensor], Tensor]


def charbonnier(x: Tensor, y: Tensor, eps: float = 1e-3) -> Tensor:
    return torch.sqrt((x - y) ** 2 + eps * eps).mean()


LOSSES: dict[str, LossFn] = {"l1": F.l1_loss, "mse": F.mse_loss, "charbonnier": charbonnier}


class RestorationTask:
    """Pixel loss between the model's output for ``lq`` and ``gt`` (SR, deblurring, denoising)."""

    def __init__(self, loss: str = "l1") -> None:
        self.loss_name = loss
        self.loss_fn = LOSSES[loss]

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        output = model(batch["lq"])
        return {self.loss_name: self.loss_fn(output, batch["gt"])}
