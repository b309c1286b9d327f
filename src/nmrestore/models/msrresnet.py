"""MSRResNet (BasicSR's modified SRResNet: no BN, bilinear skip), with BasicSR's names.

Keys match ``basicsr/archs/srresnet_arch.py``: ``conv_first``, ``body.{i}.conv{1,2}``,
``upconv1`` (and ``upconv2`` at x4), ``conv_hr``, ``conv_last``. It was the AIM 2019/2020
efficient-SR baseline (1.52M params at x4). Inputs are in [0, 1] as in BasicSR.
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.models.common import check_positive_int, check_scale
from nmrestore.models.registry import register_model


def _scaled_kaiming_(modules: list[nn.Conv2d], scale: float = 0.1) -> None:
    """BasicSR's ``default_init_weights``: Kaiming-normal scaled down, zero bias.

    Small initial residual branches keep the deep no-BN network near identity at the start.
    """
    for module in modules:
        nn.init.kaiming_normal_(module.weight)
        module.weight.data.mul_(scale)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResidualBlockNoBN(nn.Module):
    """``x + conv2(relu(conv1(x)))`` (BasicSR's ``ResidualBlockNoBN``, res_scale 1)."""

    def __init__(self, num_feat: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv2 = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.relu = nn.ReLU()
        _scaled_kaiming_([self.conv1, self.conv2])

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(self.relu(self.conv1(x)))


class MSRResNet(nn.Module):
    """Conv, residual body, pixel-shuffle upsampling (two x2 steps at x4), bilinear global skip."""

    arch: ClassVar[str] = "msrresnet"
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __init__(self, scale: int = 2, n_feats: int = 64, n_blocks: int = 16, n_colors: int = 3) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "MSRResNet")
        num_feat = check_positive_int("n_feats", n_feats)
        num_block = check_positive_int("n_blocks", n_blocks)
        n_colors = check_positive_int("n_colors", n_colors)

        self.conv_first = nn.Conv2d(n_colors, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat) for _ in range(num_block)])
        init = [self.conv_first]
        if self.scale == 4:
            self.upconv1 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.upconv2 = nn.Conv2d(num_feat, num_feat * 4, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(2)
            init += [self.upconv1, self.upconv2]
        else:
            self.upconv1 = nn.Conv2d(num_feat, num_feat * self.scale**2, 3, 1, 1)
            self.pixel_shuffle = nn.PixelShuffle(self.scale)
            init.append(self.upconv1)
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, n_colors, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.1)
        _scaled_kaiming_([*init, self.conv_hr, self.conv_last])
        self.nm_dense_layers: tuple[str, ...] = ("conv_first", "conv_last")

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.lrelu(self.pixel_shuffle(self.upconv1(out)))
        if self.scale == 4:
            out = self.lrelu(self.pixel_shuffle(self.upconv2(out)))
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + base


@register_model
def msrresnet(scale: int = 2, n_feats: int = 64, n_blocks: int = 16) -> MSRResNet:
    """BasicSR MSRResNet (``num_feat=64, num_block=16``): 1.52M params at x4."""
    return MSRResNet(scale, n_feats, n_blocks)


@register_model
def msrresnet_small(scale: int = 2, n_feats: int = 32, n_blocks: int = 4) -> MSRResNet:
    """CPU preset: 32 channels, 4 residual blocks."""
    return MSRResNet(scale, n_feats, n_blocks)
