"""Losses on routing probabilities and the bisection that meets a MAC target: ClassSR's class and equal-split terms, the expected-MAC budget term."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor


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
