"""ClassPruning models scored through the patch pipeline: what ``eval``, ``infer --adaptive`` and the benchmark rows show."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.data.io import to_tensor, write_image
from nmrestore.engine.evaluate import EvalResult
from nmrestore.errors import ImageError, SparsityError
from nmrestore.methods.classpruning.accounting import PipelineCost, pooled_cost
from nmrestore.methods.classpruning.classifier import RouteCosts, num_routes, route_classifier
from nmrestore.methods.classpruning.classmap import save_class_map
from nmrestore.methods.classpruning.config import ClassPruningConfig
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline
from nmrestore.methods.classpruning.routes import layer_route_ns
from nmrestore.metrics import psnr, ssim
from nmrestore.recipes.schema import Recipe
from nmrestore.sparsity.parametrization import nm_layers


@dataclass
class AdaptiveEvalResult(EvalResult):
    """Per-image PSNR/SSIM plus routes and MACs; MAC totals summed over all images (:class:`PipelineCost`)."""

    histogram: list[int] = field(default_factory=list)
    costs: RouteCosts | None = None
    cost: PipelineCost | None = None
    class_maps: list[str] = field(default_factory=list)
    mode: str = "patches"

    @property
    def macs(self) -> float:
        return self.cost.total if self.cost is not None else 0.0

    @property
    def whole_image_dense_macs(self) -> float:
        return self.cost.whole_image_dense_macs if self.cost is not None else 0.0

    @property
    def macs_fraction(self) -> float:
        """Whole-image MACs: everything computed over the dense network run once on each whole image."""
        return self.cost.fraction if self.cost is not None else math.nan

    @property
    def macs_fraction_per_patch(self) -> float:
        """ClassSR's convention: routes + classifier over the dense network on the same patches."""
        return self.cost.per_patch_fraction if self.cost is not None else math.nan

    def to_dict(self) -> dict[str, object]:
        return {
            **super().to_dict(),
            "mode": self.mode,
            "route_histogram": self.histogram,
            "macs_fraction": self.macs_fraction,
            "macs_fraction_per_patch": self.macs_fraction_per_patch,
            "pipeline_cost": None if self.cost is None else self.cost.to_dict(),
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
    """Score the pipeline on whole images; optionally save a class map per image."""
    result = AdaptiveEvalResult(histogram=[0] * pipeline.num_routes, mode=pipeline.mode)
    parts: list[PipelineCost] = []
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
        parts.append(one.cost)
        result.cost = pooled_cost(parts)
        result.histogram = [a + b for a, b in zip(result.histogram, one.histogram, strict=True)]
        result.costs = one.costs
        if class_map_dir is not None:
            result.class_maps.append(str(save_class_map(one, Path(class_map_dir) / f"{name}_classmap.png")))
    return result


def format_adaptive(result: AdaptiveEvalResult) -> list[str]:
    """Lines people read: whole-image MACs first, then the histogram and ClassSR's per-patch figure."""
    total = sum(result.histogram) or 1
    hist = ", ".join(f"route {k}: {n} ({n / total:.0%})" for k, n in enumerate(result.histogram))
    overlap = result.cost.overlap if result.cost is not None else math.nan
    lines = [
        f"whole-image MACs: {result.macs_fraction:.1%} of the dense net run once on each whole image "
        f"({result.mode} pipeline: routes, overlap x{overlap:.3f}, classifier and blending included)",
        f"route histogram: {hist}",
    ]
    if result.costs is not None:
        fr = ", ".join(f"{f:.1%}" for f in result.costs.fractions())
        lines.append(f"route MACs incl. classifier (of dense, per patch): {fr}")
    lines.append(
        f"per patch (ClassSR's convention, overlap not counted): {result.macs_fraction_per_patch:.1%} of the "
        "dense net on the same patches"
    )
    return lines


def adaptive_cost_summary(model: nn.Module, result: AdaptiveEvalResult) -> dict[str, Any]:
    """``count_cost``-style totals for a 1280x720 output with the *average* route mix of ``result``.

    MACs = the pooled whole-image fraction (everything the pipeline computed over the dense network
    run once on each whole image) times the dense 720p MACs; params and packed bytes are the full
    route's (every route is a prefix of each rank-sorted group, so storing the full route stores them
    all) plus the classifier's.
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
            "macs_fraction_per_patch": result.macs_fraction_per_patch,
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
        f"{row['macs_fraction']:.1%} of whole-image dense MACs ({row['macs_fraction_per_patch']:.1%} per patch)"
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
        "macs_fraction_per_patch": result.macs_fraction_per_patch,
        "prunable_macs_fraction": cost["prunable_macs_fraction"],
        "params": cost["params"],
        "params_nonzero": cost["params_nonzero"],
        "packed_bytes": cost["packed_bytes"],
        "routes": routes,
        "route_histogram": result.histogram,
        "per_image": result.per_image,
    }
    return row, result
