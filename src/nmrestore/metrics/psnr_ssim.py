"""PSNR and SSIM with the conventions image-restoration papers report (BasicSR's protocol).

* Pixels are compared on the 0..255 grid: float images in [0, 1] are quantised the way a saved
  8-bit result would be, ``round(clamp(x, 0, 1) * 255)``, so a number measured during validation
  is the number a reader gets from the PNG files.
* ``test_y_channel=True`` (the SR protocol) measures the BT.601 studio-range luma (see
  :mod:`nmrestore.metrics.color`), unrounded, in float64; ``crop_border`` (= the scale for SR)
  pixels are dropped on every side first because models cannot see beyond the LR border.
* SSIM is Wang et al. (2004): 11x11 Gaussian window, sigma 1.5, K = (0.01, 0.03), L = 255,
  population (co)variances, averaged over the *valid* region only (no padding; the outer 5 pixels
  are never a window centre). This is BasicSR's ``calculate_ssim`` and equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=255)``, which filters with padding but crops ``(win_size - 1) // 2 = 5`` pixels per
  side before averaging. Multi-channel SSIM is the mean over channels.
* Identical images give ``PSNR = inf`` (MSE is 0); callers averaging PSNR over a set should be
  aware that one perfect image makes the mean infinite, which is the honest answer.

Everything is computed in float64 whatever the input dtype.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from nmrestore.errors import ImageError
from nmrestore.metrics.color import rgb_to_y

__all__ = ["PIXEL_MAX", "SSIM_WIN_SIZE", "psnr", "psnr_torch", "ssim", "ssim_torch", "tile_psnr"]

#: Peak value of the 8-bit grid on which every metric is computed.
PIXEL_MAX: float = 255.0
#: Side of the Gaussian SSIM window (11 taps, sigma 1.5, as in Wang et al.).
SSIM_WIN_SIZE: int = 11
SSIM_SIGMA: float = 1.5
SSIM_K: tuple[float, float] = (0.01, 0.03)

ImageLike = torch.Tensor | np.ndarray


def _quantised_batch(img: ImageLike, name: str, single: bool) -> torch.Tensor:
    """Bring an image (batch) to an ``(N, C, H, W)`` float64 tensor on the 0..255 grid."""
    if isinstance(img, np.ndarray):
        if img.dtype != np.uint8:
            raise ImageError(
                f"{name}: numpy images must be uint8 H x W x C (RGB), got dtype {img.dtype}; "
                "pass float images as torch tensors in [0, 1]"
            )
        if img.ndim == 2:
            img = img[:, :, None]
        if img.ndim != 3:
            raise ImageError(f"{name}: numpy images must be H x W x C, got shape {img.shape}")
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].to(torch.float64)
    if not isinstance(img, torch.Tensor):
        raise ImageError(f"{name}: expected a torch tensor or a uint8 numpy array, got {type(img).__name__}")
    x = img.detach()
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or (single and x.shape[0] != 1):
        want = "(C, H, W) or (1, C, H, W)" if single else "(N, C, H, W) or (C, H, W)"
        raise ImageError(f"{name}: expected a tensor of shape {want}, got {tuple(img.shape)}")
    if x.dtype == torch.uint8:
        return x.to(torch.float64)
    if not x.is_floating_point():
        raise ImageError(f"{name}: expected a float tensor in [0, 1] or uint8, got dtype {x.dtype}")
    return torch.round(x.to(torch.float64).clamp(0.0, 1.0) * PIXEL_MAX)


def _prepare_pair(
    img: ImageLike, ref: ImageLike, crop_border: int, test_y_channel: bool, single: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise, crop and (optionally) convert to Y both images; checks they can be compared."""
    if crop_border < 0:
        raise ValueError(f"crop_border must be >= 0, got {crop_border}")
    a = _quantised_batch(img, "img", single)
    b = _quantised_batch(ref, "ref", single).to(a.device)
    if a.shape != b.shape:
        raise ImageError(
            f"image and reference differ in shape: {tuple(a.shape)} vs {tuple(b.shape)} (as N, C, H, W)"
        )
    h, w = a.shape[-2:]
    if crop_border:
        if h <= 2 * crop_border or w <= 2 * crop_border:
            raise ImageError(f"crop_border={crop_border} leaves nothing of a {h}x{w} image")
        a = a[..., crop_border : h - crop_border, crop_border : w - crop_border]
        b = b[..., crop_border : h - crop_border, crop_border : w - crop_border]
    if test_y_channel and a.shape[1] == 3:
        # rgb_to_y reads floats as [0, 1]; the grid values are exact integers, so this is exact.
        a = rgb_to_y(a / PIXEL_MAX)
        b = rgb_to_y(b / PIXEL_MAX)
    return a, b


def _psnr_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    mse = (a - b).square().mean(dim=(1, 2, 3))
    # mse == 0 gives PIXEL_MAX**2 / 0 = inf and log10(inf) = inf: identical images, PSNR = inf.
    return 10.0 * torch.log10(PIXEL_MAX**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    """1-D normalised Gaussian, 11 taps, sigma 1.5 (the 2-D window is its outer product)."""
    r = SSIM_WIN_SIZE // 2
    x = torch.arange(-r, r + 1, dtype=torch.float64, device=device)
    g = torch.exp(-(x**2) / (2.0 * SSIM_SIGMA**2))
    return g / g.sum()


def _ssim_batch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    n, c, h, w = a.shape
    if h < SSIM_WIN_SIZE or w < SSIM_WIN_SIZE:
        raise ImageError(
            f"SSIM needs at least {SSIM_WIN_SIZE}x{SSIM_WIN_SIZE} pixels after cropping, got {h}x{w}"
        )
    g = _gaussian_window(a.device)
    # One separable "valid" convolution over the five maps at once: mu_a, mu_b, E[a²], E[b²], E[ab].
    stack = torch.stack([a, b, a * a, b * b, a * b], dim=2).reshape(n * c * 5, 1, h, w)
    filt = F.conv2d(F.conv2d(stack, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
    mu_a, mu_b, e_aa, e_bb, e_ab = filt.reshape(n, c, 5, *filt.shape[-2:]).unbind(dim=2)
    var_a = e_aa - mu_a * mu_a
    var_b = e_bb - mu_b * mu_b
    cov = e_ab - mu_a * mu_b
    c1 = (SSIM_K[0] * PIXEL_MAX) ** 2
    c2 = (SSIM_K[1] * PIXEL_MAX) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(2).mean(dim=2).mean(dim=1)


def psnr(img: ImageLike, ref: ImageLike, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """PSNR in dB on the 0..255 grid (``inf`` for identical images).

    ``img``/``ref``: float tensors ``(C, H, W)`` or ``(1, C, H, W)`` in [0, 1] (quantised to
    ``round(clamp(x, 0, 1) * 255)``), uint8 tensors, or uint8 numpy ``H x W x C`` RGB arrays.
    SR protocol: ``crop_border=scale, test_y_channel=True``; deblurring/denoising: the defaults.
    """
    a, b = _prepare_pair(img, ref, crop_border, test_y_channel, single=True)
    return float(_psnr_batch(a, b)[0])


def ssim(img: ImageLike, ref: ImageLike, crop_border: int = 0, test_y_channel: bool = False) -> float:
    """SSIM (Wang et al., valid region, mean over channels) on the 0..255 grid; inputs as :func:`psnr`."""
    a, b = _prepare_pair(img, ref, crop_border, test_y_channel, single=True)
    return float(_ssim_batch(a, b)[0])


@torch.no_grad()
def psnr_torch(
    x: torch.Tensor, y: torch.Tensor, crop_border: int = 0, test_y_channel: bool = False
) -> torch.Tensor:
    """Per-image PSNR of a batch ``(N, C, H, W)`` in [0, 1]: a float64 tensor ``(N,)`` on x's device.

    Same quantisation and conventions as :func:`psnr` (so validation numbers match the final
    evaluation); not differentiable, which validation does not need.
    """
    a, b = _prepare_pair(x, y, crop_border, test_y_channel, single=False)
    return _psnr_batch(a, b)


@torch.no_grad()
def ssim_torch(
    x: torch.Tensor, y: torch.Tensor, crop_border: int = 0, test_y_channel: bool = False
) -> torch.Tensor:
    """Per-image SSIM of a batch ``(N, C, H, W)`` in [0, 1]: a float64 tensor ``(N,)``; see :func:`ssim`."""
    a, b = _prepare_pair(x, y, crop_border, test_y_channel, single=False)
    return _ssim_batch(a, b)


@torch.no_grad()
def tile_psnr(
    img: ImageLike, ref: ImageLike, tile: int, crop_border: int = 0, test_y_channel: bool = False
) -> list[float]:
    """PSNR of every full ``tile x tile`` tile (row-major, after the border crop) of one image pair.

    The tiles are the fixed units a paired bootstrap resamples (see :mod:`nmrestore.metrics.paired`):
    many per image, the same for every method. Partial tiles at the right and bottom edges are left
    out. Same quantisation and conventions as :func:`psnr`; an identical tile gives ``inf``.
    """
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    a, b = _prepare_pair(img, ref, crop_border, test_y_channel, single=True)
    h, w = a.shape[-2:]
    rows, cols = h // tile, w // tile
    if rows == 0 or cols == 0:
        raise ImageError(f"a {h}x{w} image (after cropping) holds no full {tile}x{tile} tile")
    sq = (a - b).square()[0, :, : rows * tile, : cols * tile].mean(dim=0)
    mse = sq.reshape(rows, tile, cols, tile).mean(dim=(1, 3))
    return [float(v) for v in (10.0 * torch.log10(PIXEL_MAX**2 / mse)).flatten()]
