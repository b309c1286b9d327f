"""ClassPruning's engine: the three resumable training stages and the patch-inference pipeline.

**Inference** (:class:`AdaptivePipeline`): the LR image is split into overlapping patches
(32 pixels, stride 28 by default; the last row/column of patches is aligned to the border so every
pixel is covered), the classifier picks a route for each patch, the patches of each route run
*together* in batches (ClassSR ran them one by one), and the outputs are stitched back with
overlap averaging. Per image it reports the route histogram, the MACs (each patch's route + the
classifier on every patch) as a fraction of the dense network on the same patches (ClassSR's
convention) and of the dense network on the whole image (which also pays for the overlap), and
it can paint a class map (route colour over the image).

**Training** (:func:`train_adaptive`, what ``nmrestore train`` runs for ``method: classpruning``),
each stage a :class:`~nmrestore.engine.trainer.Trainer` run with its own checkpoints under
``<run>/stage_<x>/``, so a killed stage resumes where it stopped and finished stages are skipped:

* ``routes`` (only with ``route_budgets``): an SLS search per route budget, per-layer N made nested;
* ``a``: sandwich-rule route training -- every step runs the full route, the cheapest route and a
  random middle one, L1 each, the smaller routes also distilled towards the full route's output;
* ``b``: labels (cheapest route within delta dB of the full route, or PSNR quantiles) on a grid of
  training patches, then the classifier trained with cross-entropy (SR weights frozen);
* ``c``: joint fine-tuning with soft routing ``y = sum_k p_k f_k(x)``, loss L1 + w_c class loss
  + w_b budget loss (expected MACs pulled to the target; ClassSR's equal split as an option);
* then the cost shift ``tau`` is calibrated on held-out patches (the bottom strip of every training
  image, never trained on) so that hard routing meets the target, and the final model is written
  to ``<run>/checkpoints/{last,best}.safetensors`` (one file: masks, routes, classifier, tau).

Stage A is DDP-aware through the Trainer; stages B and C are replicated on every rank (each rank
computes the same thing, rank 0 writes), because their forward mixes the classifier and K routes.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from nmrestore.cost import count_cost
from nmrestore.data.datasets import ImageList, SREvalDataset, SRTrainDataset, make_lr, split_holdout
from nmrestore.data.degradations import Degradation, degrade_image, image_seed
from nmrestore.data.io import to_tensor, to_uint8, write_image
from nmrestore.data.loader import build_train_loader
from nmrestore.data.restoration import EVAL_SEED, DegradedEvalDataset, DegradedTrainDataset
from nmrestore.engine.checkpoint import load_checkpoint, load_model_state, save_checkpoint
from nmrestore.engine.distributed import DistInfo, barrier, distributed_run
from nmrestore.engine.evaluate import EvalResult, evaluate_model
from nmrestore.engine.runner import (
    RunResult,
    _images,
    apply_sparsity,
    base_model,
    build_val_dataset,
    load_weights_from,
    seed_everything,
)
from nmrestore.engine.task import LOSSES
from nmrestore.engine.trainer import Trainer, TrainState
from nmrestore.errors import ImageError, RecipeError, SparsityError
from nmrestore.io_atomic import atomic_write_text
from nmrestore.methods.classpruning import (
    PSNR_CAP,
    ClassPruningConfig,
    RouteCosts,
    bisect_multiplier,
    budget_labels,
    budget_loss,
    class_loss,
    delta_labels,
    equal_split_loss,
    layer_route_ns,
    nested_route_ns,
    num_routes,
    quantile_labels,
    route_classifier,
    route_costs,
    set_layer_route_ns,
    update_route_costs,
)
from nmrestore.metrics import psnr, psnr_torch, ssim
from nmrestore.recipes.schema import Recipe, Schedule
from nmrestore.sparsity.parametrization import nm_layers, use_route

log = logging.getLogger("nmrestore.adaptive")

DEFAULT_PATCH = 32
DEFAULT_STRIDE = 28


# =============================================================================== patch grid
def patch_starts(size: int, patch: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, plus one aligned to the end if needed."""
    if patch >= size:
        return [0]
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def grid_positions(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """(top, left) of every patch, row-major; covers the whole image."""
    return [(t, s) for t in patch_starts(height, patch, stride) for s in patch_starts(width, patch, stride)]


def extract_patches(image: Tensor, positions: Sequence[tuple[int, int]], size: tuple[int, int]) -> Tensor:
    """Stack the ``size`` patches of a (1, C, H, W) or (C, H, W) image at ``positions``: (P, C, h, w)."""
    img = image[0] if image.dim() == 4 else image
    ph, pw = size
    return torch.stack([img[:, t : t + ph, s : s + pw] for t, s in positions])


def blend_weights(height: int, width: int, blend: str = "ramp") -> Tensor:
    """Per-pixel weight of an output patch in the overlap average.

    ``mean``: 1 everywhere (ClassSR's plain average). ``ramp``: the distance to the patch's nearest
    border + 0.5, so where patches overlap each pixel comes mostly from the patch that saw the most
    context around it (a convolution's zero padding corrupts the outer pixels of every patch).
    """
    if blend == "mean":
        return torch.ones(height, width)
    if blend != "ramp":
        raise SparsityError(f"unknown blend {blend!r}; use 'ramp' or 'mean'")
    dh = torch.minimum(torch.arange(height), torch.arange(height).flip(0)).double() + 0.5
    dw = torch.minimum(torch.arange(width), torch.arange(width).flip(0)).double() + 0.5
    return torch.minimum(dh[:, None], dw[None, :]).float()


def stitch_patches(
    outputs: Tensor,
    positions: Sequence[tuple[int, int]],
    scale: int,
    out_size: tuple[int, int],
    blend: str = "ramp",
) -> Tensor:
    """Place each output patch at ``scale * position``, weighted average where they overlap: (1, C, H, W)."""
    _, c, oh, ow = outputs.shape
    weight = blend_weights(oh, ow, blend).to(outputs)
    total = outputs.new_zeros(1, c, *out_size)
    count = outputs.new_zeros(1, 1, *out_size)
    for patch, (t, s) in zip(outputs, positions, strict=True):
        total[0, :, t * scale : t * scale + oh, s * scale : s * scale + ow] += patch * weight
        count[0, 0, t * scale : t * scale + oh, s * scale : s * scale + ow] += weight
    return total / count


# =============================================================================== pipeline
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


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


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
        image = image.to(_model_device(self.model))
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
            patches = extract_patches(lq.to(_model_device(model)), positions, size)
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
    patches = extract_patches(image.to(_model_device(model)), positions, size)
    outputs = torch.cat([model(c) for c in patches.split(batch_size)])
    scale = int(getattr(model, "scale", 1))
    return stitch_patches(outputs, positions, scale, (h * scale, w * scale), blend)


# =============================================================================== class map
def route_colors(k: int) -> list[tuple[int, int, int]]:
    """K colours from green (cheapest route) through yellow to red (full route)."""
    anchors = np.array([[26, 152, 80], [254, 224, 139], [215, 48, 39]], dtype=np.float64)
    out = []
    for i in range(k):
        x = 0.0 if k == 1 else 2 * i / (k - 1)
        j = min(int(x), 1)
        c = anchors[j] + (anchors[j + 1] - anchors[j]) * (x - j)
        out.append((int(c[0]), int(c[1]), int(c[2])))
    return out


def class_map(result: AdaptiveResult) -> np.ndarray:
    """Route per LR pixel (h, w): patches painted in order, so each pixel shows its last patch."""
    h, w = result.lr_size
    ph, pw = result.patch
    grid = np.zeros((h, w), dtype=np.int64)
    for route, (t, s) in zip(result.routes.tolist(), result.positions, strict=True):
        grid[t : t + ph, s : s + pw] = route
    return grid


def save_class_map(result: AdaptiveResult, path: str | Path, alpha: float = 0.45) -> Path:
    """The restored image with each patch tinted by its route, and a legend strip below."""
    from PIL import Image, ImageDraw

    image = to_uint8(result.output[0].clamp(0, 1)).astype(np.float64)
    grid = class_map(result).repeat(result.scale, axis=0).repeat(result.scale, axis=1)
    colors = np.array(route_colors(result.costs.num_routes), dtype=np.float64)
    tinted = (1 - alpha) * image + alpha * colors[grid]
    h, w = grid.shape
    for t, s in result.positions:  # thin patch borders
        ph, pw = result.patch[0] * result.scale, result.patch[1] * result.scale
        tinted[t * result.scale, s * result.scale : s * result.scale + pw] *= 0.7
        tinted[t * result.scale : t * result.scale + ph, s * result.scale] *= 0.7
    picture = Image.fromarray(np.clip(tinted, 0, 255).round().astype(np.uint8))
    lines = [
        f"route {k}: {n} patches, {f:.0%} MACs"
        for k, (n, f) in enumerate(zip(result.histogram, result.costs.fractions(), strict=True))
    ]
    lines.append(
        f"avg {result.macs_fraction:.1%} of dense on patches, {result.macs_fraction_whole_image:.1%} vs whole image"
    )
    legend_h = 14 * len(lines) + 6
    canvas = Image.new("RGB", (max(w, 260), h + legend_h), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        y = h + 4 + 14 * i
        if i < len(colors):
            draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(v) for v in colors[i]))
        draw.text((20, y), line, fill="black")
    return write_image(path, np.asarray(canvas))


# =============================================================================== evaluation
@dataclass
class AdaptiveEvalResult(EvalResult):
    """Per-image PSNR/SSIM plus routes and MACs; totals pooled over all patches of all images."""

    macs: float = 0.0
    dense_patch_macs: float = 0.0
    whole_image_dense_macs: float = 0.0
    histogram: list[int] = field(default_factory=list)
    costs: RouteCosts | None = None
    class_maps: list[str] = field(default_factory=list)

    @property
    def macs_fraction(self) -> float:
        """Average MACs / dense on the same patches, classifier included (ClassSR's convention)."""
        return self.macs / self.dense_patch_macs if self.dense_patch_macs else math.nan

    @property
    def macs_fraction_whole_image(self) -> float:
        return self.macs / self.whole_image_dense_macs if self.whole_image_dense_macs else math.nan

    def to_dict(self) -> dict[str, object]:
        return {
            **super().to_dict(),
            "route_histogram": self.histogram,
            "macs_fraction": self.macs_fraction,
            "macs_fraction_whole_image": self.macs_fraction_whole_image,
            "costs": None if self.costs is None else self.costs.to_dict(),
            "class_maps": self.class_maps,
        }


@torch.no_grad()
def evaluate_adaptive(
    pipeline: AdaptivePipeline,
    samples: Iterable[dict[str, object]],
    crop_border: int,
    test_y_channel: bool = True,
    class_map_dir: str | Path | None = None,
    with_ssim: bool = True,
) -> AdaptiveEvalResult:
    """Score the patch pipeline on whole images; optionally save a class map per image."""
    result = AdaptiveEvalResult(histogram=[0] * pipeline.num_routes)
    for sample in samples:
        lq, gt = sample["lq"], sample["gt"]
        assert isinstance(lq, Tensor) and isinstance(gt, Tensor)
        name = str(sample["name"])
        one = pipeline(lq)
        out = one.output.clamp(0, 1)[0].cpu()
        gt3 = gt[0] if gt.dim() == 4 else gt
        row: dict[str, Any] = {
            "name": name,
            "psnr": psnr(out, gt3, crop_border=crop_border, test_y_channel=test_y_channel),
            **one.summary(),
        }
        if with_ssim:
            row["ssim"] = ssim(out, gt3, crop_border=crop_border, test_y_channel=test_y_channel)
        result.per_image.append(row)
        result.macs += one.macs
        result.dense_patch_macs += one.dense_patch_macs
        result.whole_image_dense_macs += one.whole_image_dense_macs
        result.histogram = [a + b for a, b in zip(result.histogram, one.histogram, strict=True)]
        result.costs = one.costs
        if class_map_dir is not None:
            result.class_maps.append(str(save_class_map(one, Path(class_map_dir) / f"{name}_classmap.png")))
    return result


def format_adaptive(result: AdaptiveEvalResult) -> list[str]:
    """Lines people read: histogram and average MACs (both conventions)."""
    total = sum(result.histogram) or 1
    hist = ", ".join(f"route {k}: {n} ({n / total:.0%})" for k, n in enumerate(result.histogram))
    lines = [f"route histogram: {hist}"]
    if result.costs is not None:
        fr = ", ".join(f"{f:.1%}" for f in result.costs.fractions())
        lines.append(f"route MACs incl. classifier (of dense, per patch): {fr}")
    lines.append(
        f"average MACs: {result.macs_fraction:.1%} of the dense net on the same patches (classifier included), "
        f"{result.macs_fraction_whole_image:.1%} of the dense net on whole images"
    )
    return lines


def adaptive_cost_summary(model: nn.Module, result: AdaptiveEvalResult) -> dict[str, Any]:
    """``count_cost``-style totals for a 1280x720 output with the *average* route mix of ``result``.

    MACs = the pooled fraction (pipeline MACs over dense MACs on the same patches, classifier
    included) times the dense 720p MACs; params and packed bytes are the full route's (every route
    is a prefix of each rank-sorted group, so storing the full route stores them all) plus the
    classifier's.
    """
    k = num_routes(model)
    report = count_cost(getattr(model, "module", model))
    summary: dict[str, Any] = dict(report.summary(k - 1))
    dense = float(report.dense_macs)
    fraction = result.macs_fraction
    costs = result.costs
    prunable = math.nan
    if costs is not None and costs.prunable_dense_macs and sum(result.histogram):
        mix = sum(n * m for n, m in zip(result.histogram, costs.prunable_macs, strict=True))
        prunable = mix / (sum(result.histogram) * costs.prunable_dense_macs)
    summary.update(
        {
            "full_route_macs_g": summary["macs_g"],
            "macs": fraction * dense,
            "macs_g": fraction * dense / 1e9,
            "macs_fraction": fraction,
            "macs_fraction_whole_image": result.macs_fraction_whole_image,
            "prunable_macs_fraction": prunable,
            "route_histogram": result.histogram,
        }
    )
    return summary


def _run_folder(path: Path | None) -> Path:
    if path is None:
        return Path("outputs")
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def adaptive_eval_payload(
    ckpt: Any,
    model: nn.Module,
    recipe: Recipe,
    dataset: Iterable[dict[str, object]],
    crop: int,
    class_map_dir: Path | None = None,
    engine: nn.Module | None = None,
) -> dict[str, Any]:
    """What ``nmrestore eval`` prints for a ClassPruning checkpoint (JSON-able)."""
    config = recipe.sparsity
    assert isinstance(config, ClassPruningConfig)
    maps = Path(class_map_dir) if class_map_dir is not None else _run_folder(ckpt.path) / "class_maps"
    pipeline = AdaptivePipeline(model, config.patch_size, config.stride, engine=engine)
    result = evaluate_adaptive(pipeline, dataset, crop, recipe.eval.test_y_channel, maps)
    per_image = [
        f"{row['name']}: routes {'/'.join(str(n) for n in row['route_histogram'])}, "
        f"{row['macs_fraction']:.1%} MACs ({row['macs_fraction_whole_image']:.1%} vs whole image)"
        for row in result.per_image
    ]
    return {
        "checkpoint": str(ckpt.path),
        "model": recipe.model.name,
        "scale": recipe.model.scale,
        "method": "classpruning",
        **result.to_dict(),
        "cost": adaptive_cost_summary(model, result),
        "layers": [{"name": name, "routes": ns} for name, ns in layer_route_ns(model).items()],
        "cost_shift": float(route_classifier(model).cost_shift),
        "extra_lines": [*format_adaptive(result), *per_image, f"class maps written to {maps}"],
    }


@torch.no_grad()
def infer_adaptive(
    model: nn.Module,
    recipe: Recipe,
    images: Sequence[tuple[Path, np.ndarray]],
    out: Path,
    patch_size: int | None = None,
    stride: int | None = None,
    engine: nn.Module | None = None,
) -> list[Path]:
    """``nmrestore infer --adaptive``: output and class map per image; returns the written paths."""
    config = recipe.sparsity
    if not isinstance(config, ClassPruningConfig):
        method = "dense" if config is None else config.method
        raise SparsityError(
            f"--adaptive needs a ClassPruning checkpoint (method classpruning), not {method!r}"
        )
    pipeline = AdaptivePipeline(model, patch_size or config.patch_size, stride or config.stride, engine=engine)
    # The route classifier's first conv (4x4, stride 4) needs that many pixels: refuse smaller
    # images and patches up front instead of a conv traceback.
    convs = [m for m in route_classifier(model).modules() if isinstance(m, nn.Conv2d)]
    need = max((max(m.kernel_size) for m in convs), default=1)
    if pipeline.patch_size < need:
        raise SparsityError(
            f"--patch {pipeline.patch_size} is too small: the route classifier needs at least {need}"
        )
    for path, image in images:
        if min(image.shape[:2]) < need:
            raise ImageError(
                f"{path}: {image.shape[1]}x{image.shape[0]} px is too small for --adaptive "
                f"(the route classifier needs at least {need}x{need})"
            )
    written: list[Path] = []
    for path, image in images:
        result = pipeline(to_tensor(image).unsqueeze(0))
        written.append(write_image(Path(out) / f"{path.stem}.png", result.output.clamp(0, 1)[0]))
        written.append(save_class_map(result, Path(out) / f"{path.stem}_classmap.png"))
    return written


def adaptive_report_row(
    model: nn.Module,
    dataset: Iterable[dict[str, object]],
    crop: int,
    dense_macs: float,
    class_map_dir: Path | None = None,
    test_y_channel: bool = True,
) -> tuple[dict[str, Any], AdaptiveEvalResult]:
    """A report/benchmark row for a ClassPruning model (average MACs, histogram, routes)."""
    result = evaluate_adaptive(AdaptivePipeline(model), dataset, crop, test_y_channel, class_map_dir)
    cost = adaptive_cost_summary(model, result)
    ns = list(layer_route_ns(model).values())
    uniform = all(n == ns[0] for n in ns)
    m = next(mask.m for _, _, mask in nm_layers(model))
    routes = "/".join(str(n) for n in ns[0]) + f":{m}" if uniform else "per-layer (SLS)"
    row = {
        "method": "classpruning",
        "budget": "adaptive",
        "psnr": result.psnr,
        "ssim": result.ssim,
        "macs_g": cost["macs"] / 1e9,
        "macs_fraction": cost["macs"] / dense_macs,
        "macs_fraction_whole_image": result.macs_fraction_whole_image,
        "prunable_macs_fraction": cost["prunable_macs_fraction"],
        "params": cost["params"],
        "params_nonzero": cost["params_nonzero"],
        "packed_bytes": cost["packed_bytes"],
        "routes": routes,
        "route_histogram": result.histogram,
        "per_image": result.per_image,
    }
    return row, result


def _pipeline_settings(model: nn.Module) -> tuple[int, int, str]:
    """Patch size, stride and blend: the model's recipe values when it carries them, else 32/28/ramp."""
    settings = getattr(getattr(model, "module", model), "nm_adaptive_settings", None)
    if isinstance(settings, tuple) and len(settings) == 3:
        return int(settings[0]), int(settings[1]), str(settings[2])
    return DEFAULT_PATCH, DEFAULT_STRIDE, "ramp"


# =============================================================================== data
def grid_patch_pairs(
    gt: ImageList,
    lq: ImageList | None,
    scale: int,
    patch: int,
    stride: int,
    degradation: Degradation | None = None,
) -> tuple[Tensor, Tensor]:
    """Aligned LR/HR patches on a ``stride`` grid over every image: (P, C, p, p), (P, C, sp, sp).

    Without ``lq`` the inputs are bicubic LR, or (deblurring/denoising) the whole image under
    ``degradation`` with its fixed evaluation seed, as the evaluation sets make them.
    """
    lqs, gts = [], []
    for i, (name, hr) in enumerate(gt):
        if lq is None and degradation is not None:
            hr_t = to_tensor(hr)
            lr_t = degrade_image(hr, degradation, np.random.default_rng(image_seed(EVAL_SEED, name)))
        else:
            lr = lq[i][1] if lq is not None else make_lr(hr, scale)
            hr_t, lr_t = (
                to_tensor(np.ascontiguousarray(hr[: lr.shape[0] * scale, : lr.shape[1] * scale])),
                to_tensor(lr),
            )
        lh, lw = lr_t.shape[-2:]
        if lh < patch or lw < patch:
            continue
        for t, s in grid_positions(lh, lw, patch, stride):
            lqs.append(lr_t[:, t : t + patch, s : s + patch])
            gts.append(hr_t[:, t * scale : (t + patch) * scale, s * scale : (s + patch) * scale])
    if not lqs:
        raise SparsityError(f"no image is large enough for a {patch}-pixel LR patch")
    return torch.stack(lqs), torch.stack(gts)


def grid_patch_sources(gt: ImageList, scale: int, patch: int, stride: int, lq: ImageList | None = None) -> Tensor:
    """Index of the image each patch of :func:`grid_patch_pairs` (same arguments) comes from: (P,)."""
    sources: list[int] = []
    for i, (_, hr) in enumerate(gt):
        if lq is not None:
            lh, lw = lq[i][1].shape[:2]
        elif scale == 1:
            lh, lw = hr.shape[:2]
        else:
            lh, lw = hr.shape[0] // scale, hr.shape[1] // scale
        if lh >= patch and lw >= patch:
            sources += [i] * len(grid_positions(lh, lw, patch, stride))
    return torch.tensor(sources, dtype=torch.int64)


def per_image_weights(psnrs: Tensor, sources: Tensor) -> Tensor:
    """``1 / MSE`` of each patch's image on the full route (the mean of its patches' MSEs): (P,).

    Weighting a patch's error by it makes a sum of errors the first-order loss of the *mean
    per-image* PSNR, the SR protocol's score, in which an error on an easy image costs more dB.
    """
    mse = torch.pow(10.0, -psnrs[:, -1].double().clamp(max=PSNR_CAP) / 10)
    count = torch.bincount(sources).clamp(min=1).double()
    image_mse = torch.bincount(sources, weights=mse) / count
    return 1.0 / image_mse[sources].clamp(min=1e-12)


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


# =============================================================================== labels
@torch.no_grad()
def route_psnrs(
    model: nn.Module, lq: Tensor, gt: Tensor, crop_border: int, test_y_channel: bool, batch_size: int = 64
) -> Tensor:
    """PSNR (P, K) of every patch on every route (eval mode, batched)."""
    k = num_routes(model)
    was_training = model.training
    model.eval()
    device = _model_device(model)
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
        if config.budget_weights == "image":
            if sources is None:
                raise SparsityError("budget_weights: image needs each patch's image index")
            weights = per_image_weights(psnrs, sources)
        return budget_labels(psnrs, costs, config.target_macs_fraction, weights)
    return delta_labels(psnrs, config.delta)


# =============================================================================== stage tasks
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


# =============================================================================== calibration
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
    device = _model_device(model)
    try:
        return torch.cat([clf(c.to(device)).cpu() for c in patches.split(batch_size)])
    finally:
        clf.train(was_training)


# =============================================================================== stages
@dataclass
class _Context:
    recipe: Recipe
    config: ClassPruningConfig
    run_dir: Path
    dist: DistInfo
    show_progress: bool
    meta: dict[str, Any]
    train_gt: ImageList
    train_lq: ImageList | None
    held_gt: ImageList
    held_lq: ImageList | None

    @property
    def scale(self) -> int:
        return self.recipe.model.scale

    @property
    def crop(self) -> int:
        ev = self.recipe.eval
        return ev.crop_border if ev.crop_border is not None else self.scale

    @property
    def degradation(self) -> Degradation | None:
        """Deblurring/denoising without paired inputs: the degradation made on the fly (None: SR or pairs)."""
        return self.recipe.task.degradation() if self.train_lq is None else None


def _stage_last(stage_dir: Path) -> Path:
    return stage_dir / "checkpoints" / "last.safetensors"


def _check_recipe(path: Path, recipe: Recipe) -> None:
    saved = load_checkpoint(path)
    if saved.meta.get("recipe") != json.loads(json.dumps(recipe.model_dump(mode="json"))):
        raise RecipeError(f"{path} was trained with another recipe; resume with the recipe saved beside it")


def _run_stage(
    name: str,
    ctx: _Context,
    model: nn.Module,
    task: Any,
    loader: Any,
    steps: int,
    lr: float,
    controller: Any = None,
    validate: Any = None,
    dist: DistInfo | None = None,
    schedule: Schedule | None = None,
) -> TrainState:
    """One stage through the Trainer, resuming its own ``last`` checkpoint (skipped when finished)."""
    stage_dir = ctx.run_dir / f"stage_{name}"
    last = _stage_last(stage_dir)
    saved = load_checkpoint(last) if last.exists() else None
    if saved is not None:
        load_model_state(model, saved.model_state, str(last))
        if saved.step >= steps:
            log.info("classpruning: stage %s already finished (%d steps)", name, saved.step)
            return TrainState(step=saved.step)
    update: dict[str, Any] = {"steps": steps, "lr": lr, "init_from": None}
    if schedule is not None:
        update["schedule"] = schedule
    spec = ctx.recipe.train.model_copy(update=update)
    trainer = Trainer(
        model,
        task,
        loader,
        spec,
        stage_dir,
        {**ctx.meta, "stage": name},
        controller=controller,
        validate=validate,
        dist=dist or ctx.dist,
        show_progress=ctx.show_progress,
    )
    if saved is not None:
        trainer.restore(saved)
        log.info("classpruning: resumed stage %s at step %d", name, saved.step)
    return trainer.fit()


def _replicated(dist: DistInfo) -> DistInfo:
    """Every rank computes the whole stage (no DDP); only rank 0 writes."""
    return DistInfo(rank=dist.rank, world_size=1, local_rank=dist.local_rank, device=dist.device)


def _stage_routes(ctx: _Context, model: nn.Module, dense_state: dict[str, Tensor]) -> None:
    """SLS search per route budget; per-layer N nested by a running max; saved to routes.json."""
    config = ctx.config
    budgets = config.route_budgets
    if budgets is None:
        return
    out = ctx.run_dir / "stage_routes" / "routes.json"
    if out.exists():
        per_layer = json.loads(out.read_text())["layers"]
        set_layer_route_ns(model, per_layer)
        return
    from nmrestore.methods.sls import SLSConfig
    from nmrestore.sparsity.api import sparsify_

    names = list(layer_route_ns(model))
    per_route: list[list[int]] = []
    for k, budget in enumerate(budgets):
        if budget >= 1:
            per_route.append([config.m] * len(names))
            continue
        search = base_model(ctx.recipe)
        search.load_state_dict(dense_state)
        steps = config.route_search_steps
        sls = SLSConfig(
            m=config.m,
            budget=budget,
            budget_kind="prunable_macs",
            search_steps=steps,
            refresh_every=max(1, steps // 4),
            anneal_interval=max(1, steps // 20),
            score_lr=0.01,
            dense_first_last=config.dense_first_last,
        )
        report = sparsify_(search, sls)
        search.to(ctx.dist.device)
        loader = _sr_loader(ctx, ctx.recipe.data.train.patch_size, offset=100 + k)
        from nmrestore.engine.task import RestorationTask

        _run_stage(
            f"routes/route_{k}",
            ctx,
            search,
            RestorationTask(ctx.recipe.train.loss),
            loader,
            steps,
            ctx.recipe.train.lr,
            controller=report.controller,
            dist=_replicated(ctx.dist),
        )
        found = layer_route_ns(search)
        per_route.append([found[n][0] for n in names])
    nested = nested_route_ns(per_route)
    per_layer = {n: [nested[k][i] for k in range(len(budgets))] for i, n in enumerate(names)}
    set_layer_route_ns(model, per_layer)
    if ctx.dist.is_main:
        atomic_write_text(out, json.dumps({"budgets": list(budgets), "layers": per_layer}, indent=2))


def _sr_loader(ctx: _Context, patch_size: int, offset: int) -> Any:
    spec = ctx.recipe.data.train
    dataset: SRTrainDataset | DegradedTrainDataset
    if ctx.degradation is not None:
        dataset = DegradedTrainDataset(
            ctx.train_gt,
            ctx.degradation,
            patch_size,
            spec.samples_per_epoch,
            ctx.recipe.seed + offset,
            augment=spec.augment,
        )
    else:
        dataset = SRTrainDataset(
            ctx.train_gt,
            ctx.scale,
            patch_size,
            spec.samples_per_epoch,
            ctx.recipe.seed + offset,
            lr_images=ctx.train_lq,
            augment=spec.augment,
        )
    return build_train_loader(
        dataset,
        max(1, spec.batch_size // ctx.dist.world_size),
        spec.num_workers,
        ctx.recipe.seed + offset,
        distributed=ctx.dist.distributed,
    )


def _held_set(ctx: _Context) -> SREvalDataset | DegradedEvalDataset | None:
    if not ctx.held_gt:
        return None
    if ctx.degradation is not None:
        return DegradedEvalDataset(ctx.held_gt, ctx.degradation)
    return SREvalDataset(ctx.held_gt, ctx.scale, lr_images=ctx.held_lq)


def _label_patches(ctx: _Context, model: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """LR patches, route PSNRs and labels for stage B (PSNRs cached in stage_b/labels.json)."""
    cfg = ctx.config
    lq, gt = grid_patch_pairs(
        ctx.train_gt, ctx.train_lq, ctx.scale, cfg.patch_size, cfg.label_stride, ctx.degradation
    )
    cache = ctx.run_dir / "stage_b" / "labels.json"
    if cache.exists():
        psnrs = torch.tensor(json.loads(cache.read_text())["psnr"], dtype=torch.float64)
        if psnrs.shape[0] != lq.shape[0]:
            raise RecipeError(f"{cache} holds {psnrs.shape[0]} patches, the data gives {lq.shape[0]}")
    else:
        psnrs = route_psnrs(model, lq, gt, ctx.crop, ctx.recipe.eval.test_y_channel)
        if ctx.dist.is_main:
            atomic_write_text(cache, json.dumps({"psnr": psnrs.tolist()}))
    sources = grid_patch_sources(ctx.train_gt, ctx.scale, cfg.patch_size, cfg.label_stride, ctx.train_lq)
    labels = make_labels(psnrs, cfg, route_classifier(model).route_cost.tolist(), sources)
    return lq, psnrs, labels


def _calibration_patches(ctx: _Context) -> Tensor:
    cfg = ctx.config
    if ctx.held_gt:
        lq, _ = grid_patch_pairs(ctx.held_gt, ctx.held_lq, ctx.scale, cfg.patch_size, cfg.stride, ctx.degradation)
    else:
        lq, _ = grid_patch_pairs(
            ctx.train_gt, ctx.train_lq, ctx.scale, cfg.patch_size, cfg.stride, ctx.degradation
        )
    return lq


def train_adaptive(
    recipe: Recipe, run_dir: str | Path, resume: bool = False, show_progress: bool = True
) -> RunResult:
    """Run ClassPruning's stages for ``recipe`` into ``run_dir`` (resumable stage by stage)."""
    run_dir = Path(run_dir)
    with distributed_run(recipe.train.device) as dist:
        return _train_adaptive(recipe, run_dir, resume, show_progress, dist)


def has_progress(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds any stage or final checkpoint (a run to ``resume``)."""
    run = Path(run_dir)
    return (run / "checkpoints" / "last.safetensors").exists() or any(run.glob("stage_*/**/last.safetensors"))


def _train_adaptive(
    recipe: Recipe, run_dir: Path, resume: bool, show_progress: bool, dist: DistInfo
) -> RunResult:
    config = recipe.sparsity
    if not isinstance(config, ClassPruningConfig):
        raise RecipeError("train_adaptive needs a recipe with sparsity.method: classpruning")
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    seed_everything(recipe.seed + dist.rank)
    started = has_progress(run_dir)
    if started and not resume:
        raise RecipeError(
            f"{run_dir} already holds a run; pass --resume to continue it or choose another folder"
        )
    for path in sorted(run_dir.glob("stage_*/**/last.safetensors")):
        _check_recipe(path, recipe)

    model = base_model(recipe)
    if recipe.train.init_from is not None and not started:
        load_weights_from(model, recipe, recipe.train.init_from)
    dense_state = copy.deepcopy(model.state_dict())
    report = apply_sparsity(model, recipe)
    assert report is not None
    model.to(dist.device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "recipe.yaml", recipe.to_yaml())
        atomic_write_text(run_dir / "sparsity.txt", report.table() + "\n")

    gt, lq = _images(recipe.data.train, recipe.model.scale, "train")
    (train_gt, train_lq), (held_gt, held_lq) = split_holdout(
        gt,
        lq,
        recipe.model.scale,
        config.holdout_fraction,
        max(config.patch_size, recipe.data.train.patch_size),
    )
    meta: dict[str, Any] = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "sparsity": config.model_dump(mode="json"),
    }
    ctx = _Context(recipe, config, run_dir, dist, show_progress, meta, train_gt, train_lq, held_gt, held_lq)
    held = _held_set(ctx)
    started_at = time.perf_counter()

    # -- routes (SLS per budget) ---------------------------------------------------------------
    _stage_routes(ctx, model, dense_state)
    if config.route_budgets is not None:
        update_route_costs(model, config.patch_size)
    pipeline = AdaptivePipeline(model, config.patch_size, config.stride)  # caches MAC counts
    costs = pipeline.costs((config.patch_size, config.patch_size))
    log.info("classpruning: route MACs (of dense, classifier included): %s", costs.fractions())

    # -- stage A: sandwich rule -----------------------------------------------------------------
    def validate_full(m: nn.Module) -> EvalResult:
        assert held is not None
        return evaluate_model(m, held, ctx.crop, recipe.eval.test_y_channel, dist.device, with_ssim=True)

    state_a = _run_stage(
        "a",
        ctx,
        model,
        SandwichTask(config.num_routes, recipe.train.loss, config.distill_weight, config.small_route_weight),
        _sr_loader(ctx, recipe.data.train.patch_size, offset=0),
        recipe.train.steps,
        recipe.train.lr,
        controller=report.controller,
        validate=validate_full if held is not None else None,
        schedule=recipe.train.schedule,
    )
    barrier(dist)

    # -- stage B: labels + classifier --------------------------------------------------------------
    summary: dict[str, Any] = {"route_costs": costs.to_dict()}
    classifier = route_classifier(model)
    if config.classifier_steps:
        patches, psnrs, labels = _label_patches(ctx, model)
        counts = torch.bincount(labels, minlength=config.num_routes).tolist()
        summary["labels"] = {
            "patches": len(labels),
            "histogram": counts,
            "rule": config.labels,
            "mean_psnr_per_route": psnrs.clamp(max=100).mean(0).tolist(),
        }
        log.info("classpruning: label histogram %s", counts)
        own = {id(p) for p in classifier.parameters()}
        flags = {p: p.requires_grad for p in model.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in own)
        try:
            dataset = PatchLabelDataset(patches, labels, recipe.seed + 1, min_length=config.classifier_batch)
            loader = build_train_loader(
                dataset, config.classifier_batch, 0, recipe.seed + 1, distributed=False
            )
            _run_stage(
                "b",
                ctx,
                model,
                ClassifierTask(),
                loader,
                config.classifier_steps,
                config.classifier_lr,
                dist=_replicated(dist),
                schedule=Schedule(kind="cosine"),
            )
        finally:
            for p, flag in flags.items():
                p.requires_grad_(flag)
        with torch.no_grad():
            predicted = classifier_logits(model, patches).argmax(1)
        summary["labels"]["train_accuracy"] = float((predicted == labels).double().mean())
    barrier(dist)

    # -- stage C: joint soft routing --------------------------------------------------------------
    def validate_adaptive(m: nn.Module) -> EvalResult:
        assert held is not None
        return evaluate_adaptive(pipeline, held, ctx.crop, recipe.eval.test_y_channel)

    state_c = state_a
    if config.joint_steps:
        task = JointTask(config, costs.fractions(), recipe.train.loss)
        state_c = _run_stage(
            "c",
            ctx,
            model,
            task,
            _sr_loader(ctx, config.patch_size, offset=2),
            config.joint_steps,
            config.joint_lr,
            validate=validate_adaptive if held is not None else None,
            dist=_replicated(dist),
            schedule=Schedule(kind="cosine"),
        )
    barrier(dist)

    # -- calibration + final model -----------------------------------------------------------------
    if config.calibrate:
        logits = classifier_logits(model, _calibration_patches(ctx))
        tau, reached = calibrate_shift(logits, classifier.route_cost, config.target_macs_fraction)
        classifier.cost_shift.fill_(tau)
        summary["calibration"] = {
            "shift": tau,
            "macs_fraction": reached,
            "patches": int(logits.shape[0]),
            "on": "held-out strips" if held is not None else "training patches",
        }
        log.info("classpruning: cost shift %.4g gives %.1f%% MACs on calibration patches", tau, 100 * reached)
    if held is not None:
        held_eval = evaluate_adaptive(pipeline, held, ctx.crop, recipe.eval.test_y_channel)
        summary["heldout"] = {
            "psnr": held_eval.psnr,
            "macs_fraction": held_eval.macs_fraction,
            "route_histogram": held_eval.histogram,
        }

    final: AdaptiveEvalResult | None = None
    total_steps = recipe.train.steps + config.classifier_steps + config.joint_steps
    if dist.is_main:
        val_set = build_val_dataset(recipe)
        final = evaluate_adaptive(pipeline, val_set, ctx.crop, recipe.eval.test_y_channel)
        metrics = {
            "val_psnr": final.psnr,
            "val_ssim": final.ssim,
            "val_macs_fraction": final.macs_fraction,
            "val_route_histogram": final.histogram,
        }
        final_meta = {**meta, "step": total_steps, "metrics": metrics, "adaptive": summary, "stage": "final"}
        for name in ("last", "best"):
            save_checkpoint(
                run_dir / "checkpoints" / f"{name}.safetensors", model, final_meta, with_rng=False
            )
        record = {
            "step": total_steps,
            "val_psnr": final.psnr,
            "val_ssim": final.ssim,
            "val_macs_fraction": final.macs_fraction,
            "val_macs_fraction_whole_image": final.macs_fraction_whole_image,
            "val_route_histogram": final.histogram,
            "elapsed_s": time.perf_counter() - started_at,
            **summary,
        }
        atomic_write_text(run_dir / "final.json", json.dumps(record, indent=2))
    barrier(dist)
    state = TrainState(step=total_steps, history=state_a.history + state_c.history)
    return RunResult(run_dir, model, state, report, report.controller, final)


__all__ = [
    "AdaptiveEvalResult",
    "AdaptivePipeline",
    "AdaptiveResult",
    "ClassifierTask",
    "JointTask",
    "PatchLabelDataset",
    "SandwichTask",
    "calibrate_shift",
    "class_map",
    "evaluate_adaptive",
    "extract_patches",
    "format_adaptive",
    "grid_patch_pairs",
    "grid_patch_sources",
    "grid_positions",
    "has_progress",
    "make_labels",
    "oracle_routes",
    "patch_starts",
    "patchwise_restore",
    "per_image_weights",
    "route_colors",
    "route_psnrs",
    "save_class_map",
    "split_holdout",
    "stitch_patches",
    "train_adaptive",
]


# =============================================================================== benchmark rows
#: Stage settings for the benchmark harness's ``classpruning`` rows (scaled to ``finetune_steps``).
BENCH_SETTINGS: dict[str, Any] = {
    "method": "classpruning",
    "m": 32,
    "routes": [8, 16, 32],
    "classifier_channels": 64,
    "classifier_convs": 3,
    "patch_size": 32,
    "stride": 28,
    "labels": "budget",
    "budget_weights": "image",
    "label_stride": 16,
    "classifier_steps": 2000,
    "classifier_lr": 3e-3,
    "classifier_batch": 64,
    "joint_lr": 5e-5,
    "class_weight": 0.01,
    "budget_weight": 0.05,
    "budget_loss": "expected_macs",
    "target_macs_fraction": 0.55,
    "holdout_fraction": 0.2,
}


def bench_recipe(context: Any, settings: dict[str, Any] | None = None) -> Recipe:
    """The harness's fine-tune recipe turned into ClassPruning's: stage A + stage C = ``finetune_steps``.

    A third of the SR-weight steps go to the joint stage (at least 1); the classifier gets steps of
    its own (it does not touch the SR weights; ``finetune_steps`` of them in the quick preset).
    """
    steps = int(context.config.finetune_steps)
    joint = max(1, steps // 3)
    quick = {"classifier_steps": steps, "label_stride": 32} if context.config.quick else {}
    sparsity = {**BENCH_SETTINGS, "joint_steps": joint, **quick, **(settings or {})}
    base = context.finetune_recipe("classpruning", sparsity)
    a_steps = max(1, steps - int(sparsity["joint_steps"]))
    train = base.train.model_copy(
        update={"steps": a_steps, "val_every": a_steps, "ckpt_every": max(1, a_steps // 4)}
    )
    data = base.model_dump(mode="json")
    data["train"] = train.model_dump(mode="json")
    from nmrestore.recipes.schema import recipe_from_dict

    return recipe_from_dict(data, "benchmark recipe classpruning")


def measure_stage_steps(
    model: nn.Module, dense: nn.Module, batch: dict[str, Tensor], config: ClassPruningConfig, rounds: int = 5
) -> dict[str, float]:
    """Median seconds of one dense step, one stage-A step and one stage-C step, interleaved."""
    import statistics

    models = {
        "dense": copy.deepcopy(dense).train(),
        "a": copy.deepcopy(model).train(),
        "c": copy.deepcopy(model).train(),
    }
    tasks: dict[str, Any] = {
        "dense": None,
        "a": SandwichTask(config.num_routes, "l1", config.distill_weight, config.small_route_weight),
        "c": JointTask(config, route_classifier(models["c"]).route_cost.tolist()),
    }
    optimizers = {k: torch.optim.Adam(m.parameters(), lr=1e-7) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    keys = list(models)
    for r in range(rounds + 1):
        for key in keys[r % 3 :] + keys[: r % 3]:
            started = time.perf_counter()
            task = tasks[key]
            if task is None:
                losses = {"l1": F.l1_loss(models[key](batch["lq"]), batch["gt"])}
            else:
                losses = task.losses(models[key], batch)
            optimizers[key].zero_grad(set_to_none=True)
            sum(losses.values()).backward()  # type: ignore[union-attr]
            optimizers[key].step()
            if r:
                times[key].append(time.perf_counter() - started)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_rows(context: Any, budget: str | None, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """The harness row of ClassPruning (method ``classpruning``), with ``routes`` and ``route_histogram``.

    MAC columns are the average over all patches of the test images (ClassSR's convention, the
    classifier included); ``macs_fraction_whole_image`` is against the dense net on whole images.
    ``step_time_ratio`` is the mean cost of one SR-weight step (stage A and C mixed as trained)
    over a dense step, measured interleaved in this process.
    """
    recipe = bench_recipe(context, settings)
    config = recipe.sparsity
    assert isinstance(config, ClassPruningConfig)
    run_dir = Path(context.work_dir) / "classpruning"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    context.say(
        f"ClassPruning: stage A {recipe.train.steps} + classifier {config.classifier_steps} + joint "
        f"{config.joint_steps} steps"
    )
    from nmrestore.engine.runner import train as run_train

    result = run_train(recipe, run_dir, show_progress=context.config.show_progress)
    model = result.model.eval()
    adaptive_row, _ = adaptive_report_row(
        model,
        context.eval_set,
        context.crop,
        float(context.dense_cost.dense_macs),
        run_dir / "class_maps",
        test_y_channel=context.y_channel,
    )
    row = context.row("classpruning", "adaptive", model, result.final, timed=False)
    row.update({k: v for k, v in adaptive_row.items() if k not in ("method", "budget")})
    row.update(per_image=None, tiles=None)  # result.final scored the validation strips, not the test photos
    patch = (config.patch_size, config.patch_size)
    degradation = recipe.task.degradation()
    data: SRTrainDataset | DegradedTrainDataset = (
        DegradedTrainDataset(
            load_train_images(recipe), degradation, config.patch_size, recipe.data.train.batch_size, recipe.seed
        )
        if degradation is not None
        else SRTrainDataset(
            load_train_images(recipe),
            recipe.model.scale,
            config.patch_size,
            recipe.data.train.batch_size,
            recipe.seed,
        )
    )
    samples = [data[i] for i in range(recipe.data.train.batch_size)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("lq", "gt")}  # type: ignore[misc]
    t = measure_stage_steps(model, context.dense_model, batch, config, rounds=context.config.timing_rounds)
    a_steps, c_steps = recipe.train.steps, config.joint_steps
    mean_step = (a_steps * t["a"] + c_steps * t["c"]) / (a_steps + c_steps)
    row.update(
        {
            "step_ms": mean_step * 1e3,
            "step_time_ratio": mean_step / t["dense"],
            "stage_a_step_ratio": t["a"] / t["dense"],
            "stage_c_step_ratio": t["c"] / t["dense"],
            "finetune_steps": a_steps + c_steps,
            "note": f"stages A {a_steps} + C {c_steps} SR steps (+{config.classifier_steps} classifier); "
            f"routes {row['routes']}, histogram {'/'.join(str(n) for n in row['route_histogram'])}, "
            f"{row['macs_fraction_whole_image']:.1%} of whole-image dense MACs; patch {patch[0]}/{config.stride}",
        }
    )
    return row


def load_train_images(recipe: Recipe) -> ImageList:
    gt, _ = _images(recipe.data.train, recipe.model.scale, "train")
    return gt


def register_bench_rows(settings: dict[str, Any] | None = None) -> None:
    """Register (or re-register with other ``settings``) :func:`bench_rows` as method ``classpruning``."""
    from functools import partial

    from nmrestore.bench.harness import register_row_producer

    register_row_producer("classpruning", per_budget=False, replace=True)(partial(bench_rows, settings=settings))
