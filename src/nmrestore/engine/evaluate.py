"""Evaluation: the SR protocol (Y-channel PSNR/SSIM with ``scale`` pixels cropped; docs/ARCHITECTURE.md) or,
for deblurring/denoising, RGB PSNR/SSIM without crop; the recipe's ``eval`` section (filled in from its
``task``) gives ``crop_border`` and ``test_y_channel``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from nmrestore.metrics import psnr, ssim
from nmrestore.metrics.imresize import imresize
from nmrestore.metrics.psnr_ssim import tile_psnr


@dataclass
class EvalResult:
    """Per-image and mean PSNR/SSIM."""

    per_image: list[dict[str, Any]] = field(default_factory=list)

    @property
    def psnr(self) -> float:
        values = [float(r["psnr"]) for r in self.per_image]
        return sum(values) / len(values) if values else math.nan

    @property
    def ssim(self) -> float:
        values = [float(r["ssim"]) for r in self.per_image]
        return sum(values) / len(values) if values else math.nan

    def to_dict(self) -> dict[str, object]:
        return {"psnr": self.psnr, "ssim": self.ssim, "per_image": self.per_image}


Restorer = Callable[[Tensor], Tensor]
T = TypeVar("T")


@torch.no_grad()
def evaluate_fn(
    restore: Restorer,
    samples: Iterable[dict[str, object]],
    crop_border: int,
    test_y_channel: bool = True,
    with_ssim: bool = True,
    tile: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Score ``restore(lq) -> output`` (batched (1,C,h,w) float tensors) on whole images.

    ``progress`` shows a bar on stderr while the images are scored.

    With ``tile``, each image's row also holds ``tiles``: the PSNR of every full ``tile x tile`` HR
    tile (the units of the paired bootstrap in :mod:`nmrestore.metrics.paired`).
    """
    result = EvalResult()
    for sample in progress_over(samples, "eval", progress):
        lq = sample["lq"]
        gt = sample["gt"]
        assert isinstance(lq, Tensor) and isinstance(gt, Tensor)
        if lq.dim() == 3:
            lq, gt = lq.unsqueeze(0), gt.unsqueeze(0)
        out = restore(lq).clamp(0, 1)
        out, gt = out[0].cpu(), gt[0].cpu()
        row: dict[str, float | str] = {
            "name": str(sample["name"][0] if isinstance(sample["name"], list | tuple) else sample["name"]),
            "psnr": psnr(out, gt, crop_border=crop_border, test_y_channel=test_y_channel),
        }
        if with_ssim:
            row["ssim"] = ssim(out, gt, crop_border=crop_border, test_y_channel=test_y_channel)
        if tile is not None:
            row["tiles"] = tile_psnr(out, gt, tile, crop_border=crop_border, test_y_channel=test_y_channel)
        result.per_image.append(row)
    return result


def evaluate_model(
    model: nn.Module,
    samples: Iterable[dict[str, object]],
    crop_border: int,
    test_y_channel: bool = True,
    device: torch.device | None = None,
    with_ssim: bool = True,
    tile: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Evaluate ``model`` in eval mode on ``device`` (restoring its train flag afterwards)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return evaluate_fn(
            lambda x: model(x.to(device)), samples, crop_border, test_y_channel, with_ssim, tile, progress
        )
    finally:
        model.train(was_training)


def progress_over(items: Iterable[T], label: str, show: bool) -> Iterable[T]:
    """``items`` with a transient progress bar on stderr when ``show`` (one step per item)."""
    if not show:
        return items
    from rich.console import Console
    from rich.progress import track

    total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    return track(items, description=label, total=total, console=Console(stderr=True), transient=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``; a missing GPU is one clear error."""
    from nmrestore.errors import NMRestoreError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise NMRestoreError("--device cuda: no CUDA device is available here (use cpu or auto)")
    if name not in ("cpu", "cuda"):
        raise NMRestoreError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def bicubic_restorer(scale: int) -> Restorer:
    """The bicubic baseline every SR table starts from (MATLAB-style upscaling)."""
    return lambda lq: imresize(lq, scale=float(scale))
