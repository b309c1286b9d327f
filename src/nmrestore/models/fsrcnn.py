"""FSRCNN (Dong et al., ECCV 2016): d=56, s=12, m=4, a 9x9 transposed conv with stride=scale.

Names follow the common PyTorch port (``yjn870/FSRCNN-pytorch``): ``first_part.{0: conv, 1: PReLU}``,
``mid_part.*`` (shrink 1x1, m mapping 3x3, expand 1x1, each followed by a PReLU), ``last_part``
(``nn.ConvTranspose2d``). The paper works on the Y channel and counts 12,464 weights (biases and
PReLU slopes excluded): that is ``fsrcnn(n_colors=1)``. The RGB default here has ~24.7K parameters,
because the first conv and the deconv see three channels.
"""

from __future__ import annotations

import math
from typing import ClassVar

from torch import Tensor, nn

from nmrestore.errors import NMRestoreError
from nmrestore.models.common import check_positive_int, check_scale
from nmrestore.models.registry import register_model


class FSRCNN(nn.Module):
    """Feature extraction, shrinking, m mapping layers, expanding, transposed-conv upsampling."""

    arch: ClassVar[str] = "fsrcnn"
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __init__(self, scale: int = 2, d: int = 56, s: int = 12, m: int = 4, n_colors: int = 3) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "FSRCNN")
        d = check_positive_int("d", d)
        s = check_positive_int("s", s)
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise NMRestoreError(f"m (mapping layers) must be a non-negative integer, got {m!r}")
        n_colors = check_positive_int("n_colors", n_colors)

        self.first_part = nn.Sequential(nn.Conv2d(n_colors, d, 5, padding=2), nn.PReLU(d))
        mid: list[nn.Module] = [nn.Conv2d(d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            mid += [nn.Conv2d(s, s, 3, padding=1), nn.PReLU(s)]
        mid += [nn.Conv2d(s, d, 1), nn.PReLU(d)]
        self.mid_part = nn.Sequential(*mid)
        # output = (h - 1) * scale - 2 * 4 + 9 + (scale - 1) = h * scale
        self.last_part = nn.ConvTranspose2d(
            d, n_colors, 9, stride=self.scale, padding=4, output_padding=self.scale - 1
        )
        self._init_weights()
        self.nm_dense_layers: tuple[str, ...] = ("first_part.0", "last_part")

    def _init_weights(self) -> None:
        """He-normal convs and a near-zero deconv, as in the paper's training setup."""
        for module in (*self.first_part, *self.mid_part):
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.weight[0, 0].numel()
                nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.last_part.weight, mean=0.0, std=0.001)
        nn.init.zeros_(self.last_part.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_part(self.mid_part(self.first_part(x)))


@register_model
def fsrcnn(scale: int = 2, d: int = 56, s: int = 12, m: int = 4, n_colors: int = 3) -> FSRCNN:
    """Published FSRCNN (d=56, s=12, m=4); ``n_colors=1`` is the paper's Y-channel model (12.5K weights)."""
    return FSRCNN(scale, d, s, m, n_colors)


@register_model
def fsrcnn_small(scale: int = 2, d: int = 32, s: int = 8, m: int = 2, n_colors: int = 3) -> FSRCNN:
    """CPU preset: d=32, s=8, m=2 (FSRCNN-s uses s=5, m=1; 8 keeps channels a multiple of M=4 or 8)."""
    return FSRCNN(scale, d, s, m, n_colors)
