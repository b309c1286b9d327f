"""The route classifier (a ClassSR-style light CNN on LR patches) and the MACs of each route."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.config import CLASSIFIER_ATTR
from nmrestore.methods.classpruning.losses import bisect_multiplier
from nmrestore.sparsity.parametrization import nm_layers


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def calibrate_shift(
    logits: Tensor, costs: Tensor, target: float, iterations: int = 60
) -> tuple[float, float]:
    """The smallest cost shift tau whose hard routing ``argmax(logits - tau * cost)`` meets ``target``.

    The chosen route's cost never rises as tau grows, so bisection finds the boundary. A negative
    tau (spend more than the classifier asks, up to the target) is allowed. Returns (tau, the
    average cost fraction it gives on these patches).
    """
    costs = costs.to(logits)

    def average(tau: float) -> float:
        return float(costs[(logits - tau * costs).argmax(dim=1)].mean())

    gaps = costs[1:] - costs[:-1]
    spread = float(logits.max() - logits.min()) if logits.numel() else 0.0
    bound = 2 * spread / max(float(gaps.min()) if gaps.numel() else 1.0, 1e-6) + 1.0
    # at +bound every patch takes the cheapest route (even that may stay above the target)
    tau = bisect_multiplier(average, target, -bound, bound, iterations)
    return tau, average(tau)


@torch.no_grad()
def classifier_logits(model: nn.Module, patches: Tensor, batch_size: int = 256) -> Tensor:
    clf = route_classifier(model)
    was_training = clf.training
    clf.eval()
    device = model_device(model)
    try:
        return torch.cat([clf(c.to(device)).cpu() for c in patches.split(batch_size)])
    finally:
        clf.train(was_training)


class RouteClassifier(nn.Module):
    """ClassSR's condition network: rates an LR patch's difficulty as K logits.

    ``Conv(3, c, 4, stride 4)`` then ``convs`` 1x1 convs (c -> c), a 1x1 conv to 32 channels,
    LeakyReLU(0.1) between them, global average pooling and a linear layer to K. Works on any
    patch size (the pooling is global); trained on ``patch_size`` patches.
    """

    def __init__(self, num_routes: int, channels: int = 128, convs: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 4), nn.LeakyReLU(0.1, True)]
        for _ in range(convs):
            layers += [nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.1, True)]
        layers.append(nn.Conv2d(channels, 32, 1))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(32, num_routes)
        # each route's MACs / dense MACs on one patch (set by update_route_costs)
        self.register_buffer("route_cost", torch.linspace(1.0 / num_routes, 1.0, num_routes))
        # decision = argmax(logits - cost_shift * route_cost); calibrated after training
        self.register_buffer("cost_shift", torch.zeros(()))

    @property
    def num_routes(self) -> int:
        return self.head.out_features

    def forward(self, x: Tensor) -> Tensor:
        features = self.body(x).mean(dim=(2, 3))
        return self.head(features)

    def decision_scores(self, logits: Tensor, shift: float | None = None) -> Tensor:
        """Logits minus the cost penalty; ``argmax`` of these is the route."""
        tau = self.cost_shift if shift is None else torch.as_tensor(shift, dtype=logits.dtype)
        return logits - tau.to(logits) * self.route_cost.to(logits)

    @torch.no_grad()
    def decide(self, x: Tensor, shift: float | None = None) -> Tensor:
        """The route of each patch of ``x`` (B,) with the stored (or given) cost shift."""
        return self.decision_scores(self(x), shift).argmax(dim=1)


def route_classifier(model: nn.Module) -> RouteClassifier:
    """The classifier attached to a classpruning model (unwrapping DDP)."""
    inner = getattr(model, "module", model)
    classifier = getattr(inner, CLASSIFIER_ATTR, None)
    if not isinstance(classifier, RouteClassifier):
        raise SparsityError(
            "this model has no route classifier: it was not sparsified with method 'classpruning'"
        )
    return classifier


def is_adaptive(model: nn.Module) -> bool:
    """True for a model sparsified with ``classpruning`` (it carries a route classifier)."""
    return isinstance(getattr(getattr(model, "module", model), CLASSIFIER_ATTR, None), RouteClassifier)


def num_routes(model: nn.Module) -> int:
    for _, _, mask in nm_layers(model):
        return mask.num_routes
    raise SparsityError("the model has no N:M layers")


@dataclass(frozen=True)
class RouteCosts:
    """MACs of one patch of ``size`` (LR) through each route, the dense net and the classifier."""

    size: tuple[int, int]
    route_macs: tuple[float, ...]
    dense_macs: float
    classifier_macs: float
    prunable_macs: tuple[float, ...] = ()  # the prunable layers' share of route_macs
    prunable_dense_macs: float = 0.0

    @property
    def num_routes(self) -> int:
        return len(self.route_macs)

    def fractions(self, with_classifier: bool = True) -> tuple[float, ...]:
        """Each route's MACs (+ the classifier's) as a fraction of the dense net on the same patch."""
        extra = self.classifier_macs if with_classifier else 0.0
        return tuple((m + extra) / self.dense_macs for m in self.route_macs)

    def patches_macs(self, counts: Sequence[int]) -> float:
        """Total MACs for ``counts[k]`` patches on route k, the classifier run on every patch."""
        if len(counts) != self.num_routes:
            raise ValueError(f"{len(counts)} counts for {self.num_routes} routes")
        return (
            sum(c * m for c, m in zip(counts, self.route_macs, strict=True))
            + sum(counts) * self.classifier_macs
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch": list(self.size),
            "route_macs": list(self.route_macs),
            "dense_macs": self.dense_macs,
            "classifier_macs": self.classifier_macs,
            "route_fractions": list(self.fractions()),
            "prunable_macs": list(self.prunable_macs),
            "prunable_dense_macs": self.prunable_dense_macs,
        }


def classifier_macs(classifier: nn.Module, size: tuple[int, int], in_channels: int = 3) -> float:
    """MACs of one classifier pass on a ``size`` patch (PyTorch's FLOP counter, FLOPs / 2)."""
    return float(count_cost(classifier, size, in_channels=in_channels).dense_macs)


def route_costs(model: nn.Module, size: tuple[int, int], in_channels: int = 3) -> RouteCosts:
    """Count MACs per route for one LR patch of ``size`` (the classifier is not part of the SR net)."""
    inner = getattr(model, "module", model)
    report = count_cost(inner, size, in_channels=in_channels)
    k = report.num_routes
    clf = getattr(inner, CLASSIFIER_ATTR, None)
    clf_macs = classifier_macs(clf, size, in_channels) if isinstance(clf, nn.Module) else 0.0
    return RouteCosts(
        size,
        tuple(report.macs(r) for r in range(k)),
        float(report.dense_macs),
        clf_macs,
        tuple(report.prunable_macs(r) for r in range(k)),
        float(report.prunable_dense_macs),
    )


@torch.no_grad()
def update_route_costs(model: nn.Module, patch_size: int) -> RouteCosts:
    """Store each route's MAC fraction (classifier included) in the classifier; returns the costs."""
    costs = route_costs(model, (patch_size, patch_size))
    classifier = route_classifier(model)
    classifier.route_cost.copy_(torch.tensor(costs.fractions(), dtype=classifier.route_cost.dtype))
    return costs


def route_probabilities(logits: Tensor) -> Tensor:
    """Softmax over routes (what the joint stage mixes outputs with)."""
    return F.softmax(logits, dim=1)
