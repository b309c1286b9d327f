"""The photo set: a tiny .deb made here stands in for mate-backgrounds (no network in tests)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.data.datasets import find_layout, load_folder, make_lr
from nmrestore.data.photos import PHOTO_SPLITS, obtain_photos, read_deb_members
from nmrestore.errors import DatasetError

NAMES = [name for names in PHOTO_SPLITS.values() for name in names]
COPYRIGHT = (
    "Format: copyright-format/1.0\nUpstream-Name: MATE Backgrounds\n\n"
    "Files: nature/Aqua.jpg\nCopyright: 2008, Someone\nLicense: GPL-2+\n\n"
    "Files: desktop/Other.png\nCopyright: 2013, Someone Else\nLicense: GPL-2+\n"
)


def _jpeg(seed: int, size: tuple[int, int] = (40, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    out = bytearray(b"!<arch>\n")
    for name, blob in members.items():
        header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(blob):<10}`\n".encode()
        assert len(header) == 60
        out += header + blob + (b"\n" if len(blob) % 2 else b"")
    return bytes(out)


def make_deb(path: Path, names: list[str] = NAMES) -> Path:
    """A minimal mate-backgrounds-like package: ar(debian-binary, control.tar.xz, data.tar.xz)."""
    data = {f"usr/share/backgrounds/mate/nature/{n}.jpg": _jpeg(i) for i, n in enumerate(names)}
    data["usr/share/doc/mate-backgrounds/copyright"] = COPYRIGHT.encode()
    control = _tar_xz({"control": b"Package: mate-backgrounds\nVersion: 9.9-test\n"})
    path.write_bytes(_ar({"debian-binary": b"2.0\n", "control.tar.xz": control, "data.tar.xz": _tar_xz(data)}))
    return path


@pytest.fixture
def deb(tmp_path: Path) -> Path:
    return make_deb(tmp_path / "mate-backgrounds_9.9-test_all.deb")


def test_writes_the_fixed_split_in_the_div2k_layout(tmp_path: Path, deb: Path) -> None:
    result = obtain_photos(tmp_path / "photos", deb=deb, installed_dir=tmp_path / "none")
    assert result.created and result.counts == {"train": 8, "valid": 1, "test": 3}
    for split, names in PHOTO_SPLITS.items():
        files = sorted(p.stem for p in result.split_dir(split).glob("*.png"))
        assert files == sorted(names)
    # the photos are the package's JPEGs decoded, unchanged
    original = np.asarray(Image.open(io.BytesIO(_jpeg(NAMES.index("TwoWings")))).convert("RGB"))
    written = np.asarray(Image.open(result.split_dir("valid") / "TwoWings.png"))
    assert np.array_equal(original, written)
    licence = (result.root / "LICENSE.txt").read_text()
    assert "GPL-2+" in licence and "nature/Aqua.jpg" in licence and "desktop/Other.png" not in licence
    assert "mate-backgrounds 9.9-test, sha256" in (result.root / "SOURCE.txt").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_the_layout_is_read_by_split(tmp_path: Path, deb: Path) -> None:
    root = obtain_photos(tmp_path / "photos", deb=deb, installed_dir=tmp_path / "none").root
    assert find_layout(root, 2, split="test").hr_dir.name == "PHOTOS_test_HR"
    assert find_layout(root, 2, split="val").hr_dir.name == "PHOTOS_valid_HR"
    pairs = load_folder(root, 2, split="train")
    assert [name for name, _ in pairs.gt] == sorted(PHOTO_SPLITS["train"])
    layout = find_layout(root, 4, split="test")
    assert layout.lr_dir == root / "PHOTOS_test_LR_bicubic" / "X4"
    test = load_folder(root, 4, split="test")
    assert test.lq is not None
    for (name, hr), (_, lr) in zip(test.gt, test.lq, strict=True):
        assert np.array_equal(lr, make_lr(hr, 4)), name  # the shipped LR is MATLAB bicubic of the HR
    with pytest.raises(DatasetError, match="several HR folders"):
        find_layout(root, 2)


def test_a_second_run_is_a_no_op(tmp_path: Path, deb: Path) -> None:
    out = tmp_path / "photos"
    obtain_photos(out, deb=deb, installed_dir=tmp_path / "none")
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = obtain_photos(out, deb=tmp_path / "missing.deb", installed_dir=tmp_path / "none")
    assert not again.created
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp


def test_a_damaged_set_is_not_taken_as_complete(tmp_path: Path, deb: Path) -> None:
    out = obtain_photos(tmp_path / "photos", deb=deb, installed_dir=tmp_path / "none").root
    (out / "PHOTOS_test_HR" / "RainDrops.png").write_bytes(b"changed")
    with pytest.raises(DatasetError, match="not a complete photo set"):
        obtain_photos(out, deb=deb, installed_dir=tmp_path / "none")


@pytest.mark.parametrize("keep", [100, 5000, -7])
def test_a_truncated_package_is_one_error_and_writes_nothing(tmp_path: Path, deb: Path, keep: int) -> None:
    broken = tmp_path / "broken.deb"
    broken.write_bytes(deb.read_bytes()[:keep])
    out = tmp_path / "photos"
    with pytest.raises(DatasetError, match=r"broken\.deb: (truncated|corrupt)"):
        obtain_photos(out, deb=broken, installed_dir=tmp_path / "none")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.deb", deb.name]


def test_a_package_without_the_photos_is_named(tmp_path: Path) -> None:
    other = make_deb(tmp_path / "other.deb", names=NAMES[:5])
    with pytest.raises(DatasetError, match=r"lacks .*\(is it mate-backgrounds"):
        obtain_photos(tmp_path / "photos", deb=other, installed_dir=tmp_path / "none")


def test_the_installed_package_folder_is_used_when_present(tmp_path: Path) -> None:
    installed = tmp_path / "installed"
    installed.mkdir()
    for i, name in enumerate(NAMES):
        (installed / f"{name}.jpg").write_bytes(_jpeg(i))
    result = obtain_photos(tmp_path / "photos", installed_dir=installed)
    assert result.counts["train"] == 8
    assert "installed package" in (result.root / "SOURCE.txt").read_text()


def test_without_apt_and_without_a_deb_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nmrestore.data.photos.shutil.which", lambda name: None)
    monkeypatch.setattr("nmrestore.data.photos.INSTALLED_DIR", tmp_path / "none")
    result = CliRunner().invoke(app, ["data", "photos", "--out", str(tmp_path / "photos")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "--deb FILE" in lines[0] and "mate-backgrounds" in lines[0]
    assert not (tmp_path / "photos").exists()


def test_cli_writes_then_reports_complete(tmp_path: Path, deb: Path) -> None:
    out = tmp_path / "photos"
    first = CliRunner().invoke(app, ["data", "photos", "--out", str(out), "--deb", str(deb)])
    assert first.exit_code == 0, first.output
    assert "train 8, valid 1, test 3" in first.output
    second = CliRunner().invoke(app, ["data", "photos", "--out", str(out), "--deb", str(deb)])
    assert second.exit_code == 0 and "already complete" in second.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["files"]) == 12 * 4  # HR + LR x2, x3, x4


def test_read_deb_members_filters_paths(tmp_path: Path, deb: Path) -> None:
    files = read_deb_members(deb, lambda p: p.endswith("copyright"))
    assert list(files) == ["usr/share/doc/mate-backgrounds/copyright"]
