"""Blocks shared by the model zoo, kept as plain ``nn.Conv2d`` so N:M masks attach by parametrize.

The layouts mirror EDSR-PyTorch's ``model/common.py`` (``ResBlock.body.{0,2}``, ``Upsampler``
indices) so that official checkpoints load by name, with two deliberate differences:

* :class:`MeanShift` is not an ``nn.Conv2d`` but a fixed per-channel shift held in a
  non-persistent buffer. EDSR-PyTorch's frozen 1x1 conv has identity weights anyway; as a conv
  it would be counted as a prunable layer, appear in optimiser parameter lists and carry the
  training ``rgb_range`` into our checkpoints. :mod:`nmrestore.models.official` reads the
  official ``sub_mean``/``add_mean`` tensors to detect the checkpoint's ``rgb_range`` instead.
* Activations are not in-place, so forward hooks that keep activations see the values they hooked.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nmrestore.errors import NMRestoreError

#: Mean RGB of DIV2K in [0, 1], used by EDSR, RCAN and CARN for their mean shift.
DIV2K_RGB_MEAN: tuple[float, float, float] = (0.4488, 0.4371, 0.4040)


def check_scale(scale: object, supported: tuple[int, ...], arch: str) -> int:
    """Return ``scale`` if ``arch`` supports it; a user's typo must fail here, not deep in a conv."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale not in supported:
        allowed = ", ".join(str(s) for s in supported)
        raise NMRestoreError(f"{arch} supports scale {allowed}; got {scale!r}")
    return scale


def check_positive_int(name: str, value: object) -> int:
    """Validate a size override (``n_feats``, ``n_blocks``...) with a one-line error."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise NMRestoreError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_positive_float(name: str, value: object) -> float:
    """Validate a float option (``res_scale``, ``rgb_range``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise NMRestoreError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def default_conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> nn.Conv2d:
    """'Same'-padded conv, EDSR-PyTorch's ``default_conv``."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class MeanShift(nn.Module):
    """Add ``sign * rgb_range * rgb_mean`` per channel (EDSR's ``sub_mean``/``add_mean``).

    Our inputs are in [0, 1], so the default ``rgb_range`` is 1; EDSR-PyTorch trains with 255.
    The shift is a constant of the architecture, so it lives in a non-persistent buffer: it
    moves with ``.to()`` but is neither a parameter nor part of ``state_dict()``.
    """

    shift: Tensor

    def __init__(
        self,
        rgb_range: float = 1.0,
        rgb_mean: tuple[float, float, float] = DIV2K_RGB_MEAN,
        sign: int = -1,
    ) -> None:
        super().__init__()
        if sign not in (-1, 1):
            raise ValueError(f"sign must be -1 or 1, got {sign}")
        self.rgb_range = float(rgb_range)
        self.sign = sign
        shift = torch.tensor(rgb_mean, dtype=torch.float32) * (sign * self.rgb_range)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"rgb_range={self.rgb_range:g}, sign={self.sign:+d}"


class Upsampler(nn.Sequential):
    """Sub-pixel upsampler: per x2 step conv(n -> 4n) [+ ReLU] + PixelShuffle(2); x3 in one step.

    Without ``act`` the indices match EDSR-PyTorch (``0`` conv, ``1`` shuffle, ``2`` conv...); with
    ``act`` they match CARN's ``_UpsampleBlock.body`` (``0`` conv, ``1`` ReLU, ``2`` shuffle, ``3`` conv).
    """

    def __init__(self, scale: int, n_feats: int, act: bool = False) -> None:
        layers: list[nn.Module] = []
        if scale in (2, 4, 8):
            steps = [2] * int(math.log2(scale))
        elif scale == 3:
            steps = [3]
        else:
            raise NMRestoreError(f"the sub-pixel upsampler supports scale 2, 3, 4 or 8, got {scale}")
        for step in steps:
            layers.append(default_conv(n_feats, step * step * n_feats, 3))
            if act:
                layers.append(nn.ReLU())
            layers.append(nn.PixelShuffle(step))
        super().__init__(*layers)


class ResBlock(nn.Module):
    """EDSR's residual block without BN: ``x + res_scale * conv(relu(conv(x)))``.

    ``res_scale`` 0.1 keeps the wide (256-channel) EDSR stable to train, as in the paper.
    """

    def __init__(self, n_feats: int, kernel_size: int = 3, res_scale: float = 1.0) -> None:
        super().__init__()
        self.body = nn.Sequential(
            default_conv(n_feats, n_feats, kernel_size),
            nn.ReLU(),
            default_conv(n_feats, n_feats, kernel_size),
        )
        self.res_scale = res_scale

    def forward(self, x: Tensor) -> Tensor:
        res = self.body(x)
        if self.res_scale != 1:
            res = res * self.res_scale
        return res + x


class LongSkip(nn.Module):
    """``inner(x) + x``: a trunk's long skip as a module of its own (no parameters), so that an
    inference engine can add ``x`` in the epilogue of the trunk's last conv instead of in a pass
    of its own (:mod:`nmrestore.runtime.fusion`)."""

    def forward(self, inner: nn.Module, x: Tensor) -> Tensor:
        return inner(x) + x


def residual_trunk(
    n_colors: int, n_feats: int, make_block: Callable[[], nn.Module], n_blocks: int
) -> tuple[nn.Sequential, nn.Sequential]:
    """EDSR's ``head`` (one conv) and ``body`` (``n_blocks`` blocks, then a conv; the caller adds
    the long skip), built head first so seeded initialisation matches EDSR-PyTorch's order."""
    head = nn.Sequential(default_conv(n_colors, n_feats, 3))
    blocks = [make_block() for _ in range(n_blocks)]
    body = nn.Sequential(*blocks, default_conv(n_feats, n_feats, 3))
    return head, body


class MeanShiftedSR(nn.Module):
    """EDSR's layout, shared by EDSR and RCAN: ``sub_mean``, ``head.0``, ``body`` (blocks and a conv
    under a long skip), ``tail.0`` (the upsampler; Identity at scale 1), ``tail.1``, ``add_mean``.

    The names are EDSR-PyTorch's, so official weights load by name. Subclasses choose the block.

    ``global_skip``: the network predicts a residual over the bicubic upscaled input (the input itself
    at scale 1), as VDSR does, instead of the image. Its last conv starts at zero, so the untrained
    model *is* bicubic, and a flat region stays as bicubic restores it unless training finds better:
    without it a short CPU training leaves a colour offset of a few grey levels (measured on the photo
    set's x4 dense model: -2.4 on Y, -4.2 on G), which costs more than bicubic's whole error on smooth
    photographs (docs/BENCHMARKS.md).
    """

    def __init__(
        self,
        scale: int,
        n_feats: int,
        n_colors: int,
        rgb_range: float,
        make_block: Callable[[], nn.Module],
        n_blocks: int,
        global_skip: bool = False,
    ) -> None:
        super().__init__()
        self.scale = scale
        self.global_skip = bool(global_skip)
        self.rgb_range = rgb_range
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head, self.body = residual_trunk(n_colors, n_feats, make_block, n_blocks)
        self.long_skip = LongSkip()  # body(features) + features
        # Scale 1 (denoising, deblurring): no upsampler; Identity keeps the last conv at ``tail.1``.
        upsampler: nn.Module = Upsampler(scale, n_feats) if scale > 1 else nn.Identity()
        self.tail = nn.Sequential(upsampler, default_conv(n_feats, n_colors, 3))
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.nm_dense_layers: tuple[str, ...] = ("head.0", "tail.1")
        if self.global_skip:
            last = self.tail[1]
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        res = self.long_skip(self.body, features)
        if not self.global_skip:
            return self.add_mean(self.tail(res))
        base = x if self.scale == 1 else F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False)
        return base + self.tail(res)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not); the figure papers report."""
    return sum(p.numel() for p in model.parameters())
