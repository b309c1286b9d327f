"""The patch grid: overlapping LR patches covering an image, stitching with overlap blending, aligned LR/HR patch pairs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from nmrestore.data.datasets import ImageList, make_lr
from nmrestore.data.degradations import Degradation, degrade_image, image_seed
from nmrestore.data.io import to_tensor
from nmrestore.data.restoration import EVAL_SEED
from nmrestore.errors import SparsityError

DEFAULT_PATCH = 32


DEFAULT_STRIDE = 28


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
