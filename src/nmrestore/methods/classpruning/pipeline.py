"""Patch inference for ClassPruning models (:class:`AdaptivePipeline`).

The LR image is split into overlapping patches
(32 pixels, stride 28 by default; the last row/column of patches is aligned to the border so every
pixel is covered), the classifier picks a route for each patch, the patches of each route run
*together* in batches (ClassSR ran them one by one), and the outputs are stitched back with
overlap averaging. Per image it reports the route histogram, the MACs (each patch's route + the
classifier on every patch) as a fraction of the dense network on the same patches (ClassSR's
convention) and of the dense network on the whole image (which also pays for the overlap), and
it can paint a class map (route colour over the image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import SparsityError
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
from nmrestore.sparsity.parametrization import use_route


@dataclass
class AdaptiveResult:
    """One image through the patch pipeline: output, routes, and its MAC accounting."""

    output: Tensor
    routes: Tensor  # (P,) route of each patch
    positions: list[tuple[int, int]]
    patch: tuple[int, int]
    costs: RouteCosts
    whole_image_dense_macs: float
    lr_size: tuple[int, int]
    scale: int

    @property
    def num_patches(self) -> int:
        return len(self.positions)

    @property
    def histogram(self) -> list[int]:
        """Patches per route (route 0 = cheapest)."""
        return [int(v) for v in torch.bincount(self.routes.cpu(), minlength=self.costs.num_routes)]

    @property
    def macs(self) -> float:
        """Pipeline MACs: every patch's route plus the classifier on every patch."""
        return self.costs.patches_macs(self.histogram)

    @property
    def dense_patch_macs(self) -> float:
        """The dense network on the same patches (ClassSR's reference)."""
        return self.num_patches * self.costs.dense_macs

    @property
    def macs_fraction(self) -> float:
        return self.macs / self.dense_patch_macs

    @property
    def macs_fraction_whole_image(self) -> float:
        """Against the dense network run once on the whole image (pays for the patch overlap too)."""
        return self.macs / self.whole_image_dense_macs

    def summary(self) -> dict[str, Any]:
        return {
            "patches": self.num_patches,
            "route_histogram": self.histogram,
            "macs": self.macs,
            "dense_patch_macs": self.dense_patch_macs,
            "whole_image_dense_macs": self.whole_image_dense_macs,
            "macs_fraction": self.macs_fraction,
            "macs_fraction_whole_image": self.macs_fraction_whole_image,
        }


class AdaptivePipeline:
    """Patch inference for a classpruning model: split, classify, batch per route, stitch.

    Args:
        model: a model sparsified with ``classpruning`` (masks with K routes + classifier).
        patch_size, stride: LR patch side and stride (default: the model's recipe, else ClassSR's 32/28).
        batch_size: patches per forward (1 gives ClassSR's patch-at-a-time loop).
        shift: cost shift tau for the decisions (None: the calibrated one stored in the model).
        force_route: send every patch to this route (no classifier decision; still counted).
        blend: overlap weights, ``ramp`` or ``mean`` (see :func:`blend_weights`; default: the recipe's).
        engine: runs the routes' patch batches instead of ``model`` (e.g. ``compile_sparse(model)``,
            whose layers keep one sparse weight per route); classifier and MAC counts stay ``model``'s.
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
    ) -> None:
        default_patch, default_stride, default_blend = _pipeline_settings(model)
        patch_size = default_patch if patch_size is None else patch_size
        stride = default_stride if stride is None else stride
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
        """Patch size and top-left positions this pipeline uses on an ``height`` x ``width`` LR image."""
        size = (min(self.patch_size, height), min(self.patch_size, width))
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
            outputs = self._run_routes(patches, routes)
        finally:
            self.model.train(was_training)
        output = stitch_patches(outputs, positions, self.scale, (h * self.scale, w * self.scale), self.blend)
        return AdaptiveResult(
            output=output,
            routes=routes.cpu(),
            positions=positions,
            patch=size,
            costs=self.costs(size),
            whole_image_dense_macs=self.whole_image_macs((h, w)),
            lr_size=(h, w),
            scale=self.scale,
        )

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


def _pipeline_settings(model: nn.Module) -> tuple[int, int, str]:
    """Patch size, stride and blend: the model's recipe values when it carries them, else 32/28/ramp."""
    settings = getattr(getattr(model, "module", model), "nm_adaptive_settings", None)
    if isinstance(settings, tuple) and len(settings) == 3:
        return int(settings[0]), int(settings[1]), str(settings[2])
    return DEFAULT_PATCH, DEFAULT_STRIDE, "ramp"
