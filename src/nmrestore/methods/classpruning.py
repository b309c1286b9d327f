"""ClassPruning: input-adaptive N:M, one network, K nested routes chosen per patch (DESIGN.md §3.3).

A light classifier (ClassSR's, Kong et al. CVPR 2021) rates each 32x32 LR patch and sends it to
one of K *routes*: N:M subnetworks cut from the **same** weights by nested masks (``rank < N_k``),
so easy patches run a sparser network and the parameters are stored once (ClassSR keeps K separate
networks and doubles the parameters). This module holds the method's pure parts; the three
training stages and the patch-inference pipeline live in :mod:`nmrestore.engine.adaptive`.

* :class:`ClassPruningConfig`: routes (uniform N per route, or per-route budgets searched by SLS),
  the classifier, the labelling rule and the three stages' settings (``sparsity:`` in a recipe).
* :class:`RouteClassifier`: ClassSR's condition net (4x4 stride-4 conv, 1x1 convs, global pool,
  linear to K), plus two buffers: each route's MACs as a fraction of dense and a *cost shift*
  ``tau`` so that the decision is ``argmax_k(logit_k - tau * cost_k)`` (``tau`` is calibrated on
  held-out patches to meet the target average MACs, and is a run-time knob).
* Labels: :func:`delta_labels` (the cheapest route within ``delta`` dB of the full route),
  :func:`quantile_labels` (ClassSR's PSNR terciles, for any K) and :func:`budget_labels` (the
  assignment with the least total squared error whose average MACs meet the target).
* Losses on the routing probabilities: :func:`class_loss` (ClassSR's, generalised to K),
  :func:`equal_split_loss` (ClassSR's "average loss", generalised) and :func:`budget_loss`
  (expected MACs pulled towards a target).

The handler registered as ``"classpruning"`` attaches an :class:`~nmrestore.sparsity.NMMask` with
K routes to every eligible layer, makes the full (last) route active so a plain ``model(x)`` is
the full network, and attaches the classifier as the submodule ``nm_route_classifier`` so one
checkpoint restores masks, routes and classifier together.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import SparsityError
from nmrestore.methods.srste import RefreshController
from nmrestore.sparsity.api import LayerInfo, NMConfig, attach_masks, register_method
from nmrestore.sparsity.parametrization import GradMode, nm_layers, set_route

logger = logging.getLogger(__name__)

#: Attribute name of the classifier on a sparsified model.
CLASSIFIER_ATTR = "nm_route_classifier"

#: PSNR used in place of +inf (identical patches) so differences stay finite.
PSNR_CAP = 100.0


class ClassPruningConfig(NMConfig):
    """Input-adaptive N:M (``method: classpruning``): K routes over one weight tensor + a classifier.

    Routes are listed cheapest first. ``routes`` gives one uniform N per route (default 8/16/32 of
    32); ``route_budgets`` (fractions of the prunable MACs, ascending, 1.0 = dense) asks instead for
    a per-layer N per route searched by SLS (``route_search_steps`` steps per budget), made nested
    by a running maximum over the routes (``routes`` is then ignored).

    Stage A (sandwich route training) uses the recipe's ``train`` section (steps, lr, schedule).
    ``small_route_weight`` scales each smaller route's L1 + distillation: fine-tuning a trained
    dense net with every route at weight 1 lets the cheapest route (far worse at the start) pull
    the shared, highest-ranked weights its way and the full route loses more than 1 dB within a
    few dozen steps (edsr_small x2, held-out strips); at 0.3 every route ends better, the full one
    included.
    stages B (classifier) and C (joint soft routing) have their own steps and learning rates here.
    ``holdout_fraction`` of every training image (a strip at the bottom) is never trained on; it
    serves validation and the calibration of the cost shift (no selection on test images).
    """

    method: Literal["classpruning"] = "classpruning"  # type: ignore[assignment]
    m: int = Field(32, ge=2, le=255)
    routes: tuple[int, ...] | None = (8, 16, 32)
    grad_mode: GradMode = GradMode.HARD
    route_budgets: tuple[float, ...] | None = None
    route_search_steps: int = Field(200, ge=1)
    # classifier (ClassSR: 128 channels, three 1x1 convs, on 32x32 LR patches)
    classifier_channels: int = Field(128, ge=1)
    classifier_convs: int = Field(3, ge=0)
    patch_size: int = Field(32, ge=4, description="LR patch side at inference (and classifier training)")
    stride: int = Field(28, ge=1, description="LR stride between inference patches")
    blend: Literal["ramp", "mean"] = Field(
        "ramp", description="overlap average: border-distance weights or plain"
    )
    # stage A
    distill_weight: float = Field(1.0, ge=0, description="L1 towards the full route's output, smaller routes")
    small_route_weight: float = Field(
        0.3, ge=0, description="stage A: weight of each smaller route's terms against the full route's L1"
    )
    refresh_every: int = Field(0, ge=0, description="stage A: recompute ranks every k steps (0: never)")
    # stage B
    labels: Literal["delta", "quantile", "budget"] = Field(
        "delta",
        description="delta: cheapest route within delta dB; quantile: ClassSR's PSNR terciles; "
        "budget: least total squared error at target_macs_fraction (Lagrangian)",
    )
    delta: float = Field(
        0.1, ge=0, description="dB: a patch's label is the cheapest route this close to the full one"
    )
    budget_weights: Literal["image", "none"] = Field(
        "image",
        description="labels: budget: weigh each patch's error by 1 / its image's MSE (the mean "
        "per-image PSNR) or not (the PSNR of all pixels pooled)",
    )
    label_stride: int = Field(16, ge=1, description="LR stride of the labelled training patches")
    # 300 steps at 1e-3 left ClassSR's classifier at the majority label on the built-in photos
    # (budget labels, edsr_small x2); 2000 at 3e-3 reached 77% accuracy on unseen patches
    classifier_steps: int = Field(2000, ge=0)
    classifier_lr: float = Field(3e-3, gt=0)
    classifier_batch: int = Field(64, ge=1)
    # stage C
    joint_steps: int = Field(300, ge=0)
    joint_lr: float = Field(5e-5, gt=0)
    class_weight: float = Field(0.01, ge=0, description="w_c: ClassSR's class loss (pushes p to one-hot)")
    budget_weight: float = Field(0.05, ge=0, description="w_b: the budget loss")
    budget_loss: Literal["expected_macs", "equal_split"] = "expected_macs"
    target_macs_fraction: float = Field(
        0.55, gt=0, le=1, description="target average MACs / dense, classifier included"
    )
    # after training
    calibrate: bool = True
    holdout_fraction: float = Field(0.2, ge=0, lt=1)

    @model_validator(mode="after")
    def _routes_ok(self) -> ClassPruningConfig:
        if self.route_budgets is not None:
            budgets = list(self.route_budgets)
            if len(budgets) < 2:
                raise ValueError("route_budgets needs at least 2 routes")
            if any(not 0 < b <= 1 for b in budgets) or budgets != sorted(budgets):
                raise ValueError(f"route_budgets must be ascending fractions in (0, 1], got {budgets}")
        else:
            ns = list(self.route_ns())
            if len(ns) < 2:
                raise ValueError("classpruning needs at least 2 routes (e.g. routes: [8, 16, 32])")
            if ns != sorted(ns):
                raise ValueError(f"routes must be listed cheapest first (non-decreasing N), got {ns}")
        if self.stride > self.patch_size:
            raise ValueError(
                f"stride {self.stride} > patch_size {self.patch_size} would leave pixels uncovered"
            )
        return self

    def route_ns(self) -> tuple[int, ...]:
        if self.route_budgets is not None:  # placeholders until the SLS search sets per-layer N
            return (self.m,) * len(self.route_budgets)
        return super().route_ns()

    @property
    def num_routes(self) -> int:
        return len(self.route_ns())


# -- the classifier ----------------------------------------------------------------------------
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


# -- MAC accounting ------------------------------------------------------------------------------
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


# -- labels ---------------------------------------------------------------------------------------
def delta_labels(psnrs: Tensor, delta: float) -> Tensor:
    """Cheapest route whose PSNR is within ``delta`` dB of the full (last) route, per patch.

    ``psnrs``: (P, K), routes cheapest first. The full route always qualifies, so every patch
    gets a label; a cheaper route that beats the full one qualifies too.
    """
    if psnrs.dim() != 2 or psnrs.shape[1] < 1:
        raise ValueError(f"psnrs must be (patches, routes), got {tuple(psnrs.shape)}")
    values = psnrs.clamp(max=PSNR_CAP)
    ok = values >= values[:, -1:] - delta
    ok[:, -1] = True
    return ok.to(torch.int64).argmax(dim=1)  # first True


def quantile_labels(full_psnr: Tensor, num_routes: int) -> Tensor:
    """ClassSR's rule for K classes: sort by the full route's PSNR, split into K equal parts.

    The highest-PSNR part (easiest) goes to route 0 (cheapest), the lowest to route K-1; ties are
    broken by the patch index so the split is deterministic.
    """
    p = full_psnr.numel()
    order = torch.argsort(-full_psnr.clamp(max=PSNR_CAP).double(), stable=True)
    labels = torch.empty(p, dtype=torch.int64)
    labels[order] = torch.div(torch.arange(p) * num_routes, max(p, 1), rounding_mode="floor")
    return labels


def budget_labels(
    psnrs: Tensor,
    costs: Sequence[float] | Tensor,
    target: float,
    weights: Tensor | None = None,
    iterations: int = 100,
) -> Tensor:
    """Routes that minimise the patches' summed squared error at average cost <= ``target``.

    An image's MSE is the mean of its equal-sized patches' MSEs, so the assignment that best keeps
    image PSNR under a MAC budget is a knapsack with one choice per patch. Its Lagrangian
    relaxation ``argmin_k(MSE_k + lam * cost_k)`` is solved by bisection on ``lam`` (the average
    cost never rises as ``lam`` grows): the smallest ``lam`` whose assignment meets the target.
    Unlike a per-patch dB threshold, this sends flat patches (tiny absolute error even when their
    dB loss is large) to cheap routes and spends the budget where the error is. ``psnrs``: (P, K),
    routes cheapest first; ``costs``: K fractions of dense. ``weights`` (P,) scale each patch's
    error, e.g. ``1 / MSE`` of its image so the sum is the first-order loss of the *mean per-image*
    PSNR. A target below the cheapest route gives the cheapest route everywhere.
    """
    if psnrs.dim() != 2 or psnrs.shape[1] < 1:
        raise ValueError(f"psnrs must be (patches, routes), got {tuple(psnrs.shape)}")
    cost = torch.as_tensor(costs, dtype=torch.float64).flatten()
    if cost.numel() != psnrs.shape[1]:
        raise ValueError(f"{cost.numel()} costs for {psnrs.shape[1]} routes")
    mse = torch.pow(10.0, -psnrs.double().clamp(max=PSNR_CAP) / 10)
    if weights is not None:
        mse = mse * weights.double().reshape(-1, 1)

    def assign(lam: float) -> Tensor:
        # ties (equal error) go to the cheaper route: a vanishing cost term breaks them
        return (mse + (lam + 1e-12) * cost).argmin(dim=1)

    def average(lam: float) -> float:
        return float(cost[assign(lam)].mean())

    spread = float(mse.max() - mse.min())
    gap = float((cost[1:] - cost[:-1]).abs().min()) if cost.numel() > 1 else 1.0
    bound = 2 * spread / max(gap, 1e-9) + 1.0  # every patch is on its cheapest-cost route here
    return assign(bisect_multiplier(average, target, 0.0, bound, iterations))


def bisect_multiplier(
    average: Callable[[float], float], target: float, lo: float, hi: float, iterations: int = 60
) -> float:
    """The smallest multiplier in [lo, hi] whose ``average`` (non-increasing in it) is <= ``target``.

    ``lo`` when it already meets the target, ``hi`` when nothing in the range does. Both the
    Lagrangian labels and the classifier's cost shift price MACs this way.
    """
    if average(lo) <= target:
        return lo
    if average(hi) > target:
        return hi
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if average(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


# -- losses on routing probabilities ----------------------------------------------------------------
def class_loss(probs: Tensor) -> Tensor:
    """ClassSR's class loss for K routes: ``(K - 1) - sum_{i<j} |p_i - p_j|``, batch mean.

    0 for a one-hot p, K-1 for the uniform p: minimising it makes every decision confident.
    """
    k = probs.shape[1]
    pairs = list(itertools.combinations(range(k), 2))
    if not pairs:
        return probs.new_zeros(())
    i = torch.tensor([a for a, _ in pairs], device=probs.device)
    j = torch.tensor([b for _, b in pairs], device=probs.device)
    spread = (probs[:, i] - probs[:, j]).abs().sum(dim=1)
    return ((k - 1) - spread).mean()


def equal_split_loss(probs: Tensor) -> Tensor:
    """ClassSR's "average loss": each route's share of the batch pulled towards 1/K.

    ``sum_k |sum_b p_bk - B/K|`` normalised by its maximum ``2B(K-1)/K`` (all patches on one
    route), so it lies in [0, 1]; for K = 3 this is ClassSR's formula exactly.
    """
    b, k = probs.shape
    share = b / k
    return (probs.sum(dim=0) - share).abs().sum() / (2 * b * (k - 1) / k)


def expected_cost(probs: Tensor, costs: Tensor) -> Tensor:
    """The batch's expected MACs fraction ``sum_k mean_b(p_bk) * cost_k``."""
    return (probs.mean(dim=0) * costs.to(probs)).sum()


def budget_loss(probs: Tensor, costs: Tensor, target: float) -> Tensor:
    """``|expected MACs fraction - target|``: the batch's average cost pulled towards the target."""
    return (expected_cost(probs, costs) - target).abs()


# -- route N vectors -----------------------------------------------------------------------------
def nested_route_ns(per_route: Sequence[Sequence[int]]) -> list[list[int]]:
    """Make per-layer N non-decreasing over routes (running max), so the masks are nested.

    ``per_route[k][l]`` is N of layer l on route k (routes cheapest first); a layer where a
    cheaper route kept more than a dearer one gets the larger N on the dearer route too.
    """
    out: list[list[int]] = []
    for ns in per_route:
        current = list(ns) if not out else [max(a, b) for a, b in zip(out[-1], ns, strict=True)]
        out.append(current)
    return out


def set_layer_route_ns(model: nn.Module, per_layer: dict[str, Sequence[int]]) -> None:
    """Give each named N:M layer its N per route (keeps the active route index)."""
    masks = {name: mask for name, _, mask in nm_layers(model)}
    missing = sorted(set(masks) - set(per_layer))
    if missing:
        raise SparsityError(f"no route N given for layer(s) {', '.join(missing[:3])}")
    for name, ns in per_layer.items():
        if name not in masks:
            raise SparsityError(f"the model has no N:M layer {name!r}")
        masks[name].set_route_ns(list(ns))


def layer_route_ns(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [N of route 0, ..., N of route K-1]}``."""
    return {name: [int(v) for v in mask.route_n] for name, _, mask in nm_layers(model)}


# -- the controller (stage A) ----------------------------------------------------------------------
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
    model.nm_adaptive_settings = (config.patch_size, config.stride, config.blend)  # type: ignore[assignment]
    try:
        update_route_costs(model, config.patch_size)
    except Exception as exc:  # a model that cannot be traced at this size keeps placeholder costs
        logger.warning(
            "classpruning: cannot count MACs on a %d-pixel patch (%s); route costs are placeholders",
            config.patch_size,
            exc,
        )
    return RouteController(model, config.refresh_every)


def route_probabilities(logits: Tensor) -> Tensor:
    """Softmax over routes (what the joint stage mixes outputs with)."""
    return F.softmax(logits, dim=1)


__all__ = [
    "CLASSIFIER_ATTR",
    "ClassPruningConfig",
    "RouteClassifier",
    "RouteController",
    "RouteCosts",
    "bisect_multiplier",
    "budget_labels",
    "budget_loss",
    "class_loss",
    "classifier_macs",
    "delta_labels",
    "equal_split_loss",
    "expected_cost",
    "is_adaptive",
    "layer_route_ns",
    "nested_route_ns",
    "num_routes",
    "quantile_labels",
    "route_classifier",
    "route_costs",
    "route_probabilities",
    "set_layer_route_ns",
    "update_route_costs",
]
