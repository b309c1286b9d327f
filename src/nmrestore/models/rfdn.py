"""RFDN (Liu et al., ECCVW 2020), the AIM 2020 winner, with the official ``njulj/RFDN`` names.

Keys: ``fea_conv``, ``B{1..4}.{c1_d,c1_r,c2_d,c2_r,c3_d,c3_r,c4,c5}``, ``B{i}.esa.{conv1,conv_f,
conv_max,conv2,conv3,conv3_,conv4}``, ``c.0``, ``LR_conv``, ``upsampler.0``. The released model
(``RFDN_AIM.pth``, nf=50, 4 RFDBs) has 0.433M parameters at x4, which is what ``rfdn`` builds;
the paper's Table "RFDN" row (550K at x4) is a different width/depth setting. The official code
hard-codes the x4 upsampler; here it follows ``scale``. Inputs are in [0, 1] as in the official code.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.errors import NMRestoreError
from nmrestore.models.common import check_positive_int, check_scale, default_conv
from nmrestore.models.registry import register_model

_LRELU_SLOPE = 0.05


class ESA(nn.Module):
    """Enhanced spatial attention: a strided conv and a 7x7/3 max-pool give a cheap large receptive field.

    On feature maps too small for the 7x7 pool (inputs under 15 pixels; the official code fails
    there) the pool window shrinks to the map, so tiny test inputs still run. From 15 pixels up
    the computation is exactly the official one. Inputs need at least 3 pixels for ``conv2``.
    """

    def __init__(self, n_feats: int) -> None:
        super().__init__()
        f = n_feats // 4
        self.conv1 = nn.Conv2d(n_feats, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv_max = nn.Conv2d(f, f, 3, padding=1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv3_ = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, n_feats, 1)
        self.sigmoid = nn.Sigmoid()
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        c1_ = self.conv1(x)
        c1 = self.conv2(c1_)
        kernel = (min(7, c1.shape[-2]), min(7, c1.shape[-1]))
        v_max = F.max_pool2d(c1, kernel_size=kernel, stride=3)
        v_range = self.relu(self.conv_max(v_max))
        c3 = self.relu(self.conv3(v_range))
        c3 = self.conv3_(c3)
        c3 = F.interpolate(c3, (x.size(2), x.size(3)), mode="bilinear", align_corners=False)
        cf = self.conv_f(c1_)
        c4 = self.conv4(c3 + cf)
        return x * self.sigmoid(c4)


class RFDB(nn.Module):
    """Residual feature distillation block: three distill/refine steps, 1x1 fusion, ESA."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        dc = in_channels // 2
        rc = in_channels
        self.c1_d = default_conv(in_channels, dc, 1)
        self.c1_r = default_conv(in_channels, rc, 3)
        self.c2_d = default_conv(rc, dc, 1)
        self.c2_r = default_conv(rc, rc, 3)
        self.c3_d = default_conv(rc, dc, 1)
        self.c3_r = default_conv(rc, rc, 3)
        self.c4 = default_conv(rc, dc, 3)
        self.act = nn.LeakyReLU(_LRELU_SLOPE)
        self.c5 = default_conv(dc * 4, in_channels, 1)
        self.esa = ESA(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        d1 = self.act(self.c1_d(x))
        r1 = self.act(self.c1_r(x) + x)
        d2 = self.act(self.c2_d(r1))
        r2 = self.act(self.c2_r(r1) + r1)
        d3 = self.act(self.c3_d(r2))
        r3 = self.act(self.c3_r(r2) + r2)
        r4 = self.act(self.c4(r3))
        return self.esa(self.c5(torch.cat([d1, d2, d3, r4], dim=1)))


class RFDN(nn.Module):
    """Feature conv, ``n_blocks`` RFDBs fused by a 1x1 conv, long skip, one-conv pixel-shuffle tail."""

    arch: ClassVar[str] = "rfdn"
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)

    def __init__(self, scale: int = 2, n_feats: int = 50, n_blocks: int = 4, n_colors: int = 3) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "RFDN")
        nf = check_positive_int("n_feats", n_feats)
        if nf < 4:
            raise NMRestoreError(f"RFDN needs n_feats >= 4 (ESA works on n_feats // 4 channels), got {nf}")
        self.n_blocks = check_positive_int("n_blocks", n_blocks)
        n_colors = check_positive_int("n_colors", n_colors)

        self.fea_conv = default_conv(n_colors, nf, 3)
        for i in range(1, self.n_blocks + 1):
            self.add_module(f"B{i}", RFDB(nf))
        self.c = nn.Sequential(default_conv(nf * self.n_blocks, nf, 1), nn.LeakyReLU(_LRELU_SLOPE))
        self.LR_conv = default_conv(nf, nf, 3)
        self.upsampler = nn.Sequential(
            default_conv(nf, n_colors * self.scale**2, 3), nn.PixelShuffle(self.scale)
        )
        self.nm_dense_layers: tuple[str, ...] = ("fea_conv", "upsampler.0")

    def forward(self, x: Tensor) -> Tensor:
        fea = self.fea_conv(x)
        outs: list[Tensor] = []
        out = fea
        for i in range(1, self.n_blocks + 1):
            out = getattr(self, f"B{i}")(out)
            outs.append(out)
        lr = self.LR_conv(self.c(torch.cat(outs, dim=1))) + fea
        return self.upsampler(lr)


@register_model
def rfdn(scale: int = 2, n_feats: int = 50, n_blocks: int = 4) -> RFDN:
    """Official RFDN (AIM 2020): ``nf=50``, 4 RFDBs, ESA (0.433M params at x4)."""
    return RFDN(scale, n_feats, n_blocks)


@register_model
def rfdn_small(scale: int = 2, n_feats: int = 32, n_blocks: int = 2) -> RFDN:
    """CPU preset: 32 channels (so ESA keeps 8), 2 RFDBs."""
    return RFDN(scale, n_feats, n_blocks)
