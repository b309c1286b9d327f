"""Bad input through the CLI: exit code 2, one line naming the thing, nothing half-written.

The library-level cases live in tests/data, tests/recipes, tests/engine, tests/export and
tests/methods; tests/cli/test_cli.py covers a truncated PNG, an empty --hr-dir, an unknown recipe
key, ``cost --sparsity 2:64`` and a checkpoint of another architecture. This file adds the rest,
each through the command line *and* (where cheap) the library call underneath, asserting the
project's own error type.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.data.datasets import load_folder
from nmrestore.data.io import read_image
from nmrestore.engine.checkpoint import load_checkpoint
from nmrestore.engine.loading import load_any
from nmrestore.errors import (
    BudgetError,
    CheckpointError,
    DatasetError,
    ImageError,
    RecipeError,
    SparsityError,
)
from nmrestore.recipes import load_recipe
from tests.conftest import tiny_recipe_dict
from tests.reliability.helpers import fails_cleanly

runner = CliRunner()
NOISE = np.random.default_rng(10).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- helpers


def _encode(arr: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(arr)
    if mode is not None:
        image = image.convert(mode)
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png16_rgb(arr: np.ndarray) -> bytes:
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + (arr[y].astype(">u2") * 257).tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _flip_inside(data: bytes, marker: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[data.index(marker) + offset] ^= 0xFF
    return bytes(out)


def _huge_png() -> bytes:
    png = _encode(NOISE, "PNG")
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", 100_000, 100_000)
    chunk = _chunk(b"IHDR", bytes(ihdr))
    return png[:8] + chunk + png[8 + len(chunk) :]


_fails_cleanly = fails_cleanly  # the shared helper; the name other test modules import


def _recipe(path: Path, **sections: Any) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    return path


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dense edsr_small x2 checkpoint (2 steps) made through `nmrestore train`."""
    folder = tmp_path_factory.mktemp("bad_input")
    recipe = _recipe(folder / "recipe.yaml", train={"steps": 2, "val_every": 2, "ckpt_every": 2})
    result = runner.invoke(app, ["train", str(recipe), "--out", str(folder / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return folder / "run" / "checkpoints" / "last.safetensors"


# ----------------------------------------------------------------------------- broken images


BROKEN: dict[str, tuple[str, Any]] = {
    "truncated.png": ("PNG", lambda: _encode(NOISE, "PNG")[:60]),
    "corrupt.png": ("PNG", lambda: _flip_inside(_encode(NOISE, "PNG"), b"IDAT", 8)),
    "truncated.jpg": ("JPEG", lambda: _encode(NOISE, "JPEG")[:200]),
    "corrupt.jpg": ("JPEG", lambda: _flip_inside(_encode(NOISE, "JPEG"), b"\xff\xda", 5)),
    "zero.png": ("-", lambda: b""),
    "notes.png": ("-", lambda: b"this is a text file, not an image\n" * 4),
    "bomb.png": ("PNG", _huge_png),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_infer_refuses_a_broken_image_and_writes_nothing(trained: Path, tmp_path: Path, name: str) -> None:
    bad = tmp_path / name
    bad.write_bytes(BROKEN[name][1]())
    good = tmp_path / "good.png"
    good.write_bytes(_encode(NOISE, "PNG"))
    with pytest.raises(ImageError, match=name.replace(".", r"\.")):
        read_image(bad)
    out = tmp_path / "out"
    message = _fails_cleanly(["infer", str(trained), str(good), str(bad), "--out", str(out)], name)
    if name == "bomb.png":
        assert "too large" in message
    assert not out.exists()  # every input is read before anything is written


CONVERTED: dict[str, Any] = {
    "gray.png": lambda: _encode(NOISE, "PNG", "L"),
    "rgba.png": lambda: _encode(NOISE, "PNG", "RGBA"),
    "rgb16.png": lambda: _png16_rgb(NOISE),
    "cmyk.jpg": lambda: _encode(NOISE, "JPEG", "CMYK"),
}


def test_infer_accepts_gray_rgba_16bit_and_cmyk(trained: Path, tmp_path: Path) -> None:
    paths = []
    for name, make in CONVERTED.items():
        path = tmp_path / name
        path.write_bytes(make())
        array = read_image(path)
        assert array.shape == (12, 10, 3) and array.dtype == np.uint8, name
        paths.append(path)
    out = tmp_path / "out"
    result = runner.invoke(app, ["infer", str(trained), *map(str, paths), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for path in paths:
        with Image.open(out / f"{path.stem}.png") as written:
            assert written.mode == "RGB" and written.size == (20, 24), path.name


# ----------------------------------------------------------------------------- datasets


def test_eval_lr_hr_size_mismatch_on_a_benchmark_layout(trained: Path, tmp_path: Path) -> None:
    root = tmp_path / "Set1"
    (root / "HR").mkdir(parents=True)
    (root / "LR_bicubic" / "X2").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "HR" / "baby.png")
    Image.fromarray(np.zeros((8, 7, 3), np.uint8)).save(root / "LR_bicubic" / "X2" / "babyx2.png")
    with pytest.raises(DatasetError, match=r"babyx2\.png"):
        load_folder(root, 2)
    _fails_cleanly(["eval", str(trained), "--hr-dir", str(root)], "babyx2.png", "baby.png")


def test_train_on_an_empty_folder_names_it_and_writes_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    source = {"source": "folder", "root": str(folder)}
    recipe = _recipe(tmp_path / "r.yaml", data={"train": {**tiny_recipe_dict()["data"]["train"], **source}})
    with pytest.raises(DatasetError, match="photos"):
        load_folder(folder, 2)
    message = _fails_cleanly(
        ["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"], str(folder)
    )
    assert "no known dataset layout" in message or "no images" in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()


# ----------------------------------------------------------------------------- recipes


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("trian: {steps: 3}\n", "trian"),
        ("train: {steps: many}\n", "train.steps"),
        ("model: {scale: [2, 3]}\n", "model.scale"),
        ("train: [1, 2]\n", "train"),
    ],
    ids=["unknown-top-key", "wrong-type-int", "wrong-type-list", "section-not-a-mapping"],
)
def test_train_refuses_a_bad_recipe(tmp_path: Path, body: str, needle: str) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(body)
    with pytest.raises(RecipeError):
        load_recipe(recipe)
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run")], needle)
    assert not (tmp_path / "run").exists()


def test_a_recipe_with_an_m_that_divides_no_layer(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r.yaml", sparsity={"method": "oneshot", "n": 2, "m": 64})
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"], "M=64")
    assert not (tmp_path / "run" / "checkpoints").exists()
    from nmrestore.models import create_model
    from nmrestore.sparsity import NMConfig, sparsify_

    with pytest.raises(SparsityError):
        sparsify_(create_model("edsr_small", scale=2, n_feats=8, n_blocks=1), NMConfig(n=2, m=64))


def test_an_sls_budget_below_one_of_m(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r.yaml", sparsity={"method": "sls", "m": 8, "budget": 0.05})
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"], "budget")
    assert not (tmp_path / "run" / "checkpoints").exists()
    from nmrestore.engine.runner import apply_sparsity, base_model

    parsed = load_recipe(recipe)
    with pytest.raises(BudgetError):
        apply_sparsity(base_model(parsed), parsed)


# ----------------------------------------------------------------------------- training faults


def test_inf_loss_through_the_cli_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    """The library-level TrainingError is pinned in tests/engine/test_trainer.py; this is the CLI."""
    # lr = 1e30 with Adam: after the first update the weights are ~1e30 and the next loss overflows.
    recipe = _recipe(tmp_path / "r.yaml", train={"steps": 6, "lr": 1e30, "ckpt_every": 1, "val_every": 100})
    message = _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"], "loss")
    assert "nan" in message.lower() or "inf" in message.lower(), message
    kept = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.safetensors")  # verifies the checksum
    assert kept.step >= 1
    assert all(bool(v.isfinite().all()) for v in kept.model_state.values() if v.is_floating_point())


def test_an_overflowing_learning_rate_is_a_clean_error(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r.yaml", train={"steps": 2, "lr": 1e38, "val_every": 100})
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"])


# ----------------------------------------------------------------------------- checkpoints


def test_init_from_a_checkpoint_of_another_scale(trained: Path, tmp_path: Path) -> None:
    recipe = _recipe(tmp_path / "r.yaml", model={"scale": 3})
    _fails_cleanly(
        [
            "train",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"train.init_from={trained}",
            "--no-progress",
        ],
        "x2",
        "x3",
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_refuses_a_tampered_packed_checkpoint(trained: Path, tmp_path: Path) -> None:
    packed = tmp_path / "model.packed.safetensors"
    result = runner.invoke(app, ["export", str(trained), "--format", "packed", "--out", str(packed)])
    assert result.exit_code == 0, result.output
    assert packed.is_file()
    data = bytearray(packed.read_bytes())
    data[-max(1, math.floor(len(data) * 0.1))] ^= 0x01  # one bit in the tensor payload
    packed.write_bytes(bytes(data))
    with pytest.raises(CheckpointError):
        load_any(packed)
    _fails_cleanly(["eval", str(packed)], packed.name)
