"""Synthetic degradations for deblurring and denoising, applied on the fly, reproducible from a seed.

* :class:`MotionBlur`: a random motion trajectory (a random walk with inertia, or a straight line)
  rasterised into a ``k x k`` kernel that sums to 1, convolved with the sharp image. The blurred
  image is quantised to 8 bits, as a blurry photo (or a GoPro blur frame) is stored.
* :class:`GaussianNoise`: additive white Gaussian noise of standard deviation ``sigma`` on the
  0..255 scale (the field's sigma = 15 / 25 / 50), added to the [0, 1] image as ``sigma / 255``
  and neither clipped nor quantised -- the protocol of DnCNN/FFDNet/KAIR's test scripts, under
  which published Gaussian-denoising PSNRs are measured.

Both take an explicit ``numpy.random.Generator``; nothing reads a global RNG, so a training sample
is a pure function of ``(seed, epoch, index)`` and an evaluation image of ``(seed, image name)``.

A degradation sees a *region* of the clean image ``margin`` pixels larger on every side than the
output it returns, so a blurred training patch contains the light that the kernel brings in from
outside it (a blurred crop, not a crop blurred with made-up borders). Whole images are padded by
reflection for that margin.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from nmrestore.data.io import to_tensor
from nmrestore.errors import DatasetError

__all__ = [
    "Degradation",
    "GaussianNoise",
    "MotionBlur",
    "degrade_image",
    "image_seed",
    "motion_blur_kernel",
]

Trajectory = Literal["random_walk", "line"]

#: Std of the per-step direction change (radians) of a random-walk trajectory: bent but not a scribble.
WALK_JITTER = 0.35


def motion_blur_kernel(
    size: int,
    rng: np.random.Generator,
    trajectory: Trajectory = "random_walk",
    min_length: float = 0.3,
    max_length: float = 1.0,
) -> np.ndarray:
    """A ``size x size`` float64 motion-blur kernel summing to 1, drawn from ``rng``.

    The camera path has a length drawn uniformly in ``[min_length, max_length] * (size - 1)``
    pixels and a uniform random start direction. A ``random_walk`` turns by a Gaussian angle at
    every step (inertia: the heading changes, the speed does not); a ``line`` keeps its heading.
    The path is centred in the kernel and rasterised by bilinear splatting of points every 1/4
    pixel, so the light spent at every point of the path is equal, as for a uniform exposure.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise DatasetError(f"motion-blur kernel size must be a positive odd integer, got {size!r}")
    if not 0.0 <= min_length <= max_length <= 1.0:
        raise DatasetError(f"need 0 <= min_length <= max_length <= 1, got {min_length}, {max_length}")
    if trajectory not in ("random_walk", "line"):
        raise DatasetError(f"unknown trajectory {trajectory!r}; expected 'random_walk' or 'line'")
    length = rng.uniform(min_length, max_length) * (size - 1)
    steps = max(1, math.ceil(4 * length))
    heading = rng.uniform(0.0, 2.0 * math.pi)
    turns = rng.normal(0.0, WALK_JITTER, size=steps) if trajectory == "random_walk" else np.zeros(steps)
    angles = heading + np.cumsum(turns)
    step = length / steps
    moves = np.stack([np.cos(angles), np.sin(angles)], axis=1) * step
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(moves, axis=0)])  # (steps + 1, 2) as (x, y)
    # Centre the bounding box; a path of length <= size - 1 always fits inside [0, size - 1].
    points += (size - 1) / 2 - (points.min(axis=0) + points.max(axis=0)) / 2
    points = np.clip(points, 0.0, size - 1)
    kernel = np.zeros((size, size), dtype=np.float64)
    x0 = np.minimum(np.floor(points[:, 0]).astype(int), size - 1)
    y0 = np.minimum(np.floor(points[:, 1]).astype(int), size - 1)
    fx, fy = points[:, 0] - x0, points[:, 1] - y0
    x1, y1 = np.minimum(x0 + 1, size - 1), np.minimum(y0 + 1, size - 1)
    np.add.at(kernel, (y0, x0), (1 - fx) * (1 - fy))
    np.add.at(kernel, (y0, x1), fx * (1 - fy))
    np.add.at(kernel, (y1, x0), (1 - fx) * fy)
    np.add.at(kernel, (y1, x1), fx * fy)
    return kernel / kernel.sum()


def _convolve(region: torch.Tensor, kernel: np.ndarray) -> torch.Tensor:
    """'Valid' 2-D convolution of every channel of (C, H, W) with ``kernel`` (flipped: a true convolution)."""
    channels = region.shape[0]
    weight = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1])).to(region.dtype)
    weight = weight.expand(channels, 1, *kernel.shape).contiguous()
    return F.conv2d(region.unsqueeze(0), weight, groups=channels)[0]


@dataclass(frozen=True)
class MotionBlur:
    """Random motion blur: a new kernel per sample (see :func:`motion_blur_kernel`), 8-bit output."""

    kernel_size: int = 17
    trajectory: Trajectory = "random_walk"
    min_length: float = 0.3
    max_length: float = 1.0

    @property
    def margin(self) -> int:
        return self.kernel_size // 2

    def kernel(self, rng: np.random.Generator) -> np.ndarray:
        return motion_blur_kernel(self.kernel_size, rng, self.trajectory, self.min_length, self.max_length)

    def __call__(self, region: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """Blur a uint8 ``H x W x 3`` region; returns a float (3, H - 2m, W - 2m) tensor on the 8-bit grid."""
        # float64 so the quantisation below does not depend on summation order
        x = to_tensor(region).double()
        blurred = _convolve(x, self.kernel(rng))
        return blurred.mul(255.0).round().clamp(0.0, 255.0).div(255.0).float()

    def describe(self) -> str:
        return (
            f"motion blur ({self.trajectory.replace('_', ' ')}, {self.kernel_size}x{self.kernel_size} kernel, "
            f"length {self.min_length:g}-{self.max_length:g} of the kernel)"
        )


@dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise, ``sigma`` on the 0..255 scale; float output, not clipped."""

    sigma: float = 25.0

    @property
    def margin(self) -> int:
        return 0

    def __call__(self, region: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        x = to_tensor(region)
        noise = rng.standard_normal(size=tuple(x.shape), dtype=np.float32) * np.float32(self.sigma / 255.0)
        return x + torch.from_numpy(noise)

    def describe(self) -> str:
        return f"Gaussian noise sigma {self.sigma:g}"


Degradation = MotionBlur | GaussianNoise


def image_seed(seed: int, name: str) -> np.random.SeedSequence:
    """The fixed seed of evaluation image ``name``: the same degradation whatever else is in the set."""
    return np.random.SeedSequence([seed, zlib.crc32(name.encode("utf-8"))])


def degrade_image(image: np.ndarray, degradation: Degradation, rng: np.random.Generator) -> torch.Tensor:
    """Degrade a whole uint8 ``H x W x 3`` image (reflect-padded by the margin): a (3, H, W) float tensor."""
    m = degradation.margin
    if m:
        # numpy reflects repeatedly when the pad exceeds the side, so any image size works
        image = np.pad(image, ((m, m), (m, m), (0, 0)), mode="reflect")
    return degradation(image, rng)
