"""Inference for ClassPruning models (:class:`AdaptivePipeline`), in one of two modes.

``patches`` (ClassSR's): the LR image is split into overlapping patches (32 pixels, stride 28 by
default; the last row/column aligned to the border so every pixel is covered), the classifier picks
a route for each patch, the patches of each route run *together* in batches (ClassSR ran them one
by one), and the outputs are stitched back with overlap averaging. Every overlapping pixel is
computed twice or four times, and each patch sees zero padding at its own border.

``spatial``: the classifier rates each tile of a non-overlapping grid (``patch_size`` pixels; the
last row/column cut at the border, rated on the full-size window ending at the border), and the
network runs *once on the whole image* with every routed layer computing each tile on its route
(:mod:`nmrestore.runtime.spatial`, through :func:`~nmrestore.runtime.compile_sparse`: the sparse
kernel with ``engine``, dense PyTorch otherwise). No pixel is computed twice, nothing is stitched,
and tiles read their neighbours' features instead of zero padding.

Per image it reports the route histogram and the MACs (:mod:`.accounting`): whole-image first
(everything computed, overlap, classifier and blending included, over the dense network run once
on the whole image), then ClassSR's per-patch figure; and it can paint a class map.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import SparsityError
from nmrestore.methods.classpruning.accounting import PipelineCost, pipeline_cost
from nmrestore.methods.classpruning.classifier import (
    RouteCosts,
    model_device,
    num_routes,
    route_classifier,
    route_costs,
)
from nmrestore.methods.classpruning.config import PSNR_CAP
from nmrestore.methods.classpruning.labels import budget_labels
from nmrestore.methods.classpruning.patches import (
    DEFAULT_PATCH,
    DEFAULT_STRIDE,
    blend_weights,
    extract_patches,
    patch_starts,
    stitch_patches,
)
from nmrestore.metrics import psnr_torch
from nmrestore.runtime import EngineConfig, RouteMap, compile_sparse, routed_layers, use_spatial_routes
from nmrestore.runtime.spatial import grid_shape
from nmrestore.sparsity.parametrization import nm_layers, use_route

#: The two inference modes (see the module docstring).
MODES = ("patches", "spatial")


@dataclass
class AdaptiveResult:
    """One image through the pipeline: output, routes, and its MAC accounting (:class:`PipelineCost`)."""

    output: Tensor
    routes: Tensor  # (P,) route of each patch (patches mode) or tile (spatial mode)
    positions: list[tuple[int, int]]  # top-left of each patch / tile
    patch: tuple[int, int]  # patch (tile) size; tiles at the border are cut to the image
    costs: RouteCosts
    cost: PipelineCost
    lr_size: tuple[int, int]
    scale: int
    mode: str = "patches"

    @property
    def num_patches(self) -> int:
        return len(self.positions)

    @property
    def histogram(self) -> list[int]:
        """Patches (tiles) per route (route 0 = cheapest)."""
        return [int(v) for v in torch.bincount(self.routes.cpu(), minlength=self.costs.num_routes)]

    @property
    def macs(self) -> float:
        """Everything the pipeline computed: routes (overlap included), classifier, blending."""
        return self.cost.total

    @property
    def whole_image_dense_macs(self) -> float:
        return self.cost.whole_image_dense_macs

    @property
    def dense_patch_macs(self) -> float:
        """The dense network on the same patches (ClassSR's reference)."""
        return self.cost.patch_dense_macs

    @property
    def macs_fraction(self) -> float:
        """Whole-image MACs: against the dense network run once on the whole image."""
        return self.cost.fraction

    @property
    def macs_fraction_per_patch(self) -> float:
        """ClassSR's convention: routes + classifier over the dense network on the same patches."""
        return self.cost.per_patch_fraction

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "patches": self.num_patches,
            "route_histogram": self.histogram,
            "macs": self.macs,
            "whole_image_dense_macs": self.whole_image_dense_macs,
            "macs_fraction": self.macs_fraction,
            "macs_fraction_per_patch": self.macs_fraction_per_patch,
            "dense_patch_macs": self.dense_patch_macs,
            "overlap": self.cost.overlap,
        }


class AdaptivePipeline:
    """Inference for a classpruning model: classify, then run each route on its patches or tiles.

    Args:
        model: a model sparsified with ``classpruning`` (masks with K routes + classifier).
        patch_size, stride: LR patch (tile) side and patch stride (default: the model's recipe, else
            ClassSR's 32/28; spatial mode has no stride).
        batch_size: patches per forward and classifier batch (1 gives ClassSR's patch-at-a-time loop).
        shift: cost shift tau for the decisions (None: the calibrated one stored in the model).
        force_route: send every patch to this route (no classifier decision; still counted).
        blend: overlap weights, ``ramp`` or ``mean`` (see :func:`blend_weights`; default: the recipe's).
        engine: runs the network instead of ``model``: ``compile_sparse(model)``, whose layers keep one
            sparse weight per route. Spatial mode without it compiles ``model`` with the dense tactic
            (PyTorch convolutions) on every call. Classifier and MAC counts stay ``model``'s.
        mode: ``patches`` or ``spatial`` (default: the recipe's ``inference``, else ``patches``).
    """

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | None = None,
        stride: int | None = None,
        batch_size: int = 64,
        shift: float | None = None,
        force_route: int | None = None,
        blend: str | None = None,
        engine: nn.Module | None = None,
        mode: str | None = None,
    ) -> None:
        default_patch, default_stride, default_blend, default_mode = _pipeline_settings(model)
        patch_size = default_patch if patch_size is None else patch_size
        self.mode = default_mode if mode is None else mode
        if self.mode not in MODES:
            raise SparsityError(f"unknown pipeline mode {self.mode!r}; use one of {', '.join(MODES)}")
        # spatial tiles do not overlap: the stride is the tile
        stride = patch_size if self.mode == "spatial" else default_stride if stride is None else stride
        self.blend = default_blend if blend is None else blend
        blend_weights(1, 1, self.blend)  # validates the name
        if stride < 1 or patch_size < 1 or stride > patch_size:
            raise SparsityError(f"need 1 <= stride <= patch_size, got patch {patch_size}, stride {stride}")
        if batch_size < 1:
            raise SparsityError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.engine = engine
        self.classifier = route_classifier(model)
        self.patch_size = patch_size
        self.stride = stride
        self.batch_size = batch_size
        self.shift = shift
        self.force_route = force_route
        self.scale = int(getattr(model, "scale", 1))
        self.num_routes = num_routes(model)
        self._costs: dict[tuple[int, int], RouteCosts] = {}
        self._whole: dict[tuple[int, int], float] = {}
        self._checked: set[int] = set()

    def costs(self, size: tuple[int, int]) -> RouteCosts:
        """MACs per route of one ``size`` patch (cached per size)."""
        if size not in self._costs:
            self._costs[size] = route_costs(self.model, size)
        return self._costs[size]

    def whole_image_macs(self, size: tuple[int, int]) -> float:
        if size not in self._whole:
            self._whole[size] = float(count_cost(self.model, size).dense_macs)
        return self._whole[size]

    def _run_routes(self, patches: Tensor, routes: Tensor) -> Tensor:
        outputs: Tensor | None = None
        runner = self.model if self.engine is None else self.engine
        for k in range(self.num_routes):
            index = (routes == k).nonzero().flatten()
            if index.numel() == 0:
                continue
            with use_route(runner, k):
                for chunk in index.split(self.batch_size):
                    out = runner(patches[chunk])
                    if outputs is None:
                        outputs = out.new_empty(patches.shape[0], *out.shape[1:])
                    outputs[chunk] = out
        assert outputs is not None
        return outputs

    def classify(self, patches: Tensor) -> Tensor:
        """The route of each patch (in chunks of ``batch_size``)."""
        if self.force_route is not None:
            return torch.full((patches.shape[0],), self.force_route, dtype=torch.int64, device=patches.device)
        return torch.cat([self.classifier.decide(c, self.shift) for c in patches.split(self.batch_size)])

    def patch_grid(self, height: int, width: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        """Patch size and top-left positions this pipeline classifies on an ``height`` x ``width`` LR image.

        Spatial mode: one window per tile, row-major; a tile cut at the border is rated on the
        full-size window that ends at the border.
        """
        size = (min(self.patch_size, height), min(self.patch_size, width))
        if self.mode == "spatial":
            rows, cols = grid_shape((height, width), self.patch_size)
            t = self.patch_size
            return size, [
                (min(i * t, height - size[0]), min(j * t, width - size[1])) for i in range(rows) for j in range(cols)
            ]
        positions = [
            (t, s)
            for t in patch_starts(height, size[0], self.stride)
            for s in patch_starts(width, size[1], self.stride)
        ]
        return size, positions

    @torch.no_grad()
    def __call__(self, lq: Tensor, routes: Tensor | None = None) -> AdaptiveResult:
        """Restore one LR image (1, C, h, w) or (C, h, w).

        ``routes`` (one per patch of :meth:`patch_grid`) overrides the classifier, e.g. to score an
        oracle's routing; the classifier's MACs are still counted.
        """
        image = lq if lq.dim() == 4 else lq.unsqueeze(0)
        if image.shape[0] != 1:
            raise SparsityError(
                f"the patch pipeline takes one image at a time, got a batch of {image.shape[0]}"
            )
        image = image.to(model_device(self.model))
        h, w = image.shape[-2:]
        size, positions = self.patch_grid(h, w)
        if routes is not None and routes.shape != (len(positions),):
            raise SparsityError(f"{tuple(routes.shape)} routes given for {len(positions)} patches")
        was_training = self.model.training
        self.model.eval()
        try:
            patches = extract_patches(image, positions, size)
            routes = self.classify(patches) if routes is None else routes.to(patches.device)
            if self.mode == "spatial":
                output, pixels, stitched = self._run_spatial(image, routes.cpu())
                rows, cols = grid_shape((h, w), self.patch_size)
                t = self.patch_size
                positions = [(i * t, j * t) for i in range(rows) for j in range(cols)]
                size = (t, t)
            else:
                outputs = self._run_routes(patches, routes)
                output = stitch_patches(outputs, positions, self.scale, (h * self.scale, w * self.scale), self.blend)
                counts = torch.bincount(routes.cpu(), minlength=self.num_routes).tolist()
                pixels = [n * size[0] * size[1] for n in counts]
                # one multiply-add per accumulated output value, one division per output value
                stitched = (len(positions) * size[0] * size[1] + h * w) * self.scale**2 * outputs.shape[1]
        finally:
            self.model.train(was_training)
        costs = self.costs((min(self.patch_size, h), min(self.patch_size, w)))
        cost = pipeline_cost(costs, pixels, len(routes), self.whole_image_macs((h, w)), h * w, stitched)
        return AdaptiveResult(
            output=output,
            routes=routes.cpu(),
            positions=positions,
            patch=size,
            costs=costs,
            cost=cost,
            lr_size=(h, w),
            scale=self.scale,
            mode=self.mode,
        )

    def _run_spatial(self, image: Tensor, routes: Tensor) -> tuple[Tensor, list[int], int]:
        """The whole image through the engine, each tile on its route: output, LR pixels per route, 0."""
        h, w = image.shape[-2:]
        route_map = RouteMap(routes.view(grid_shape((h, w), self.patch_size)), self.patch_size, (h, w))
        # without an engine: the dense tactic, i.e. PyTorch convolutions on this model's current weights
        engine = self.engine if self.engine is not None else compile_sparse(self.model, EngineConfig(tactic="dense"))
        self._check_engine(engine)
        with use_spatial_routes(engine, route_map):
            output = engine(image)
        return output, route_map.pixels_per_route(self.num_routes), 0

    def _check_engine(self, engine: nn.Module) -> None:
        """Every layer whose routes differ must run tile by tile, or a tile would get another route."""
        if id(engine) in self._checked:
            return
        routed = {name for name, _, mask in nm_layers(self.model) if len(set(mask.route_n.tolist())) > 1}
        missing = sorted(routed - {layer.layer_name for layer in routed_layers(engine)})
        if missing:
            raise SparsityError(
                f"spatial routing needs every routed layer on the engine; {', '.join(missing[:3])} "
                "stayed plain (an unsupported convolution): use mode='patches'"
            )
        if self.engine is not None:  # a fresh engine per call is not worth remembering
            self._checked.add(id(engine))

    def restore(self, lq: Tensor) -> Tensor:
        """Just the output (a ``Restorer`` for :func:`~nmrestore.engine.evaluate.evaluate_fn`)."""
        return self(lq).output


@torch.no_grad()
def oracle_routes(
    pipeline: AdaptivePipeline,
    samples: Sequence[dict[str, Any]],
    crop_border: int,
    test_y_channel: bool,
    target: float,
) -> list[Tensor]:
    """Routes per patch of every image that lose the least mean per-image PSNR at ``target`` MACs.

    Uses the ground truth: every patch runs on every route, its error is weighted by 1 / its
    image's full-route MSE (first order of the mean per-image PSNR) and :func:`budget_labels`
    assigns the routes over all images at once. A bound on what any classifier can reach with
    these routes, not a method. Returns one (patches,) tensor per sample, for ``pipeline(lq, routes)``.
    """
    if pipeline.mode != "patches":
        raise SparsityError("oracle_routes scores isolated patches: it needs a pipeline in mode 'patches'")
    model = pipeline.model
    was_training = model.training
    model.eval()
    psnrs, weights, counts = [], [], []
    size = (0, 0)
    try:
        for sample in samples:
            lq = sample["lq"] if sample["lq"].dim() == 4 else sample["lq"].unsqueeze(0)
            gt = sample["gt"] if sample["gt"].dim() == 4 else sample["gt"].unsqueeze(0)
            h, w = lq.shape[-2:]
            size, positions = pipeline.patch_grid(h, w)
            s = pipeline.scale
            patches = extract_patches(lq.to(model_device(model)), positions, size)
            targets = torch.stack(
                [gt[0, :, t * s : (t + size[0]) * s, c * s : (c + size[1]) * s] for t, c in positions]
            )
            table = torch.empty(len(positions), pipeline.num_routes, dtype=torch.float64)
            for k in range(pipeline.num_routes):
                with use_route(model, k):
                    out = torch.cat([model(c).clamp(0, 1).cpu() for c in patches.split(pipeline.batch_size)])
                table[:, k] = psnr_torch(out, targets, crop_border, test_y_channel).cpu()
            full_mse = torch.pow(10.0, -table[:, -1].clamp(max=PSNR_CAP) / 10).mean()
            psnrs.append(table)
            weights.append(torch.full((len(positions),), 1.0 / float(full_mse.clamp(min=1e-12))))
            counts.append(len(positions))
    finally:
        model.train(was_training)
    fractions = pipeline.costs(size).fractions()
    labels = budget_labels(torch.cat(psnrs), fractions, target, torch.cat(weights))
    return list(labels.split(counts))


@torch.no_grad()
def patchwise_restore(
    model: nn.Module, lq: Tensor, patch_size: int, stride: int, batch_size: int = 64, blend: str = "ramp"
) -> Tensor:
    """Any model on overlapping patches with the same stitching (the dense reference on patches)."""
    image = lq if lq.dim() == 4 else lq.unsqueeze(0)
    h, w = image.shape[-2:]
    size = (min(patch_size, h), min(patch_size, w))
    positions = [(t, s) for t in patch_starts(h, size[0], stride) for s in patch_starts(w, size[1], stride)]
    patches = extract_patches(image.to(model_device(model)), positions, size)
    outputs = torch.cat([model(c) for c in patches.split(batch_size)])
    scale = int(getattr(model, "scale", 1))
    return stitch_patches(outputs, positions, scale, (h * scale, w * scale), blend)


def adaptive_engine(model: nn.Module) -> nn.Module:
    """The sparse engine for a ClassPruning model (what ``infer --sparse-engine`` runs it on).

    Every route of every routed layer on the kernel (in place, tile by tile, in spatial mode), and the
    dense first and last convs too where timing finds the kernel faster (``dense_convs``: at x4 the last
    conv, 64 -> 3 channels at the output size, takes 0.47x of PyTorch's time on the kernel).
    """
    return compile_sparse(model, EngineConfig(dense_convs=True))


def _pipeline_settings(model: nn.Module) -> tuple[int, int, str, str]:
    """Patch size, stride, blend and mode: the model's recipe values when it carries them, else
    32/28/ramp/patches."""
    settings = getattr(getattr(model, "module", model), "nm_adaptive_settings", None)
    if isinstance(settings, tuple) and len(settings) in (3, 4):
        mode = str(settings[3]) if len(settings) == 4 else "patches"
        return int(settings[0]), int(settings[1]), str(settings[2]), mode
    return DEFAULT_PATCH, DEFAULT_STRIDE, "ramp", "patches"
