"""RGB → Y (luma) conversion used by the super-resolution evaluation protocol.

SR papers report PSNR/SSIM on the Y channel of ITU-R BT.601 YCbCr in *studio range*, the formula
of MATLAB's ``rgb2ycbcr`` (and BasicSR's ``bgr2ycbcr(y_only=True)``)::

    Y = 16 + 65.481 R + 128.553 G + 24.966 B      with R, G, B in [0, 1]

so black maps to 16 and white to 235. The result is *not* rounded (BasicSR does not round it
either); it is computed in float64 so that metrics do not depend on the input's precision.
"""

from __future__ import annotations

from typing import overload

import numpy as np
import torch

from nmrestore.errors import ImageError

#: BT.601 studio-range coefficients for R, G, B in [0, 1] (MATLAB ``rgb2ycbcr``).
Y_COEFFS: tuple[float, float, float] = (65.481, 128.553, 24.966)
#: Offset added to the weighted sum: Y of pure black.
Y_OFFSET: float = 16.0


@overload
def rgb_to_y(img: np.ndarray) -> np.ndarray: ...
@overload
def rgb_to_y(img: torch.Tensor) -> torch.Tensor: ...


def rgb_to_y(img: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """BT.601 studio-range luma of an RGB image, as float64 values in [16, 235].

    * numpy: ``H x W x 3`` (channel last, RGB); ``uint8`` is read on the 0..255 scale, float arrays
      as values in [0, 1]. Returns ``H x W x 1`` float64.
    * torch: ``(..., 3, H, W)`` (channel first, RGB); ``uint8`` is read on the 0..255 scale,
      floating tensors as values in [0, 1]. Returns ``(..., 1, H, W)`` float64 on the same device.

    The channel axis is kept (size 1) so the result drops into the same metric code as RGB.
    """
    if isinstance(img, np.ndarray):
        if img.ndim != 3 or img.shape[-1] != 3:
            raise ImageError(f"rgb_to_y expects an H x W x 3 RGB array, got shape {img.shape}")
        x = img.astype(np.float64)
        if img.dtype == np.uint8:
            x /= 255.0
        elif not np.issubdtype(img.dtype, np.floating):
            raise ImageError(f"rgb_to_y expects uint8 or float pixels, got dtype {img.dtype}")
        y = x @ np.asarray(Y_COEFFS, dtype=np.float64) + Y_OFFSET
        return y[..., None]
    if isinstance(img, torch.Tensor):
        if img.ndim < 3 or img.shape[-3] != 3:
            raise ImageError(f"rgb_to_y expects a (..., 3, H, W) RGB tensor, got shape {tuple(img.shape)}")
        if img.dtype == torch.uint8:
            x = img.to(torch.float64) / 255.0
        elif img.is_floating_point():
            x = img.to(torch.float64)
        else:
            raise ImageError(f"rgb_to_y expects uint8 or floating pixels, got dtype {img.dtype}")
        r, g, b = x.unbind(dim=-3)
        y = Y_COEFFS[0] * r + Y_COEFFS[1] * g + Y_COEFFS[2] * b + Y_OFFSET
        return y.unsqueeze(-3)
    raise ImageError(f"rgb_to_y expects a numpy array or a torch tensor, got {type(img).__name__}")
