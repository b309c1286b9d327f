"""SR datasets (random training patches, whole evaluation images) and the folder layouts they read.

Images travel as lists of ``(name, H x W x 3 uint8 array)``, so the built-in set, a folder of HR
files and a DIV2K/benchmark tree all feed the same two dataset classes. Folder handling is a few
plain functions: :func:`find_layout` recognises the usual trees, :func:`from_paired_folders` pairs
LR and HR files by name, :func:`load_folder` does both.

Samples are dicts ``{"lq": float C x H x W in [0, 1], "gt": same at scale x, "name": str}``.
"""

from __future__ import annotations

import math
import operator
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from nmrestore.data.io import IMAGE_EXTENSIONS, list_images, read_image, to_tensor
from nmrestore.data.transforms import augment as augment_pair
from nmrestore.data.transforms import random_crop_pair
from nmrestore.errors import DatasetError
from nmrestore.metrics.imresize import imresize_uint8, mod_crop

__all__ = [
    "ImageList",
    "ImagePairs",
    "Layout",
    "SREvalDataset",
    "SRTrainDataset",
    "find_layout",
    "from_folder_hr_only",
    "from_gopro",
    "from_paired_folders",
    "load_folder",
    "make_lr",
    "split_holdout",
]

#: A list of named uint8 ``H x W x 3`` images: what every dataset in nmrestore is built from.
ImageList = list[tuple[str, np.ndarray]]


class ImagePairs(NamedTuple):
    """HR images and, when the source provides them, their LR counterparts (same order, same names)."""

    gt: ImageList
    lq: ImageList | None


class Layout(NamedTuple):
    """A recognised dataset tree: its kind, the HR folder, and the LR folder for the scale (or None)."""

    kind: str
    hr_dir: Path
    lr_dir: Path | None


def _check_scale(scale: int) -> int:
    if isinstance(scale, bool) or not isinstance(scale, int | np.integer) or scale < 1:
        raise DatasetError(f"scale must be a positive integer, got {scale!r}")
    return int(scale)


def _check_image(name: str, arr: np.ndarray) -> None:
    if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 3:
        desc = (
            f"{arr.dtype} array of shape {arr.shape}" if isinstance(arr, np.ndarray) else type(arr).__name__
        )
        raise DatasetError(f"{name}: expected an H x W x C uint8 image, got {desc}")


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """The LR input for an HR image: MATLAB bicubic downscale of the mod-cropped HR, as uint8.

    Quantised to uint8 on purpose: the LR_bicubic PNGs of DIV2K and the benchmark sets are 8-bit,
    so a generated LR matches a distributed one and PSNR stays comparable to published numbers.
    """
    scale = _check_scale(scale)
    hr = mod_crop(hr, scale)
    h, w = hr.shape[:2]
    if h == 0 or w == 0:
        raise DatasetError(f"image of {hr.shape[1]}x{hr.shape[0]} pixels is smaller than scale {scale}")
    return imresize_uint8(np.ascontiguousarray(hr), size=(h // scale, w // scale))


def _pair_images(
    hr_images: Sequence[tuple[str, np.ndarray]],
    scale: int,
    lr_images: Sequence[tuple[str, np.ndarray]] | None,
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, lr, hr)`` triples with HR cropped to exactly ``scale`` times the LR size.

    The LR must be ``HR // scale`` in both dimensions (the floor is how benchmark LR files were
    made from HR sizes that are not multiples of the scale); anything else is a wrong pair.
    """
    if len(hr_images) == 0:
        raise DatasetError("no HR images given: the dataset would be empty")
    triples = []
    if lr_images is None:
        for name, hr in hr_images:
            _check_image(name, hr)
            triples.append((name, make_lr(hr, scale), np.ascontiguousarray(mod_crop(hr, scale))))
        return triples
    if len(lr_images) != len(hr_images):
        raise DatasetError(f"{len(lr_images)} LR images for {len(hr_images)} HR images; they must pair up")
    for (hr_name, hr), (lr_name, lr) in zip(hr_images, lr_images, strict=True):
        if hr_name != lr_name:
            raise DatasetError(f"LR image {lr_name!r} is paired with HR image {hr_name!r}; names must match")
        _check_image(hr_name, hr)
        _check_image(lr_name, lr)
        (hh, hw), (lh, lw) = hr.shape[:2], lr.shape[:2]
        if (lh, lw) != (hh // scale, hw // scale) or lh == 0 or lw == 0:
            raise DatasetError(
                f"pair {lr_name!r}: LR is {lw}x{lh} but HR {hw}x{hh} / scale {scale} is"
                f" {hw // scale}x{hh // scale}"
            )
        if lr.shape[2] != hr.shape[2]:
            raise DatasetError(f"pair {lr_name!r}: LR has {lr.shape[2]} channels, HR {hr.shape[2]}")
        triples.append((hr_name, lr, np.ascontiguousarray(mod_crop(hr, scale))))
    return triples


class EpochIndexedDataset(Dataset):
    """Training samples that are pure functions of (seed, epoch, index), so resume and DDP replay them.

    Subclasses set ``length`` and implement :meth:`sample`; an index is an int (the current epoch,
    see :meth:`set_epoch`) or an ``(epoch, index)`` pair.
    """

    length: int
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch used for plain integer indices (the DistributedSampler convention)."""
        self.epoch = operator.index(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, torch.Tensor | str]:
        if isinstance(index, tuple):
            epoch, i = (operator.index(v) for v in index)
        else:
            epoch, i = self.epoch, operator.index(index)
        return self.sample(epoch, i)

    def check_index(self, epoch: int, index: int) -> None:
        if not 0 <= index < self.length:
            raise IndexError(f"sample index {index} out of range 0..{self.length - 1}")
        if epoch < 0:
            raise IndexError(f"epoch must be non-negative, got {epoch}")

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor | str]:
        raise NotImplementedError


class SRTrainDataset(EpochIndexedDataset):
    """Random aligned LR/HR training patches; sample ``i`` of epoch ``e`` depends only on (seed, e, i).

    SR sets are small (the built-in one has 8 images), so ``length`` fixes the samples per epoch
    and sample ``i`` uses image ``i % len(images)``: an epoch visits every image about equally.
    Each sample draws its crop and augmentation from a numpy Generator seeded with
    ``(seed, epoch, i)``; no state is carried between samples, so a resumed run, any number of
    DataLoader workers and any DDP sharding see exactly the same patches.

    The epoch comes from :meth:`set_epoch` for an integer index, or from the index itself when it
    is an ``(epoch, i)`` tuple -- what :func:`nmrestore.data.loader.build_train_loader`'s sampler
    yields, because persistent workers hold their own copy of the dataset and would never see a
    ``set_epoch`` made in the main process.

    Without ``lr_images`` each HR is mod-cropped and downscaled once here (MATLAB bicubic, see
    :func:`make_lr`) and the LR kept in memory.
    """

    def __init__(
        self,
        hr_images: Sequence[tuple[str, np.ndarray]],
        scale: int,
        patch_size: int,
        length: int,
        seed: int,
        lr_images: Sequence[tuple[str, np.ndarray]] | None = None,
        augment: bool = True,
    ) -> None:
        self.scale = _check_scale(scale)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise DatasetError(f"patch_size must be a positive integer, got {patch_size!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise DatasetError(f"length (samples per epoch) must be a positive integer, got {length!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise DatasetError(f"seed must be a non-negative integer, got {seed!r}")
        self.patch_size = patch_size
        self.length = length
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self.pairs = _pair_images(hr_images, self.scale, lr_images)
        for (name, lr, _), (_, hr_in) in zip(self.pairs, hr_images, strict=True):
            lh, lw = lr.shape[:2]
            if lh < patch_size or lw < patch_size:
                raise DatasetError(
                    f"{name}: image too small for the patch: LR {lw}x{lh} (HR {hr_in.shape[1]}x{hr_in.shape[0]})"
                    f" < LR patch {patch_size}x{patch_size} (HR patch {patch_size * self.scale}"
                    f"x{patch_size * self.scale}) at scale {self.scale}"
                )

    def sample(self, epoch: int, index: int) -> dict[str, torch.Tensor | str]:
        """The sample ``index`` of ``epoch``: a pure function of (seed, epoch, index)."""
        self.check_index(epoch, index)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, index]))
        name, lr, hr = self.pairs[index % len(self.pairs)]
        lq_patch, gt_patch = random_crop_pair(lr, hr, self.patch_size, self.scale, rng, name=name)
        if self.augment:
            lq_patch, gt_patch = augment_pair(lq_patch, gt_patch, rng)
        return {"lq": to_tensor(lq_patch), "gt": to_tensor(gt_patch), "name": name}


class SREvalDataset(Dataset):
    """Whole images for evaluation: HR mod-cropped to ``scale`` times the LR, LR given or generated."""

    def __init__(
        self,
        hr_images: Sequence[tuple[str, np.ndarray]],
        scale: int,
        lr_images: Sequence[tuple[str, np.ndarray]] | None = None,
    ) -> None:
        self.scale = _check_scale(scale)
        self.pairs = _pair_images(hr_images, self.scale, lr_images)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        name, lr, hr = self.pairs[index]
        return {"lq": to_tensor(lr), "gt": to_tensor(hr), "name": name}


def split_holdout(
    gt: ImageList, lq: ImageList | None, scale: int, fraction: float, min_rows: int
) -> tuple[tuple[ImageList, ImageList | None], tuple[ImageList, ImageList | None]]:
    """Cut the bottom ``fraction`` of every image (at least ``min_rows`` LR rows) into a held-out set.

    Returns ``((train_gt, train_lq), (held_gt, held_lq))``. Images too small to give both parts
    ``min_rows`` LR rows stay whole in the training part. LR images (if given) are cut at the
    matching row, so pairs stay aligned.
    """
    train_gt: ImageList = []
    held_gt: ImageList = []
    train_lq: ImageList | None = [] if lq is not None else None
    held_lq: ImageList | None = [] if lq is not None else None
    for i, (name, hr) in enumerate(gt):
        lr_rows = hr.shape[0] // scale
        hold = max(math.ceil(fraction * lr_rows), min_rows) if fraction > 0 else 0
        if hold == 0 or lr_rows - hold < min_rows:
            train_gt.append((name, hr))
            if lq is not None and train_lq is not None:
                train_lq.append(lq[i])
            continue
        cut = lr_rows - hold
        train_gt.append((name, np.ascontiguousarray(hr[: cut * scale])))
        held_gt.append((name, np.ascontiguousarray(hr[cut * scale : lr_rows * scale])))
        if lq is not None and train_lq is not None and held_lq is not None:
            lname, lr = lq[i]
            train_lq.append((lname, np.ascontiguousarray(lr[:cut])))
            held_lq.append((lname, np.ascontiguousarray(lr[cut:lr_rows])))
    return (train_gt, train_lq), (held_gt, held_lq)


# --------------------------------------------------------------------------- folders


def from_folder_hr_only(hr_dir: str | os.PathLike[str]) -> ImageList:
    """Every image of ``hr_dir`` as ``(stem, array)``, sorted by file name; LR is made later."""
    files = list_images(hr_dir)
    _check_unique_stems(files, Path(hr_dir))
    return [(f.stem, read_image(f)) for f in files]


def _check_unique_stems(files: Sequence[Path], folder: Path) -> None:
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise DatasetError(f"{folder}: {seen[f.stem].name} and {f.name} have the same name; ambiguous")
        seen[f.stem] = f


def _hr_key(stem: str, scale: int) -> str:
    """Name an HR file is matched under: its stem, without a SelfExSR ``_SRF_{s}_HR`` suffix."""
    m = re.fullmatch(rf"(.+)_SRF_{scale}_HR", stem)
    return m.group(1) if m else stem


def _lr_keys(stem: str, scale: int) -> list[str]:
    """HR names an LR file may belong to, most specific first.

    Identical stems (generic ``lq/`` + ``gt/``), then the ``x{s}`` suffix of DIV2K, Flickr2K and the
    EDSR benchmark packages (``0001x2``, ``babyx2``; ``_x2`` too), then SelfExSR's ``_SRF_{s}_LR``.
    """
    keys = [stem]
    for pattern in (rf"(.+?)_?[xX]{scale}", rf"(.+)_SRF_{scale}_LR"):
        m = re.fullmatch(pattern, stem)
        if m:
            keys.append(m.group(1))
    return keys


def from_paired_folders(
    lq_dir: str | os.PathLike[str], gt_dir: str | os.PathLike[str], scale: int
) -> ImagePairs:
    """Read LR and HR folders and pair them by name; every file must have its partner.

    An LR without an HR, an HR without an LR, two LRs for one HR, or an LR whose size is not
    ``HR // scale`` raise :class:`DatasetError` naming the files: a silently dropped or misaligned
    pair would bias every number computed on the set. Names are the HR stems, order is HR order.
    """
    scale = _check_scale(scale)
    lq_root, gt_root = Path(lq_dir), Path(gt_dir)
    lr_files, hr_files = list_images(lq_root), list_images(gt_root)
    _check_unique_stems(lr_files, lq_root)
    _check_unique_stems(hr_files, gt_root)
    hr_by_key = {_hr_key(f.stem, scale): f for f in hr_files}
    lr_for_hr: dict[Path, Path] = {}
    for lr_file in lr_files:
        hr_file = next((hr_by_key[k] for k in _lr_keys(lr_file.stem, scale) if k in hr_by_key), None)
        if hr_file is None:
            raise DatasetError(f"LR image {lr_file} has no HR partner in {gt_root} (scale {scale})")
        if hr_file in lr_for_hr:
            raise DatasetError(
                f"HR image {hr_file} matches two LR images: {lr_for_hr[hr_file].name} and {lr_file.name}"
            )
        lr_for_hr[hr_file] = lr_file
    missing = [f.name for f in hr_files if f not in lr_for_hr]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(f"HR images in {gt_root} without an LR partner in {lq_root}: {shown}")
    gt: ImageList = []
    lq: ImageList = []
    for hr_file in hr_files:
        lr_file = lr_for_hr[hr_file]
        name = _hr_key(hr_file.stem, scale)
        hr, lr = read_image(hr_file), read_image(lr_file)
        (hh, hw), (lh, lw) = hr.shape[:2], lr.shape[:2]
        if (lh, lw) != (hh // scale, hw // scale):
            raise DatasetError(
                f"mismatched pair {lr_file} / {hr_file}: LR is {lw}x{lh} but HR {hw}x{hh} / scale {scale}"
                f" is {hw // scale}x{hh // scale}"
            )
        gt.append((name, np.ascontiguousarray(mod_crop(hr, scale))))
        lq.append((name, lr))
    return ImagePairs(gt=gt, lq=lq)


#: ``PHOTOS_*`` is the photo set of :mod:`nmrestore.data.photos`, written in DIV2K's layout with a test split.
_PREFIXED_HR = re.compile(r"((?:DIV2K|PHOTOS)_(?:train|valid|test)|Flickr2K|DF2K)_HR")
_KIND_OF_PREFIX = {"DIV2K": "div2k", "PHOTOS": "div2k", "Flickr2K": "flickr2k", "DF2K": "df2k"}
#: Split names people use for DIV2K's validation folder.
_SPLIT_ALIASES = {"val": "valid", "validation": "valid"}


def _child(parent: Path, name: str) -> Path | None:
    """Sub-folder ``name`` of ``parent``, matched case-insensitively (``X2``/``x2``, ``gt``/``GT``)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    if not parent.is_dir():
        return None
    for d in sorted(parent.iterdir()):
        if d.is_dir() and d.name.lower() == name.lower():
            return d
    return None


def _scale_dir(lr_parent: Path | None, scale: int) -> Path | None:
    return None if lr_parent is None else _child(lr_parent, f"X{scale}")


def _gopro_sequences(split_dir: Path) -> list[Path]:
    """Sequence folders of a GoPro split: sub-folders holding both ``blur/`` and ``sharp/``."""
    if not split_dir.is_dir():
        return []
    return [
        d
        for d in sorted(split_dir.iterdir())
        if d.is_dir() and _child(d, "blur") is not None and _child(d, "sharp") is not None
    ]


def _gopro_split(root: Path, split: str | None) -> Path | None:
    """The GoPro split folder under ``root`` (or ``root`` itself when it is one); None if not GoPro."""
    if _gopro_sequences(root):
        return root
    splits = {
        name: d for name in ("train", "test") if (d := _child(root, name)) is not None and _gopro_sequences(d)
    }
    if not splits:
        return None
    if split is not None:
        if split not in splits:
            raise DatasetError(f"{root}: no GoPro split {split!r} (found {', '.join(sorted(splits))})")
        return splits[split]
    if len(splits) > 1:
        raise DatasetError(
            f"{root}: GoPro tree with both train/ and test/; pass split='train' or 'test' (or the split folder itself)"
        )
    return next(iter(splits.values()))


def from_gopro(split_dir: str | os.PathLike[str]) -> ImagePairs:
    """Read a GoPro split (``<sequence>/blur/*.png`` + ``<sequence>/sharp/*.png``), paired by file name.

    Names are ``<sequence>_<stem>``. A blur frame without its sharp frame (or the reverse), or a
    pair of different sizes, raises :class:`DatasetError` naming both files: a silently dropped or
    misaligned pair would bias every number computed on the set.
    """
    root = Path(split_dir)
    sequences = _gopro_sequences(root)
    if not sequences:
        raise DatasetError(f"{root}: no GoPro sequences (folders with blur/ and sharp/ inside)")
    gt: ImageList = []
    lq: ImageList = []
    for seq in sequences:
        blur_dir, sharp_dir = _child(seq, "blur"), _child(seq, "sharp")
        assert blur_dir is not None and sharp_dir is not None
        blur_files, sharp_files = list_images(blur_dir), list_images(sharp_dir)
        _check_unique_stems(blur_files, blur_dir)
        _check_unique_stems(sharp_files, sharp_dir)
        sharp_by_stem = {f.stem: f for f in sharp_files}
        blur_stems = {f.stem for f in blur_files}
        for blur_file in blur_files:
            sharp_file = sharp_by_stem.get(blur_file.stem)
            if sharp_file is None:
                raise DatasetError(
                    f"unpaired GoPro frame: {blur_file} has no sharp partner {sharp_dir / blur_file.name}"
                )
            blur, sharp = read_image(blur_file), read_image(sharp_file)
            if blur.shape != sharp.shape:
                raise DatasetError(
                    f"mismatched pair {blur_file} / {sharp_file}: blur is {blur.shape[1]}x{blur.shape[0]},"
                    f" sharp is {sharp.shape[1]}x{sharp.shape[0]}"
                )
            name = f"{seq.name}_{blur_file.stem}"
            gt.append((name, sharp))
            lq.append((name, blur))
        orphans = [f.name for f in sharp_files if f.stem not in blur_stems]
        if orphans:
            shown = ", ".join(orphans[:5]) + (f" and {len(orphans) - 5} more" if len(orphans) > 5 else "")
            raise DatasetError(
                f"unpaired GoPro frames: {sharp_dir} has no blur partner in {blur_dir} for {shown}"
            )
    return ImagePairs(gt=gt, lq=lq)


def find_layout(root: str | os.PathLike[str], scale: int, split: str | None = None) -> Layout:
    """Recognise the dataset tree at ``root`` for ``scale``, most specific layout first.

    * ``div2k`` / ``flickr2k`` / ``df2k``: ``DIV2K_train_HR/`` (or ``DIV2K_valid_HR/``,
      ``Flickr2K_HR/``, ``DF2K_HR/``) with ``<prefix>_LR_bicubic/X{s}/`` beside it. If ``root`` holds
      both DIV2K train and valid, ``split`` ("train"/"valid") picks one;
    * ``benchmark``: ``HR/`` + ``LR_bicubic/X{s}/`` (Set5, Set14, B100, Urban100, Manga109 as in the
      EDSR benchmark package);
    * ``generic``: ``gt/`` + ``lq/`` with identical file names (scale 1: deblurring/denoising pairs);
    * ``gopro``: ``train|test/<sequence>/blur|sharp/*.png`` (or one split folder); scale 1 only.
      ``hr_dir`` and ``lr_dir`` are both the split folder (read it with :func:`from_gopro`);
    * ``hr_only``: images directly in ``root``.

    When the LR folder for ``scale`` is absent, ``lr_dir`` is None and the LR is generated with
    MATLAB bicubic (the way those LR folders were made).
    """
    scale = _check_scale(scale)
    r = Path(root)
    if not r.is_dir():
        raise DatasetError(f"{r}: dataset folder does not exist")
    subdirs = sorted(d for d in r.iterdir() if d.is_dir())
    prefixed = [d for d in subdirs if _PREFIXED_HR.fullmatch(d.name)]
    if split is not None and prefixed:
        # Only DIV2K (and the photo set) name a split; Flickr2K/DF2K are training-only sets and always match.
        split = _SPLIT_ALIASES.get(split, split)
        prefixed = [
            d for d in prefixed if not d.name.startswith(("DIV2K", "PHOTOS")) or f"_{split}_HR" in d.name
        ]
        if not prefixed:
            raise DatasetError(f"{r}: no HR folder for split {split!r}")
    if len(prefixed) > 1:
        names = ", ".join(d.name for d in prefixed)
        raise DatasetError(f"{r}: several HR folders ({names}); pass split='train', 'valid' or 'test' to choose")
    if len(prefixed) == 1:
        hr_dir = prefixed[0]
        prefix = hr_dir.name[: -len("_HR")]
        kind = _KIND_OF_PREFIX[prefix.split("_")[0]]
        return Layout(kind, hr_dir, _scale_dir(_child(r, f"{prefix}_LR_bicubic"), scale))
    hr = _child(r, "HR")
    if hr is not None:
        return Layout("benchmark", hr, _scale_dir(_child(r, "LR_bicubic"), scale))
    gt = _child(r, "gt")
    if gt is not None:
        return Layout("generic", gt, _child(r, "lq"))
    gopro = _gopro_split(r, split)
    if gopro is not None:
        if scale != 1:
            raise DatasetError(f"{r}: GoPro is a deblurring set (scale 1), not for scale {scale}")
        return Layout("gopro", gopro, gopro)
    if any(
        f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        for f in r.iterdir()
    ):
        return Layout("hr_only", r, None)
    raise DatasetError(
        f"{r}: no known dataset layout (expected DIV2K_train_HR/, Flickr2K_HR/, HR/ + LR_bicubic/X{scale}/,"
        " gt/ + lq/, GoPro train|test/<sequence>/blur|sharp/, or images directly in the folder)"
    )


def load_folder(root: str | os.PathLike[str], scale: int, split: str | None = None) -> ImagePairs:
    """Find the layout of ``root`` (see :func:`find_layout`) and read its images, paired if LR exists."""
    layout = find_layout(root, scale, split=split)
    if layout.kind == "gopro":
        return from_gopro(layout.hr_dir)
    if layout.lr_dir is None:
        return ImagePairs(gt=from_folder_hr_only(layout.hr_dir), lq=None)
    return from_paired_folders(layout.lr_dir, layout.hr_dir, scale)
