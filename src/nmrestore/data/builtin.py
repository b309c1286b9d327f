"""The built-in sample set: natural photos shipped inside the scikit-image wheel.

nmrestore must run (demo, tests, CI) with no network and no dataset download, so it trains and
evaluates on the handful of real photographs that scikit-image installs as plain files under
``skimage/data/`` (the ones its ``skimage.data`` functions read locally; the pooch-fetched extras
are never touched). Only natural photographs are used -- no synthetic test charts, text scans,
microscopy or medical images -- because SR networks learn natural-image statistics.

The split is fixed here, once, so every run and every paper-style table uses the same images:

* test (3): ``chelsea`` (cat, RGB 451x300), ``coffee`` (RGB 600x400), ``camera`` (cameraman,
  grayscale 512x512) -- two colour images and one grayscale, the Set5-like mix of content;
* train (8): ``astronaut``, ``rocket``, ``motorcycle_left``, ``coins``, ``moon``, ``brick``,
  ``grass``, ``gravel`` -- faces, objects, fine texture.

``motorcycle_right`` is deliberately left out: it is the other view of the same stereo pair as
``motorcycle_left`` and would leak near-duplicate content between any two sets it were split across.
Grayscale photos are replicated to RGB by :func:`nmrestore.data.io.read_image`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Literal

import numpy as np

from nmrestore.data.io import read_image, write_image
from nmrestore.errors import DatasetError

__all__ = [
    "BUILTIN_FILES",
    "BUILTIN_TEST",
    "BUILTIN_TRAIN",
    "builtin_data_dir",
    "export_builtin",
    "load_builtin",
]

#: Image name -> file name inside ``skimage/data/``.
BUILTIN_FILES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "rocket": "rocket.jpg",
    "motorcycle_left": "motorcycle_left.png",
    "coins": "coins.png",
    "moon": "moon.png",
    "brick": "brick.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "chelsea": "chelsea.png",
    "coffee": "coffee.png",
    "camera": "camera.png",
}

#: Training images of the built-in set (fixed; disjoint from :data:`BUILTIN_TEST`).
BUILTIN_TRAIN: tuple[str, ...] = (
    "astronaut",
    "rocket",
    "motorcycle_left",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)

#: Test images of the built-in set (fixed).
BUILTIN_TEST: tuple[str, ...] = ("chelsea", "coffee", "camera")

Split = Literal["train", "test"]


def builtin_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image, found without importing skimage.

    Locating it through the package spec avoids scikit-image's import-time machinery (and any
    chance of its fetcher reaching for the network).
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("scikit-image is not installed; the built-in image set ships inside it")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data"
        if candidate.is_dir():
            return candidate
    raise DatasetError("scikit-image is installed but has no data/ folder; cannot load the built-in set")


def _names(split: str) -> tuple[str, ...]:
    if split == "train":
        return BUILTIN_TRAIN
    if split == "test":
        return BUILTIN_TEST
    raise DatasetError(f"unknown built-in split {split!r}; expected 'train' or 'test'")


@functools.cache
def _load_one(name: str) -> np.ndarray:
    path = builtin_data_dir() / BUILTIN_FILES[name]
    if not path.is_file():
        raise DatasetError(f"built-in image {name!r} is missing from scikit-image ({path})")
    arr = read_image(path)
    arr.setflags(write=False)  # the cached copy is shared; callers get their own copies
    return arr


def load_builtin(split: Split) -> list[tuple[str, np.ndarray]]:
    """The built-in ``split`` as ``(name, H x W x 3 uint8)`` pairs, in the fixed documented order.

    Files are decoded once per process and cached; each call returns fresh, writable copies.
    """
    return [(name, _load_one(name).copy()) for name in _names(split)]


def export_builtin(folder: str | os.PathLike[str], split: Split) -> list[Path]:
    """Write the built-in ``split`` as ``{name}.png`` files into ``folder`` (created if needed).

    Lets the folder-based dataset code (and users) work on the built-in images like on any other
    HR-only folder. Returns the written paths.
    """
    out = Path(folder)
    return [write_image(out / f"{name}.png", arr) for name, arr in load_builtin(split)]
