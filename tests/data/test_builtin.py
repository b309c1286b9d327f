"""The built-in image set: offline, fixed split, disjoint, natural photos as RGB uint8."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest

from nmrestore.data import builtin
from nmrestore.data.builtin import (
    BUILTIN_FILES,
    BUILTIN_TEST,
    BUILTIN_TRAIN,
    builtin_data_dir,
    export_builtin,
    load_builtin,
)
from nmrestore.data.datasets import from_folder_hr_only
from nmrestore.errors import DatasetError


def test_split_is_fixed_and_disjoint() -> None:
    assert BUILTIN_TRAIN == (
        "astronaut",
        "rocket",
        "motorcycle_left",
        "coins",
        "moon",
        "brick",
        "grass",
        "gravel",
    )
    assert BUILTIN_TEST == ("chelsea", "coffee", "camera")
    assert not set(BUILTIN_TRAIN) & set(BUILTIN_TEST)
    assert set(BUILTIN_TRAIN) | set(BUILTIN_TEST) == set(BUILTIN_FILES)
    assert "motorcycle_right" not in BUILTIN_FILES  # near-duplicate of motorcycle_left


def test_files_ship_with_scikit_image() -> None:
    data_dir = builtin_data_dir()
    for file_name in BUILTIN_FILES.values():
        assert (data_dir / file_name).is_file()


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_builtin(split: str) -> None:
    images = load_builtin(split)  # type: ignore[arg-type]
    expected = BUILTIN_TRAIN if split == "train" else BUILTIN_TEST
    assert [name for name, _ in images] == list(expected)
    for name, arr in images:
        assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3, name
        assert min(arr.shape[:2]) >= 256, name  # big enough for x4 patches of 64 LR pixels
        assert arr.std() > 10, name  # real content, not a blank file


def test_grayscale_photo_replicated() -> None:
    camera = dict(load_builtin("test"))["camera"]
    assert camera.shape == (512, 512, 3)
    np.testing.assert_array_equal(camera[..., 0], camera[..., 2])
    chelsea = dict(load_builtin("test"))["chelsea"]
    assert chelsea.shape == (300, 451, 3)
    assert not np.array_equal(chelsea[..., 0], chelsea[..., 2])  # a colour photo stays colour


def test_returns_independent_copies() -> None:
    first = load_builtin("test")
    first[0][1][:] = 0
    again = load_builtin("test")
    assert again[0][1].any()
    assert again[0][1].flags.writeable


def test_loads_without_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("the built-in set must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    builtin._load_one.cache_clear()
    assert len(load_builtin("test")) == 3


def test_unknown_split() -> None:
    with pytest.raises(DatasetError, match="valid"):
        load_builtin("valid")  # type: ignore[arg-type]


def test_export_builtin_roundtrip(tmp_path: Path) -> None:
    paths = export_builtin(tmp_path / "test_set", "test")
    assert [p.name for p in paths] == [f"{n}.png" for n in BUILTIN_TEST]
    from_folder = dict(from_folder_hr_only(tmp_path / "test_set"))
    for name, arr in load_builtin("test"):
        np.testing.assert_array_equal(from_folder[name], arr)
