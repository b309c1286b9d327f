"""Deblurring/denoising datasets over clean images with a synthetic degradation applied on the fly.

The counterparts of :class:`~nmrestore.data.datasets.SRTrainDataset` and
:class:`~nmrestore.data.datasets.SREvalDataset` for scale-1 tasks whose inputs are *made* from the
clean image (the built-in photos, HR-only folders). Paired sources (GoPro, ``lq/`` + ``gt/``) need
no degradation and use the SR classes at scale 1.

* Training sample ``i`` of epoch ``e`` is a pure function of ``(seed, e, i)``: the crop, the flips
  and the degradation (a fresh blur kernel / noise draw) come from generators spawned from
  ``SeedSequence([seed, e, i])`` -- one for the crop and flips, one for the degradation, so the
  same crops are used whatever the degradation. Resume, workers and DDP therefore see the same data.
* Evaluation image ``name`` is degraded once, with the fixed seed ``(seed, crc32(name))``, so every
  method, run and subset of the set is scored on the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from nmrestore.data.datasets import EpochIndexedDataset, ImageList
from nmrestore.data.degradations import Degradation, degrade_image, image_seed
from nmrestore.data.io import to_tensor
from nmrestore.data.transforms import augment as augment_pair
from nmrestore.errors import DatasetError

__all__ = ["EVAL_SEED", "DegradedEvalDataset", "DegradedTrainDataset"]

#: Seed of the evaluation degradations (combined with each image's name). Not the recipe's seed:
#: two recipes with different seeds must still be scored on identical inputs.
EVAL_SEED = 0


def _check_images(images: Sequence[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    if len(images) == 0:
        raise DatasetError("no images given: the dataset would be empty")
    for name, arr in images:
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3:
            raise DatasetError(f"{name}: expected an H x W x C uint8 image")
    return list(images)


class DegradedTrainDataset(EpochIndexedDataset):
    """Random clean patches and their degraded versions; sample ``(epoch, i)`` depends only on (seed, epoch, i).

    A region ``patch_size + 2 * margin`` wide is cropped (and flipped/rotated), the degradation
    turns it into the ``patch_size`` input, and the centre ``patch_size`` of the clean region is
    the target. Sample ``i`` uses image ``i % len(images)``, as in the SR dataset.
    """

    def __init__(
        self,
        images: Sequence[tuple[str, np.ndarray]],
        degradation: Degradation,
        patch_size: int,
        length: int,
        seed: int,
        augment: bool = True,
    ) -> None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise DatasetError(f"patch_size must be a positive integer, got {patch_size!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DatasetError(f"length (samples per epoch) must be a positive integer, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
        self.images = _check_images(images)
        self.degradation = degradation
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self.scale = 1
        region = patch_size + 2 * degradation.margin
        for name, arr in self.images:
            h, w = arr.shape[:2]
            if h < region or w < region:
                raise DatasetError(
                    f"{name}: image {w}x{h} is smaller than the {region}x{region} region a {patch_size}-pixel"
                    f" patch needs ({degradation.describe()})"
                )

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor | str]:
        """The sample ``index`` of ``epoch``: a pure function of (seed, epoch, index)."""
        self.check_index(epoch, index)
        crop_seq, degrade_seq = np.random.SeedSequence([self.seed, epoch, index]).spawn(2)
        rng = np.random.default_rng(crop_seq)
        name, image = self.images[index % len(self.images)]
        m, p = self.degradation.margin, self.patch_size
        size = p + 2 * m
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - size + 1))
        left = int(rng.integers(0, w - size + 1))
        region = image[top : top + size, left : left + size]
        if self.augment:
            region, _ = augment_pair(region, region, rng)
        region = np.ascontiguousarray(region)
        lq = self.degradation(region, np.random.default_rng(degrade_seq))
        gt = to_tensor(np.ascontiguousarray(region[m : m + p, m : m + p]))
        return {"lq": lq, "gt": gt, "name": name}


class DegradedEvalDataset(Dataset):
    """Whole clean images and their degraded versions, each made once with the image's fixed seed."""

    def __init__(
        self, images: Sequence[tuple[str, np.ndarray]], degradation: Degradation, seed: int = EVAL_SEED
    ) -> None:
        self.images: ImageList = _check_images(images)
        self.degradation = degradation
        self.seed = seed
        self.scale = 1
        self.inputs = [
            degrade_image(arr, degradation, np.random.default_rng(image_seed(seed, name)))
            for name, arr in self.images
        ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        name, image = self.images[index]
        return {"lq": self.inputs[index].clone(), "gt": to_tensor(image), "name": name}
