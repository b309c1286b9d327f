"""Restoration metrics (PSNR/SSIM with the SR protocol) and MATLAB-compatible bicubic resizing."""

from __future__ import annotations

from nmrestore.metrics.color import rgb_to_y
from nmrestore.metrics.imresize import cubic_kernel, imresize, imresize_uint8, mod_crop
from nmrestore.metrics.psnr_ssim import psnr, psnr_torch, ssim, ssim_torch

__all__ = [
    "cubic_kernel",
    "imresize",
    "imresize_uint8",
    "mod_crop",
    "psnr",
    "psnr_torch",
    "rgb_to_y",
    "ssim",
    "ssim_torch",
]
