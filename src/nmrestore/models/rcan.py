"""RCAN (Zhang et al., ECCV 2018) with the official / EDSR-PyTorch ``rcan.py`` module names.

Keys: ``sub_mean``, ``head.0``, ``body.{g}.body.{b}.body.{0,2}`` (RCAB convs),
``body.{g}.body.{b}.body.3.conv_du.{0,2}`` (channel attention, 1x1 convs),
``body.{g}.body.{n_blocks}`` (group conv), ``body.{n_groups}``, ``tail.0`` (upsampler), ``tail.1``,
``add_mean``. Official weights are trained with ``rgb_range=255``; unlike EDSR, rescaling them
to [0, 1] inputs also touches the attention's last conv, whose output feeds a sigmoid (see
:mod:`nmrestore.models.official`).
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

from torch import Tensor, nn

from nmrestore.models.common import (
    MeanShiftedSR,
    check_positive_float,
    check_positive_int,
    check_scale,
    default_conv,
)
from nmrestore.models.registry import register_model


class CALayer(nn.Module):
    """Channel attention: global average pool -> 1x1 conv down -> ReLU -> 1x1 conv up -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, hidden, 1),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, 1),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x * self.conv_du(self.avg_pool(x))


class RCAB(nn.Module):
    """Residual channel-attention block: ``x + CA(conv(relu(conv(x))))``."""

    def __init__(self, n_feats: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, 3),
            nn.ReLU(),
            default_conv(n_feats, n_feats, 3),
            CALayer(n_feats, reduction),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class ResidualGroup(nn.Module):
    """``n_blocks`` RCABs and a conv, with a short skip connection."""

    def __init__(self, n_feats: int, reduction: int, n_blocks: int) -> None:
        super().__init__()
        blocks: list[nn.Module] = [RCAB(n_feats, reduction) for _ in range(n_blocks)]
        blocks.append(default_conv(n_feats, n_feats, 3))
        self.body = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) + x


class RCAN(MeanShiftedSR):
    """Residual-in-residual network of channel-attention blocks with EDSR's head and tail."""

    arch: ClassVar[str] = "rcan"
    supported_scales: ClassVar[tuple[int, ...]] = (1, 2, 3, 4)

    def __init__(
        self,
        scale: int = 2,
        n_feats: int = 64,
        n_groups: int = 10,
        n_blocks: int = 20,
        reduction: int = 16,
        rgb_range: float = 1.0,
        n_colors: int = 3,
    ) -> None:
        n_feats = check_positive_int("n_feats", n_feats)
        reduction = check_positive_int("reduction", reduction)
        n_blocks = check_positive_int("n_blocks", n_blocks)
        super().__init__(
            check_scale(scale, self.supported_scales, "RCAN"),
            n_feats,
            check_positive_int("n_colors", n_colors),
            check_positive_float("rgb_range", rgb_range),
            partial(ResidualGroup, n_feats, reduction, n_blocks),
            check_positive_int("n_groups", n_groups),
        )


@register_model
def rcan(
    scale: int = 2,
    n_feats: int = 64,
    n_groups: int = 10,
    n_blocks: int = 20,
    reduction: int = 16,
    rgb_range: float = 1.0,
) -> RCAN:
    """Published RCAN: 10 groups x 20 RCABs, 64 channels (15.44M params at x2, 15.59M at x4)."""
    return RCAN(scale, n_feats, n_groups, n_blocks, reduction, rgb_range)


@register_model
def rcan_small(
    scale: int = 2,
    n_feats: int = 32,
    n_groups: int = 2,
    n_blocks: int = 2,
    reduction: int = 8,
    rgb_range: float = 1.0,
) -> RCAN:
    """CPU preset: 2 groups x 2 RCABs, 32 channels; reduction 8 keeps 4 attention channels
    (32 // 16 = 2 would leave no layer whose input width is a multiple of M=4)."""
    return RCAN(scale, n_feats, n_groups, n_blocks, reduction, rgb_range)
