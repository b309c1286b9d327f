"""How much can per-patch routing gain at all? The ceiling of input-adaptive N:M on given images.

ClassPruning (:mod:`nmrestore.methods.classpruning`) loses PSNR in three places: its routes share one weight tensor,
its classifier guesses, and the patch pipeline sees no context across patch borders. This module
removes the first two to measure what is left, the idea itself: each route is an *independently*
trained model (e.g. SR-STE at that route's N:M, the dense model fine-tuned for the full route),
and the patches of the test images are routed at a given average MACs

* by the **expected error** each cheaper route adds, ``||f_k(x) - f_full(x)||^2``: the routing
  a perfect difficulty classifier would reproduce, and it needs no ground truth;
* by the **ground truth** (the oracle): the routes that lose the least mean per-image PSNR. It
  also exploits the test images' own noise, so no classifier can reach it.

If static N:M of the same MACs beats even these, no classifier and no training schedule can make
ClassPruning beat it on those images: the per-patch differences in difficulty are too small for
the patch pipeline's cost (MACs spent on overlap, PSNR lost at patch borders).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.engine.evaluate import evaluate_fn
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.labels import budget_labels, per_image_weights
from nmrestore.methods.classpruning.patches import extract_patches, grid_positions, stitch_patches
from nmrestore.metrics import psnr_torch


@dataclass(frozen=True)
class RoutedScore:
    """One routing of every test patch: its score, route histogram and average MACs."""

    psnr: float
    ssim: float
    histogram: list[int]
    macs_fraction: float


@dataclass(frozen=True)
class RoutingBound:
    """The two bounds at one target, plus every patch on one route (the stitched static models)."""

    expected: RoutedScore
    oracle: RoutedScore
    single_route: list[RoutedScore]


@dataclass
class _ImageTables:
    outputs: list[Tensor]  # per route: (P, C, s*p, s*p)
    positions: list[tuple[int, int]]
    out_size: tuple[int, int]
    gt_psnr: Tensor  # (P, K) against the ground truth
    full_psnr: Tensor  # (P, K) against the full (last) route's output


@torch.no_grad()
def _tables(
    route_models: Sequence[nn.Module],
    sample: dict[str, Any],
    scale: int,
    crop_border: int,
    test_y_channel: bool,
    patch: int,
    stride: int,
    batch_size: int,
) -> _ImageTables:
    lq = sample["lq"] if sample["lq"].dim() == 4 else sample["lq"].unsqueeze(0)
    gt = sample["gt"] if sample["gt"].dim() == 4 else sample["gt"].unsqueeze(0)
    h, w = lq.shape[-2:]
    if h < patch or w < patch:
        raise SparsityError(f"an LR image of {h}x{w} is smaller than the {patch}-pixel patch")
    positions = grid_positions(h, w, patch, stride)
    patches = extract_patches(lq, positions, (patch, patch))
    targets = torch.stack(
        [gt[0, :, t * scale : (t + patch) * scale, s * scale : (s + patch) * scale] for t, s in positions]
    )
    outputs = []
    for model in route_models:
        device = next(model.parameters()).device
        outputs.append(
            torch.cat([model(c.to(device)).clamp(0, 1).cpu() for c in patches.split(batch_size)])
        )
    gt_psnr = torch.stack([psnr_torch(o, targets, crop_border, test_y_channel) for o in outputs], 1)
    full_psnr = torch.stack([psnr_torch(o, outputs[-1], crop_border, test_y_channel) for o in outputs], 1)
    return _ImageTables(outputs, positions, (h * scale, w * scale), gt_psnr.cpu(), full_psnr.cpu())


def _score(
    tables: list[_ImageTables],
    samples: Sequence[dict[str, Any]],
    labels: Tensor,
    costs: Tensor,
    scale: int,
    crop_border: int,
    test_y_channel: bool,
    blend: str,
) -> RoutedScore:
    images = []
    for table, routes in zip(tables, labels.split([len(t.positions) for t in tables]), strict=True):
        chosen = torch.stack([table.outputs[k][i] for i, k in enumerate(routes.tolist())])
        images.append(stitch_patches(chosen, table.positions, scale, table.out_size, blend))
    stitched = iter(images)
    result = evaluate_fn(lambda _: next(stitched), samples, crop_border, test_y_channel)
    return RoutedScore(
        psnr=result.psnr,
        ssim=result.ssim,
        histogram=torch.bincount(labels, minlength=costs.numel()).tolist(),
        macs_fraction=float(costs[labels].mean()),
    )


def routing_bound(
    route_models: Sequence[nn.Module],
    costs: Sequence[float],
    target: float,
    samples: Sequence[dict[str, Any]],
    scale: int,
    crop_border: int,
    test_y_channel: bool,
    patch: int = 32,
    stride: int = 28,
    blend: str = "ramp",
    batch_size: int = 64,
) -> RoutingBound:
    """Route every patch of ``samples`` among ``route_models`` at ``target`` average MACs, two ways.

    ``route_models``: one model per route, cheapest first, the last one the full route;
    ``costs``: each route's MACs as a fraction of dense (the same convention as the adaptive
    model's, classifier included if it should be). The expected-error routing minimises the summed
    ``||f_k - f_full||^2`` over all patches (no ground truth); the oracle minimises the summed
    squared error against the ground truth, each patch weighted by ``1 / MSE`` of its image on the
    full route (the first-order loss of the mean per-image PSNR), as :func:`oracle_routes` does.
    Both are :func:`~nmrestore.methods.classpruning.budget_labels` assignments.
    """
    if len(route_models) != len(costs) or not route_models:
        raise SparsityError(f"{len(route_models)} route models for {len(costs)} route costs")
    cost = torch.as_tensor(costs, dtype=torch.float64)
    was_training = [m.training for m in route_models]
    for m in route_models:
        m.eval()
    try:
        tables = [
            _tables(route_models, s, scale, crop_border, test_y_channel, patch, stride, batch_size)
            for s in samples
        ]
    finally:
        for m, flag in zip(route_models, was_training, strict=True):
            m.train(flag)
    gt_psnr = torch.cat([t.gt_psnr for t in tables])
    sources = torch.cat([torch.full((len(t.positions),), i, dtype=torch.int64) for i, t in enumerate(tables)])
    weights = per_image_weights(gt_psnr, sources)
    expected = budget_labels(torch.cat([t.full_psnr for t in tables]), cost, target)
    oracle = budget_labels(gt_psnr, cost, target, weights)

    def score(labels: Tensor) -> RoutedScore:
        return _score(tables, samples, labels, cost, scale, crop_border, test_y_channel, blend)

    singles = [score(torch.full((gt_psnr.shape[0],), k, dtype=torch.int64)) for k in range(len(costs))]
    return RoutingBound(expected=score(expected), oracle=score(oracle), single_route=singles)


__all__ = ["RoutedScore", "RoutingBound", "routing_bound"]
