"""MATLAB-compatible bicubic ``imresize`` in torch, plus ``mod_crop``.

SR benchmarks (Set5, DIV2K...) build their LR inputs with MATLAB's ``imresize(hr, 1/scale,
'bicubic')``; PyTorch's ``F.interpolate(mode='bicubic')`` uses another kernel (a = -0.75), no
antialiasing and another boundary rule, so LR images made with it differ by several grey levels
and every PSNR measured against published numbers shifts. This module reproduces MATLAB:

* Keys' cubic kernel with a = -0.5;
* when downscaling (scale < 1) with ``antialias=True`` the kernel is stretched by 1/scale and
  scaled by ``scale`` (a low-pass filter), so its support is 4/scale input pixels;
* output pixel x (1-based) samples input position ``u = x / scale + 0.5 * (1 - 1 / scale)``;
* out-of-range taps are mirrored *symmetrically* (edge pixel repeated: ..., 2, 1, 1, 2, ...);
* each output pixel's weights are normalised to sum to 1 (before mirroring, as MATLAB does);
* the two axes are resized one after the other, the one with the smaller scale first (MATLAB's
  order; mathematically the result does not depend on it).

Per axis, an index table and a weight table (``out_len x P`` with P = ceil(kernel width) + 2 taps)
are precomputed; the resize is then P ``index_select`` + multiply-add passes over the output, so
the cost is O(output x P) and memory one output-sized buffer (a dense ``out x in`` matrix would
cost O(output x input) - seconds for a 2K image).

Unlike MATLAB, which returns ``ceil(scale * size)`` pixels, the output size with a ``scale`` is
``round(scale * size)`` (half up), the project's convention: it is the same for the usual integer
factors on mod-cropped images, and float error in ``scale * size`` cannot add a pixel (ceil(32.000000001)
is 33).
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch

from nmrestore.errors import ImageError

__all__ = ["cubic_kernel", "imresize", "imresize_uint8", "mod_crop"]

#: Keys' cubic-convolution parameter used by MATLAB's ``'bicubic'``.
CUBIC_A: float = -0.5


def cubic_kernel(x: torch.Tensor, a: float = CUBIC_A) -> torch.Tensor:
    """Keys' cubic convolution kernel (support [-2, 2]); ``a = -0.5`` is MATLAB's bicubic."""
    ax = x.abs()
    ax2 = ax * ax
    ax3 = ax2 * ax
    inner = (a + 2.0) * ax3 - (a + 3.0) * ax2 + 1.0
    outer = a * ax3 - 5.0 * a * ax2 + 8.0 * a * ax - 4.0 * a
    return torch.where(ax <= 1.0, inner, torch.where(ax <= 2.0, outer, torch.zeros_like(ax)))


def _contributions(
    in_len: int, out_len: int, scale: float, antialias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """MATLAB's ``contributions()``: 0-based input indices and weights, both ``(out_len, P)``."""
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)
    if scale < 1.0 and antialias:
        kernel_width = 4.0 / scale
        dist_scale, amp = scale, scale
    else:
        kernel_width = 4.0
        dist_scale, amp = 1.0, 1.0
    left = torch.floor(u - kernel_width / 2.0)
    taps = math.ceil(kernel_width) + 2
    ind = left[:, None] + torch.arange(taps, dtype=torch.float64)[None, :]  # 1-based positions
    weights = amp * cubic_kernel(dist_scale * (u[:, None] - ind))
    weights = weights / weights.sum(dim=1, keepdim=True)
    # Symmetric boundary: MATLAB indexes aux = [1..in_len, in_len..1] cyclically.
    period = 2 * in_len
    m = torch.remainder(ind.to(torch.int64) - 1, period)
    ind0 = torch.where(m < in_len, m, period - 1 - m)
    # Drop taps that carry no weight for any output pixel (MATLAB does too); saves passes.
    keep = (weights != 0).any(dim=0)
    return ind0[:, keep], weights[:, keep]


def _resize_axis(
    x: torch.Tensor, dim: int, in_len: int, out_len: int, scale: float, antialias: bool
) -> torch.Tensor:
    """Resize ``x`` along ``dim`` (-2: rows, -1: columns) with the precomputed tables."""
    ind, weights = _contributions(in_len, out_len, scale, antialias)
    ind = ind.to(x.device)
    weights = weights.to(device=x.device, dtype=x.dtype)
    out: torch.Tensor | None = None
    for k in range(ind.shape[1]):
        wk = weights[:, k] if dim == -1 else weights[:, k, None]
        term = x.index_select(dim, ind[:, k]) * wk
        out = term if out is None else out + term
    assert out is not None  # at least one tap always has weight
    return out


def _output_size(in_len: int, scale: float) -> int:
    return math.floor(in_len * scale + 0.5)


def imresize(
    img: torch.Tensor,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> torch.Tensor:
    """Resize a float image ``(C, H, W)`` or batch ``(N, C, H, W)`` like MATLAB's bicubic ``imresize``.

    Give either ``scale`` (both axes; output ``round(H * scale) x round(W * scale)``) or ``size``
    ``(out_h, out_w)`` (per-axis scale ``out / in``). Values are not clipped (bicubic overshoots);
    the dtype and device are kept. Differentiable.
    """
    if not isinstance(img, torch.Tensor):
        raise ImageError(f"imresize expects a torch tensor, got {type(img).__name__}; see imresize_uint8")
    if img.ndim not in (3, 4):
        raise ImageError(f"imresize expects (C, H, W) or (N, C, H, W), got shape {tuple(img.shape)}")
    if not img.is_floating_point():
        raise ImageError(f"imresize expects a floating tensor, got {img.dtype}; see imresize_uint8")
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale and size")
    in_h, in_w = img.shape[-2:]
    if scale is not None:
        if not scale > 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a positive number, got {scale}")
        out_h, out_w = _output_size(in_h, scale), _output_size(in_w, scale)
        scale_h = scale_w = float(scale)
    else:
        assert size is not None
        out_h, out_w = (int(s) for s in size)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"size must be positive, got {size}")
        scale_h, scale_w = out_h / in_h if in_h else 0.0, out_w / in_w if in_w else 0.0
    if in_h == 0 or in_w == 0 or out_h == 0 or out_w == 0:
        raise ImageError(f"cannot resize a {in_h}x{in_w} image to {out_h}x{out_w}")

    axes = [(-2, in_h, out_h, scale_h), (-1, in_w, out_w, scale_w)]
    axes.sort(key=lambda a: a[3])  # stable: rows first on ties, as MATLAB
    out = img
    for dim, in_len, out_len, s in axes:
        if in_len == out_len and s == 1.0:
            continue  # the cubic kernel at integer offsets is the identity
        out = _resize_axis(out, dim, in_len, out_len, s, antialias)
    return out


def imresize_uint8(
    arr: np.ndarray,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    antialias: bool = True,
) -> np.ndarray:
    """:func:`imresize` for uint8 ``H x W x C`` (or ``H x W``) arrays; rounds half up and clips to 0..255.

    Works in float64 end to end and rounds once at the end (MATLAB rounds the uint8 intermediate
    between the two axes as well, which can differ by one grey level; BasicSR does not).
    """
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        desc = f"{arr.dtype} {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        raise ImageError(f"imresize_uint8 expects a uint8 H x W or H x W x C array, got {desc}")
    x = torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float64)
    x = x[None] if arr.ndim == 2 else x.permute(2, 0, 1)
    y = imresize(x, scale=scale, size=size, antialias=antialias)
    y = torch.floor(y.clamp(0.0, 255.0) + 0.5).to(torch.uint8)
    y = y[0] if arr.ndim == 2 else y.permute(1, 2, 0)
    return np.ascontiguousarray(y.numpy())


_Img = TypeVar("_Img", torch.Tensor, np.ndarray)


def mod_crop(img: _Img, scale: int) -> _Img:
    """Crop bottom/right so H and W are multiples of ``scale`` (HR images must downscale exactly).

    torch: ``(..., H, W)``; numpy: ``H x W`` or ``H x W x C``. Returns a view.
    """
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    if isinstance(img, torch.Tensor):
        if img.ndim < 2:
            raise ImageError(f"mod_crop expects (..., H, W), got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        return img[..., : h - h % scale, : w - w % scale]
    if isinstance(img, np.ndarray):
        if img.ndim not in (2, 3):
            raise ImageError(f"mod_crop expects H x W or H x W x C, got shape {img.shape}")
        h, w = img.shape[:2]
        return img[: h - h % scale, : w - w % scale, ...]
    raise ImageError(f"mod_crop expects a torch tensor or numpy array, got {type(img).__name__}")
