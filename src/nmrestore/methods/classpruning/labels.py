"""Patch labels: each training patch's route from its PSNR on every route (delta, quantile or budget rule)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.classifier import model_device, num_routes
from nmrestore.methods.classpruning.config import PSNR_CAP, ClassPruningConfig
from nmrestore.methods.classpruning.losses import bisect_multiplier
from nmrestore.metrics import psnr_torch
from nmrestore.sparsity.parametrization import use_route


def per_image_weights(psnrs: Tensor, sources: Tensor) -> Tensor:
    """``1 / MSE`` of each patch's image on the full route (the mean of its patches' MSEs): (P,).

    Weighting a patch's error by it makes a sum of errors the first-order loss of the *mean
    per-image* PSNR, the SR protocol's score, in which an error on an easy image costs more dB.
    """
    mse = torch.pow(10.0, -psnrs[:, -1].double().clamp(max=PSNR_CAP) / 10)
    count = torch.bincount(sources).clamp(min=1).double()
    image_mse = torch.bincount(sources, weights=mse) / count
    return 1.0 / image_mse[sources].clamp(min=1e-12)


def per_patch_weights(psnrs: Tensor) -> Tensor:
    """``1 / MSE`` of each patch on the full route: (P,).

    A weighted error ``MSE_k / MSE_full`` is, to first order, the patch's own PSNR loss in dB, so a sum
    of them is the loss of the *mean patch PSNR*: what the paired tile intervals measure. Flat
    patches, where a small absolute error is a large dB loss, then stay on dearer routes.
    """
    mse = torch.pow(10.0, -psnrs[:, -1].double().clamp(max=PSNR_CAP) / 10)
    return 1.0 / mse.clamp(min=1e-12)


class PatchLabelDataset(Dataset):
    """Fixed LR patches with route labels; sample (epoch, i) = patch i % P under a seeded dihedral flip."""

    def __init__(self, patches: Tensor, labels: Tensor, seed: int, min_length: int = 1) -> None:
        self.patches = patches
        self.labels = labels
        self.seed = seed
        self.length = max(len(patches), min_length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Tensor]:
        epoch, i = index if isinstance(index, tuple) else (0, index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, i]))
        hflip, vflip, rot = (bool(b) for b in rng.integers(0, 2, size=3))
        x = self.patches[i % len(self.patches)]
        if hflip:
            x = x.flip(-1)
        if vflip:
            x = x.flip(-2)
        if rot:
            x = x.transpose(-1, -2)
        return {"lq": x.contiguous(), "label": self.labels[i % len(self.labels)]}


@torch.no_grad()
def route_psnrs(
    model: nn.Module, lq: Tensor, gt: Tensor, crop_border: int, test_y_channel: bool, batch_size: int = 64
) -> Tensor:
    """PSNR (P, K) of every patch on every route (eval mode, batched)."""
    k = num_routes(model)
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = torch.empty(lq.shape[0], k, dtype=torch.float64)
    try:
        for r in range(k):
            with use_route(model, r):
                for start in range(0, lq.shape[0], batch_size):
                    x = lq[start : start + batch_size].to(device)
                    y = model(x).clamp(0, 1).cpu()
                    out[start : start + batch_size, r] = psnr_torch(
                        y,
                        gt[start : start + batch_size],
                        crop_border=crop_border,
                        test_y_channel=test_y_channel,
                    ).cpu()
    finally:
        model.train(was_training)
    return out


def make_labels(
    psnrs: Tensor,
    config: ClassPruningConfig,
    costs: Sequence[float] | None = None,
    sources: Tensor | None = None,
) -> Tensor:
    """The configured labelling rule on a (P, K) PSNR table.

    ``costs``: each route's MACs fraction; ``sources``: each patch's image index (for
    ``budget_weights: image``).
    """
    if config.labels == "quantile":
        return quantile_labels(psnrs[:, -1], psnrs.shape[1])
    if config.labels == "budget":
        if costs is None:
            raise SparsityError("labels: budget needs the routes' MAC costs")
        weights = None
        if config.budget_weights == "patch":
            weights = per_patch_weights(psnrs)
        if config.budget_weights == "image":
            if sources is None:
                raise SparsityError("budget_weights: image needs each patch's image index")
            weights = per_image_weights(psnrs, sources)
        return budget_labels(psnrs, costs, config.target_macs_fraction, weights)
    return delta_labels(psnrs, config.delta)


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
