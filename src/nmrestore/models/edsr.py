"""EDSR (Lim et al., CVPRW 2017) with EDSR-PyTorch's module names.

Names match ``sanghyun-son/EDSR-PyTorch`` ``model/edsr.py``: ``sub_mean``, ``head.0``,
``body.{i}.body.{0,2}``, ``body.{n_blocks}``, ``tail.0`` (the upsampler), ``tail.1``, ``add_mean``,
so official weights load by name (see :mod:`nmrestore.models.official`).

``rgb_range``: the official checkpoints are trained on inputs in [0, 255]; this library feeds
[0, 1], hence ``rgb_range=1`` here. Conv *weights* do not depend on the range, but biases do:
with every bias divided by 255 the network computes exactly ``f_255(255 * x) / 255`` (convs are
affine, ReLU and PixelShuffle are positively homogeneous, residual sums and ``res_scale`` are
linear), and the mean shift becomes ``rgb_mean * 1``. :func:`~nmrestore.models.official.load_official`
applies that rescaling; ``rgb_range=255`` here reproduces the official convention instead.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from nmrestore.models.common import (
    MeanShift,
    ResBlock,
    Upsampler,
    check_positive_float,
    check_positive_int,
    check_scale,
    default_conv,
)
from nmrestore.models.registry import register_model


class EDSR(nn.Module):
    """EDSR: head conv, ``n_blocks`` residual blocks + conv with a long skip, sub-pixel tail."""

    arch: ClassVar[str] = "edsr"
    supported_scales: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)

    def __init__(
        self,
        scale: int = 2,
        n_feats: int = 64,
        n_blocks: int = 16,
        res_scale: float = 1.0,
        rgb_range: float = 1.0,
        n_colors: int = 3,
    ) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "EDSR")
        n_feats = check_positive_int("n_feats", n_feats)
        n_blocks = check_positive_int("n_blocks", n_blocks)
        n_colors = check_positive_int("n_colors", n_colors)
        self.rgb_range: float = check_positive_float("rgb_range", rgb_range)
        res_scale = check_positive_float("res_scale", res_scale)

        self.sub_mean = MeanShift(self.rgb_range, sign=-1)
        self.head = nn.Sequential(default_conv(n_colors, n_feats, 3))
        body: list[nn.Module] = [ResBlock(n_feats, 3, res_scale) for _ in range(n_blocks)]
        body.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*body)
        # Scale 1 (denoising, deblurring): no upsampler; Identity keeps the last conv at ``tail.1``.
        upsampler: nn.Module = Upsampler(self.scale, n_feats) if self.scale > 1 else nn.Identity()
        self.tail = nn.Sequential(upsampler, default_conv(n_feats, n_colors, 3))
        self.add_mean = MeanShift(self.rgb_range, sign=1)
        self.nm_dense_layers: tuple[str, ...] = ("head.0", "tail.1")

    def forward(self, x: Tensor) -> Tensor:
        x = self.head(self.sub_mean(x))
        res = self.body(x) + x
        return self.add_mean(self.tail(res))


@register_model
def edsr_baseline(
    scale: int = 2, n_feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0, rgb_range: float = 1.0
) -> EDSR:
    """EDSR-baseline: 16 blocks, 64 channels (1.37M / 1.55M / 1.52M params at x2 / x3 / x4)."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range)


@register_model
def edsr(
    scale: int = 2, n_feats: int = 256, n_blocks: int = 32, res_scale: float = 0.1, rgb_range: float = 1.0
) -> EDSR:
    """Full EDSR: 32 blocks, 256 channels, residual scaling 0.1 (40.7M params at x2, 43.1M at x4)."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range)


@register_model
def edsr_small(
    scale: int = 2, n_feats: int = 32, n_blocks: int = 4, res_scale: float = 1.0, rgb_range: float = 1.0
) -> EDSR:
    """CPU preset for tests and demos: 4 blocks, 32 channels."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range)
