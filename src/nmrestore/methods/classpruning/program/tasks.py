"""The loss of each training stage: sandwich-rule routes (A), the classifier (B), soft routing (C)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.engine.task import LOSSES
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.classifier import route_classifier
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.classpruning.losses import budget_loss, class_loss, equal_split_loss
from nmrestore.sparsity.parametrization import use_route


def _route_forward(model: nn.Module, route: int, x: Tensor) -> Tensor:
    with use_route(model, route):
        return model(x)


class SandwichTask:
    """Stage A: full + cheapest + one random middle route per step, L1 each, smaller ones distilled.

    The smaller routes' terms are scaled by ``small_route_weight`` (see ClassPruningConfig).

    The random route is drawn from torch's global RNG, which the Trainer checkpoints, so a resumed
    run draws the same routes.
    """

    def __init__(
        self, num_routes: int, loss: str = "l1", distill_weight: float = 1.0, small_route_weight: float = 1.0
    ) -> None:
        if num_routes < 2:
            raise SparsityError("the sandwich rule needs at least 2 routes")
        self.num_routes = num_routes
        self.loss_fn = LOSSES[loss]
        self.distill_weight = distill_weight
        self.small_route_weight = small_route_weight

    def routes_for_step(self) -> list[int]:
        """Full first (its output is the teacher), then the cheapest, then a random middle one."""
        k = self.num_routes
        routes = [k - 1, 0]
        if k > 2:
            routes.append(int(torch.randint(1, k - 1, (1,))))
        return routes

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        lq, gt = batch["lq"], batch["gt"]
        full, *smaller = self.routes_for_step()
        teacher = _route_forward(model, full, lq)
        losses = {"l1_full": self.loss_fn(teacher, gt)}
        target = teacher.detach()
        for name, route in zip(("smallest", "random"), smaller, strict=False):
            out = _route_forward(model, route, lq)
            losses[f"l1_{name}"] = self.small_route_weight * self.loss_fn(out, gt)
            if self.distill_weight:
                losses[f"distill_{name}"] = (
                    self.small_route_weight * self.distill_weight * F.l1_loss(out, target)
                )
        return losses


class ClassifierTask:
    """Stage B: cross-entropy of the route classifier on the labels."""

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = route_classifier(model)(batch["lq"])
        return {"ce": F.cross_entropy(logits, batch["label"])}


class JointTask:
    """Stage C: soft routing ``y = sum_k p_k f_k(x)``; L1 + w_c class loss + w_b budget loss."""

    def __init__(self, config: ClassPruningConfig, costs: Sequence[float], loss: str = "l1") -> None:
        self.config = config
        self.costs = torch.tensor(list(costs), dtype=torch.float32)
        self.loss_fn = LOSSES[loss]

    def losses(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        lq, gt = batch["lq"], batch["gt"]
        probs = F.softmax(route_classifier(model)(lq), dim=1)
        output: Tensor | int = 0
        for k in range(probs.shape[1]):
            output = output + probs[:, k, None, None, None] * _route_forward(model, k, lq)
        assert isinstance(output, Tensor)
        cfg = self.config
        losses = {"l1": self.loss_fn(output, gt)}
        if cfg.class_weight:
            losses["class"] = cfg.class_weight * class_loss(probs)
        if cfg.budget_weight:
            if cfg.budget_loss == "equal_split":
                losses["budget"] = cfg.budget_weight * equal_split_loss(probs)
            else:
                losses["budget"] = cfg.budget_weight * budget_loss(
                    probs, self.costs, cfg.target_macs_fraction
                )
        return losses
