"""Paired LR/HR patch cropping and augmentation on ``H x W x C`` numpy arrays.

Both functions take an explicit ``numpy.random.Generator`` (never the global RNG), so the caller
decides where randomness comes from; the training dataset seeds one per (seed, epoch, index), which
is what makes every sample reproducible.
"""

from __future__ import annotations

import numpy as np

from nmrestore.errors import DatasetError

__all__ = ["augment", "random_crop_pair"]


def random_crop_pair(
    lq: np.ndarray,
    gt: np.ndarray,
    patch_size: int,
    scale: int,
    rng: np.random.Generator,
    name: str = "image",
) -> tuple[np.ndarray, np.ndarray]:
    """Crop a random ``patch_size`` LR patch and the HR patch covering exactly the same area.

    The LR corner is drawn first and the HR corner is that times ``scale``, so the pair stays
    aligned by construction (cropping HR first and dividing could land between LR pixels).
    ``gt`` must be ``lq`` times ``scale`` in both dimensions; patches are views into the inputs.
    """
    lh, lw = lq.shape[:2]
    gh, gw = gt.shape[:2]
    if (gh, gw) != (lh * scale, lw * scale):
        raise DatasetError(
            f"{name}: HR size {gw}x{gh} is not LR size {lw}x{lh} times scale {scale}; cannot crop a pair"
        )
    if lh < patch_size or lw < patch_size:
        raise DatasetError(
            f"{name}: LR image {lw}x{lh} is smaller than the LR patch {patch_size}x{patch_size}"
            f" (HR {gw}x{gh}, scale {scale})"
        )
    top = int(rng.integers(0, lh - patch_size + 1))
    left = int(rng.integers(0, lw - patch_size + 1))
    lq_patch = lq[top : top + patch_size, left : left + patch_size]
    hp = patch_size * scale
    gt_patch = gt[top * scale : top * scale + hp, left * scale : left * scale + hp]
    return lq_patch, gt_patch


def augment(lq: np.ndarray, gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Apply the same random horizontal flip, vertical flip and 90-degree rotation to both arrays.

    The three coin flips are always drawn (even if one would be a no-op), so the number of draws
    per sample is fixed and the random stream does not depend on earlier outcomes. The eight
    results are the dihedral group of the square, the usual EDSR/BasicSR augmentation.
    """
    hflip, vflip, rot90 = (bool(b) for b in rng.integers(0, 2, size=3))

    def _apply(a: np.ndarray) -> np.ndarray:
        if hflip:
            a = a[:, ::-1]
        if vflip:
            a = a[::-1, :]
        if rot90:
            a = a.transpose(1, 0, *range(2, a.ndim))
        return a

    return _apply(lq), _apply(gt)
