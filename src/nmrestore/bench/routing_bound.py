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

:func:`tile_routing_bound` is the same bound for the spatial pipeline (non-overlapping tiles, no
stitching): every route runs on the whole image, and each tile of the output is taken from the
route a perfect router would pick. It takes any restorers per route: independently trained models,
or the adaptive model's own routes (then it bounds what a better classifier alone could reach).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.engine.evaluate import evaluate_fn
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.labels import budget_labels, per_image_weights, per_patch_weights
from nmrestore.methods.classpruning.losses import bisect_multiplier
from nmrestore.methods.classpruning.patches import extract_patches, grid_positions, stitch_patches
from nmrestore.metrics import psnr_torch


@dataclass(frozen=True)
class RoutedScore:
    """One routing of every test patch: its score, route histogram and average MACs."""

    psnr: float
    ssim: float
    histogram: list[int]
    macs_fraction: float
    per_image: list[dict[str, Any]] = field(default_factory=list)
    tiles: list[float] | None = None  # per-tile PSNRs of the scoring protocol (paired intervals)


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


@torch.no_grad()
def tile_routing_bound(
    restorers: Sequence[Callable[[Tensor], Tensor]],
    costs: Sequence[float],
    target: float,
    samples: Sequence[dict[str, Any]],
    scale: int,
    crop_border: int,
    test_y_channel: bool,
    tile: int,
    score_tile: int | None = None,
) -> RoutingBound:
    """Route the ``tile`` x ``tile`` LR tiles of ``samples`` among ``restorers`` at ``target`` MACs.

    ``restorers``: one per route, cheapest first, the last the full route, each restoring a whole
    image; ``costs``: each route's MACs per pixel as a fraction of dense (classifier included if it
    should be), so that the mean over tiles, weighted by their pixels, is the whole-image fraction.
    The expected-error routing minimises ``||f_k - f_full||^2`` summed over tiles (no ground truth);
    the oracle minimises each tile's dB loss against the ground truth (errors weighted by 1 / the
    tile's full-route MSE: the mean tile PSNR the paired intervals score). Each routed image is
    every tile cut from its route's whole-image output. ``score_tile``: HR tile side of the scores'
    per-tile PSNRs (the paired intervals' units).
    """
    if len(restorers) != len(costs) or not restorers:
        raise SparsityError(f"{len(restorers)} restorers for {len(costs)} route costs")
    outputs: list[list[Tensor]] = []
    boxes: list[list[tuple[int, int, int, int]]] = []
    gt_psnr, full_psnr, pixels = [], [], []
    for sample in samples:
        lq = sample["lq"] if sample["lq"].dim() == 4 else sample["lq"].unsqueeze(0)
        gt = (sample["gt"] if sample["gt"].dim() == 4 else sample["gt"].unsqueeze(0)).cpu()
        h, w = lq.shape[-2:]
        outs = [r(lq).clamp(0, 1).cpu() for r in restorers]
        found = [
            (t, c, min(tile, h - t), min(tile, w - c)) for t in range(0, h, tile) for c in range(0, w, tile)
        ]
        table = torch.empty(len(found), 2, len(outs), dtype=torch.float64)
        for i, (t, c, bh, bw) in enumerate(found):
            region = (slice(None), slice(None), slice(t * scale, (t + bh) * scale), slice(c * scale, (c + bw) * scale))
            for k, out in enumerate(outs):
                table[i, 0, k] = float(psnr_torch(out[region], gt[region], 0, test_y_channel)[0])
                table[i, 1, k] = float(psnr_torch(out[region], outs[-1][region], 0, test_y_channel)[0])
        outputs.append(outs)
        boxes.append(found)
        gt_psnr.append(table[:, 0])
        full_psnr.append(table[:, 1])
        pixels.append(torch.tensor([bh * bw for _, _, bh, bw in found], dtype=torch.float64))
    cost = torch.as_tensor(costs, dtype=torch.float64)
    weight = torch.cat(pixels)
    # a tile's MACs scale with its pixels: cut tiles at the border weigh less in the budget
    area = weight / weight.mean()
    gt_table = torch.cat(gt_psnr)
    expected = _tile_labels(torch.cat(full_psnr), cost, target, area, None)
    oracle = _tile_labels(gt_table, cost, target, area, per_patch_weights(gt_table))

    def score(labels: Tensor) -> RoutedScore:
        composed = []
        for outs, found, routes in zip(outputs, boxes, labels.split([len(b) for b in boxes]), strict=True):
            image = outs[-1].clone()
            for (t, c, bh, bw), k in zip(found, routes.tolist(), strict=True):
                region = (slice(None), slice(None), slice(t * scale, (t + bh) * scale), slice(c * scale, (c + bw) * scale))
                image[region] = outs[k][region]
            composed.append(image)
        stream = iter(composed)
        result = evaluate_fn(lambda _: next(stream), samples, crop_border, test_y_channel, tile=score_tile)
        tiles = [round(float(v), 4) for r in result.per_image for v in r.get("tiles", ())]
        return RoutedScore(
            psnr=result.psnr,
            ssim=result.ssim,
            histogram=torch.bincount(labels, minlength=cost.numel()).tolist(),
            macs_fraction=float((cost[labels] * weight).sum() / weight.sum()),
            per_image=[{k: v for k, v in r.items() if k != "tiles"} for r in result.per_image],
            tiles=tiles or None,
        )

    count = gt_table.shape[0]
    singles = [score(torch.full((count,), k, dtype=torch.int64)) for k in range(len(costs))]
    return RoutingBound(expected=score(expected), oracle=score(oracle), single_route=singles)


def _tile_labels(psnrs: Tensor, cost: Tensor, target: float, area: Tensor, weights: Tensor | None) -> Tensor:
    """The least (weighted) squared error at pixel-weighted average cost <= ``target``.

    :func:`budget_labels` with every tile's error and MACs scaled by its pixels (``area``, mean 1):
    tiles cut at the border count for less, in the error as in the budget.
    """
    w = area if weights is None else area * weights
    mse = torch.pow(10.0, -psnrs.double().clamp(max=100.0) / 10) * w.reshape(-1, 1)
    paid = area.reshape(-1, 1) * cost.reshape(1, -1)

    def assign(lam: float) -> Tensor:
        return (mse + (lam + 1e-12) * paid).argmin(dim=1)  # ties go to the cheaper route

    def average(lam: float) -> float:
        return float((cost[assign(lam)] * area).sum() / area.sum())

    spread = float(mse.max() - mse.min())
    gap = float((cost[1:] - cost[:-1]).abs().min()) if cost.numel() > 1 else 1.0
    bound = 2 * spread / max(gap * float(area.min()), 1e-9) + 1.0  # every tile on its cheapest route here
    return assign(bisect_multiplier(average, target, 0.0, bound))


__all__ = ["RoutedScore", "RoutingBound", "routing_bound", "tile_routing_bound"]
