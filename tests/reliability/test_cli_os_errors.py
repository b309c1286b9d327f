"""OS errors through the CLI: one line ``error: ...``, exit 2, nothing half-written.

A read-only output folder, a full disk (simulated by failing ``fsync`` with ENOSPC, and for real
on an 8 KiB tmpfs when the tests run as root), ``--out`` naming an existing file, a file where a
folder is expected and a folder where a file is expected, each for ``infer``, ``export`` and
``train``. Root ignores permission bits, so as root the read-only folder is a read-only tmpfs.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_recipe_dict
from tests.reliability.helpers import fails_cleanly, image, is_root, listing, tiny_checkpoint

COMMANDS = ["infer", "export-packed", "train"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("os_errors")
    recipe = folder / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(train={"steps": 2, "val_every": 2, "ckpt_every": 2})))
    return {
        "checkpoint": tiny_checkpoint(folder / "best.safetensors"),
        "image": image(folder / "x.png"),
        "recipe": recipe,
    }


def _args(command: str, inputs: dict[str, Path], out: Path) -> list[str]:
    """``command`` writing to ``out`` (a folder for infer/train, a file for export)."""
    if command == "infer":
        return ["infer", str(inputs["checkpoint"]), str(inputs["image"]), "--out", str(out)]
    if command == "export-packed":
        return ["export", str(inputs["checkpoint"]), "--out", str(out)]
    return ["train", str(inputs["recipe"]), "--out", str(out), "--no-progress"]


def _target(command: str, folder: Path) -> Path:
    return folder / ("m.packed.safetensors" if command == "export-packed" else "out")


def _mount(folder: Path, options: str) -> bool:
    if not is_root() or sys.platform != "linux":
        return False
    folder.mkdir(exist_ok=True)
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "ro"
    if _mount(folder, "ro,size=64k"):
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=False)
        return
    if is_root():
        pytest.skip("running as root without mount: permission bits would not stop a write")
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def full_dir(tmp_path: Path) -> Iterator[Path]:
    """A real, completely full 8 KiB tmpfs (root only)."""
    folder = tmp_path / "full"
    if not _mount(folder, "size=8k"):
        pytest.skip("mounting a tmpfs needs root on Linux")
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 1024)
                f.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _no_temp_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_output_folder(inputs: dict[str, Path], readonly_dir: Path, command: str) -> None:
    target = _target(command, readonly_dir)
    message = fails_cleanly(_args(command, inputs, target), str(readonly_dir))
    assert "read-only file system" in message or "permission denied" in message
    assert listing(readonly_dir) == {}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_simulated(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    """Every file goes through the atomic writer's fsync: failing it is a disk filling up."""

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    target = _target(command, tmp_path / "dest")
    fails_cleanly(_args(command, inputs, target), "no space left on device")
    monkeypatch.undo()
    assert not target.is_file()
    if (tmp_path / "dest").exists():
        _no_temp_files(tmp_path / "dest")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_really_full_disk(inputs: dict[str, Path], full_dir: Path, command: str) -> None:
    target = _target(command, full_dir)
    fails_cleanly(_args(command, inputs, target), "no space left on device")
    assert not target.is_file()
    _no_temp_files(full_dir)


@pytest.mark.parametrize(
    ("command", "needle"),
    [("infer", "is a file; infer writes into a folder"), ("train", "not a folder (a file is in the way)")],
)
def test_out_naming_an_existing_file(
    inputs: dict[str, Path], tmp_path: Path, command: str, needle: str
) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    fails_cleanly(_args(command, inputs, existing), str(existing), needle)
    assert existing.read_text() == "keep me\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_where_a_folder_is_expected(inputs: dict[str, Path], tmp_path: Path, command: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder\n")
    target = blocker / "sub" / ("m.packed.safetensors" if command == "export-packed" else "out")
    fails_cleanly(_args(command, inputs, target), "blocker", "not a folder (a file is in the way)")
    assert blocker.read_text() == "a file, not a folder\n"


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("export-packed", "is a folder, expected a file"),
        ("export-onnx", "is a folder; give the ONNX file name"),
        ("infer-output-name", "is a folder; infer cannot write its output there"),
    ],
)
def test_a_folder_where_a_file_is_expected(
    inputs: dict[str, Path], tmp_path: Path, case: str, needle: str
) -> None:
    folder = tmp_path / "dest"
    folder.mkdir()
    if case == "infer-output-name":
        (folder / "x.png").mkdir()  # the output x.png would have to replace a folder
        args = _args("infer", inputs, folder)
    else:
        args = ["export", str(inputs["checkpoint"]), "--out", str(folder)]
        if case == "export-onnx":
            pytest.importorskip("onnx")
            args += ["--format", "onnx"]
    fails_cleanly(args, str(folder), needle)
    _no_temp_files(folder)
