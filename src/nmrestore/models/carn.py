"""CARN (Ahn et al., ECCV 2018), the full model (not CARN-M), with the official module names.

Keys follow ``nmhkahn/CARN`` ``carn/model/carn.py``: ``entry``, ``b{1,2,3}.b{1,2,3}.body.{0,2}``
(residual blocks), ``b{i}.c{j}.body.0`` (1x1 cascade fusion), ``c{1,2,3}.body.0``,
``upsample.up.body.{0,3}``, ``exit``. The official model is *multi-scale*: it carries three
upsamplers (``upsample.up2/up3/up4``) and its 1.59M parameters count all of them; a single-scale
CARN (this class) has 1.11M at x4. :mod:`nmrestore.models.official` keeps the official upsampler
of the model's scale. Inputs are in [0, 1] as in the official code (its mean shift uses range 1).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.models.common import MeanShift, Upsampler, check_positive_int, check_scale, default_conv
from nmrestore.models.registry import register_model


class BasicBlock(nn.Module):
    """Conv + ReLU (CARN's ``ops.BasicBlock``; 1x1 here for the cascade fusions)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(default_conv(in_channels, out_channels, kernel_size), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class CarnResidualBlock(nn.Module):
    """CARN's residual block: ``relu(x + conv(relu(conv(x))))`` (ReLU after the sum, unlike EDSR)."""

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, 3), nn.ReLU(), default_conv(n_feats, n_feats, 3)
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + x)


def _cascade(x: Tensor, units: list[nn.Module], fusions: list[nn.Module]) -> Tensor:
    """The cascading mechanism: each unit's output is concatenated to all earlier ones and fused."""
    concat = out = x
    for unit, fusion in zip(units, fusions, strict=True):
        concat = torch.cat([concat, unit(out)], dim=1)
        out = fusion(concat)
    return out


class CascadingBlock(nn.Module):
    """``n_units`` residual blocks ``b1..bn`` cascaded through 1x1 fusions ``c1..cn``."""

    def __init__(self, n_feats: int, n_units: int) -> None:
        super().__init__()
        self.n_units = n_units
        for i in range(1, n_units + 1):
            self.add_module(f"b{i}", CarnResidualBlock(n_feats))
            self.add_module(f"c{i}", BasicBlock(n_feats * (i + 1), n_feats))

    def forward(self, x: Tensor) -> Tensor:
        units = [self.get_submodule(f"b{i}") for i in range(1, self.n_units + 1)]
        fusions = [self.get_submodule(f"c{i}") for i in range(1, self.n_units + 1)]
        return _cascade(x, units, fusions)


class _UpsampleBody(nn.Module):
    """Holds ``body`` so keys read ``upsample.up.body.*`` like the official single-scale model."""

    def __init__(self, scale: int, n_feats: int) -> None:
        super().__init__()
        self.body = Upsampler(scale, n_feats, act=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class CarnUpsample(nn.Module):
    def __init__(self, scale: int, n_feats: int) -> None:
        super().__init__()
        self.up = _UpsampleBody(scale, n_feats)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(x)


class CARN(nn.Module):
    """Cascading residual network: global cascade of local cascading blocks, sub-pixel tail."""

    arch: ClassVar[str] = "carn"
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __init__(
        self,
        scale: int = 2,
        n_feats: int = 64,
        n_blocks: int = 3,
        n_units: int = 3,
        n_colors: int = 3,
    ) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "CARN")
        n_feats = check_positive_int("n_feats", n_feats)
        self.n_blocks = check_positive_int("n_blocks", n_blocks)
        n_units = check_positive_int("n_units", n_units)
        n_colors = check_positive_int("n_colors", n_colors)
        self.rgb_range: float = 1.0

        self.sub_mean = MeanShift(1.0, sign=-1)
        self.add_mean = MeanShift(1.0, sign=1)
        self.entry = default_conv(n_colors, n_feats, 3)
        for i in range(1, self.n_blocks + 1):
            self.add_module(f"b{i}", CascadingBlock(n_feats, n_units))
            self.add_module(f"c{i}", BasicBlock(n_feats * (i + 1), n_feats))
        self.upsample = CarnUpsample(self.scale, n_feats)
        self.exit = default_conv(n_feats, n_colors, 3)
        self.nm_dense_layers: tuple[str, ...] = ("entry", "exit")

    def forward(self, x: Tensor) -> Tensor:
        x = self.entry(self.sub_mean(x))
        blocks = [self.get_submodule(f"b{i}") for i in range(1, self.n_blocks + 1)]
        fusions = [self.get_submodule(f"c{i}") for i in range(1, self.n_blocks + 1)]
        out = _cascade(x, blocks, fusions)
        return self.add_mean(self.exit(self.upsample(out)))


@register_model
def carn(scale: int = 2, n_feats: int = 64, n_blocks: int = 3, n_units: int = 3) -> CARN:
    """Published CARN: 64 channels, 3 cascading blocks of 3 residual blocks (1.11M params at x4)."""
    return CARN(scale, n_feats, n_blocks, n_units)


@register_model
def carn_small(scale: int = 2, n_feats: int = 32, n_blocks: int = 2, n_units: int = 2) -> CARN:
    """CPU preset: 32 channels, 2 cascading blocks of 2 residual blocks."""
    return CARN(scale, n_feats, n_blocks, n_units)
