"""U-Net (Ronneberger et al., MICCAI 2015) as an image-to-image restorer for deblurring and denoising.

The published shape: per level two 3x3 conv + ReLU, 2x2 max-pool down, 2x2 transposed conv up that
halves the channels, the skip concatenated, two 3x3 conv + ReLU, widths 64-128-256-512-1024 and a
1x1 conv to the output. Two changes every restoration use of it makes: convolutions are 'same'
padded (the output has the input's size, not the 388-of-572 valid crop) and the network predicts a
residual added to its input, so an untrained net starts at the identity rather than at noise.

Any input size works: the input is padded (replicate) up to a multiple of ``2 ** depth`` and the
output cropped back, inside ``forward``. All widths are multiples of 32 so every conv but the first
(3 input channels) is eligible for N:M with M up to 32.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.errors import NMRestoreError
from nmrestore.models.common import check_positive_int, check_scale, default_conv
from nmrestore.models.registry import register_model


def pad_to_multiple(x: Tensor, factor_h: int, factor_w: int) -> tuple[Tensor, int, int]:
    """Pad ``x`` (N, C, H, W) at the bottom/right to multiples of the factors (replicate); returns (x, H, W).

    Replicate padding works for any size (reflect needs the pad to be smaller than the side).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % factor_h, (-w) % factor_w
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    return x, h, w


def check_widths(widths: Sequence[int], arch: str, minimum: int = 2) -> tuple[int, ...]:
    """Validate a per-level width list (a typo must fail here with one line, not inside a conv)."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Sequence) or len(widths) < minimum:
        raise NMRestoreError(
            f"{arch}: widths must be a list of at least {minimum} channel counts, got {widths!r}"
        )
    return tuple(check_positive_int("width", w) for w in widths)


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        default_conv(in_channels, out_channels, 3),
        nn.ReLU(),
        default_conv(out_channels, out_channels, 3),
        nn.ReLU(),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections; ``len(widths) - 1`` downsamplings; output = input + net(input)."""

    arch: ClassVar[str] = "unet"
    supported_scales: ClassVar[tuple[int, ...]] = (1,)

    def __init__(
        self,
        scale: int = 1,
        widths: Sequence[int] = (64, 128, 256, 512, 1024),
        n_colors: int = 3,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "UNet")
        self.widths = check_widths(widths, "UNet")
        n_colors = check_positive_int("n_colors", n_colors)
        self.residual = bool(residual)
        self.depth = len(self.widths) - 1
        # Registration order = execution order of the first conv, so definition-order tools agree.
        ins = (n_colors, *self.widths[:-2])
        self.enc = nn.ModuleList([_double_conv(i, o) for i, o in zip(ins, self.widths[:-1], strict=True)])
        self.pool = nn.MaxPool2d(2)
        self.bottom = _double_conv(self.widths[-2], self.widths[-1])
        # Decoder lists are coarse-to-fine, the order forward uses them.
        pairs = list(zip(self.widths[1:], self.widths[:-1], strict=True))[::-1]
        self.up = nn.ModuleList([nn.ConvTranspose2d(hi, lo, 2, stride=2) for hi, lo in pairs])
        self.dec = nn.ModuleList([_double_conv(2 * lo, lo) for _, lo in pairs])
        self.out = nn.Conv2d(self.widths[0], n_colors, 1)
        self.nm_dense_layers: tuple[str, ...] = ("enc.0.0", "out")

    def forward(self, x: Tensor) -> Tensor:
        factor = 2**self.depth
        padded, h, w = pad_to_multiple(x, factor, factor)
        y = padded
        skips = []
        for block in self.enc:
            y = block(y)
            skips.append(y)
            y = self.pool(y)
        y = self.bottom(y)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips), strict=True):
            y = dec(torch.cat((up(y), skip), dim=1))
        y = self.out(y)
        if self.residual:
            y = y + padded
        return y[..., :h, :w]


@register_model
def unet(scale: int = 1, widths: Sequence[int] = (64, 128, 256, 512, 1024), residual: bool = True) -> UNet:
    """The published U-Net shape (4 downsamplings, 64..1024 channels; 31.0M params), same-padded, residual."""
    return UNet(scale, widths, residual=residual)


@register_model
def unet_small(scale: int = 1, widths: Sequence[int] = (32, 32, 64), residual: bool = True) -> UNet:
    """CPU preset: 2 downsamplings, widths 32-32-64 (about 150K params); every width a multiple of 32."""
    return UNet(scale, widths, residual=residual)
