"""Data layer: image I/O, the built-in sample set, SR and degraded (deblur/denoise) datasets, folder layouts, loaders."""

from __future__ import annotations

from nmrestore.data.builtin import BUILTIN_TEST, BUILTIN_TRAIN, export_builtin, load_builtin
from nmrestore.data.datasets import (
    ImageList,
    ImagePairs,
    Layout,
    SREvalDataset,
    SRTrainDataset,
    find_layout,
    from_folder_hr_only,
    from_gopro,
    from_paired_folders,
    load_folder,
    make_lr,
)
from nmrestore.data.degradations import Degradation, GaussianNoise, MotionBlur, motion_blur_kernel
from nmrestore.data.io import IMAGE_EXTENSIONS, list_images, read_image, to_tensor, to_uint8, write_image
from nmrestore.data.loader import EpochSampler, build_eval_loader, build_train_loader
from nmrestore.data.restoration import DegradedEvalDataset, DegradedTrainDataset
from nmrestore.data.transforms import augment, random_crop_pair

__all__ = [
    "BUILTIN_TEST",
    "BUILTIN_TRAIN",
    "IMAGE_EXTENSIONS",
    "Degradation",
    "DegradedEvalDataset",
    "DegradedTrainDataset",
    "EpochSampler",
    "GaussianNoise",
    "ImageList",
    "ImagePairs",
    "Layout",
    "MotionBlur",
    "SREvalDataset",
    "SRTrainDataset",
    "augment",
    "build_eval_loader",
    "build_train_loader",
    "export_builtin",
    "find_layout",
    "from_folder_hr_only",
    "from_gopro",
    "from_paired_folders",
    "list_images",
    "load_builtin",
    "load_folder",
    "make_lr",
    "motion_blur_kernel",
    "random_crop_pair",
    "read_image",
    "to_tensor",
    "to_uint8",
    "write_image",
]
