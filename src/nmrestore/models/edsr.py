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

from functools import partial
from typing import ClassVar

from nmrestore.models.common import (
    MeanShiftedSR,
    ResBlock,
    check_positive_float,
    check_positive_int,
    check_scale,
)
from nmrestore.models.registry import register_model


class EDSR(MeanShiftedSR):
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
        global_skip: bool = False,
    ) -> None:
        n_feats = check_positive_int("n_feats", n_feats)
        res_scale = check_positive_float("res_scale", res_scale)
        super().__init__(
            check_scale(scale, self.supported_scales, "EDSR"),
            n_feats,
            check_positive_int("n_colors", n_colors),
            check_positive_float("rgb_range", rgb_range),
            partial(ResBlock, n_feats, 3, res_scale),
            check_positive_int("n_blocks", n_blocks),
            global_skip,
        )


@register_model
def edsr_baseline(
    scale: int = 2, n_feats: int = 64, n_blocks: int = 16, res_scale: float = 1.0, rgb_range: float = 1.0,
    global_skip: bool = False,
) -> EDSR:
    """EDSR-baseline: 16 blocks, 64 channels (1.37M / 1.55M / 1.52M params at x2 / x3 / x4)."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range, global_skip=global_skip)


@register_model
def edsr(
    scale: int = 2, n_feats: int = 256, n_blocks: int = 32, res_scale: float = 0.1, rgb_range: float = 1.0,
    global_skip: bool = False,
) -> EDSR:
    """Full EDSR: 32 blocks, 256 channels, residual scaling 0.1 (40.7M params at x2, 43.1M at x4)."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range, global_skip=global_skip)


@register_model
def edsr_small(
    scale: int = 2, n_feats: int = 32, n_blocks: int = 4, res_scale: float = 1.0, rgb_range: float = 1.0,
    global_skip: bool = False,
) -> EDSR:
    """CPU preset for tests and demos: 4 blocks, 32 channels."""
    return EDSR(scale, n_feats, n_blocks, res_scale, rgb_range, global_skip=global_skip)
