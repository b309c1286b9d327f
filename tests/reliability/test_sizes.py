"""Sizes and thread counts are bounded up front, and large images are restored tile by tile.

Before: ``cost``/``speed --input 0x0`` or negative sizes gave tracebacks, ``speed --input
4000x4000`` an allocator failure, ``--threads 100000`` a segfault, ``infer --adaptive`` on an image
under 4 px a conv traceback, and an 8000x8000 PNG of ~186 KB a run of minutes and gigabytes.
"""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nmrestore.cli.main import app
from nmrestore.engine.tiling import MAX_OVERLAP, choose_overlap, is_global, receptive_radius, run_tiled
from nmrestore.limits import MAX_INFER_OUTPUT_PIXELS, available_cpus
from nmrestore.models import create_model
from tests.reliability.helpers import fails_cleanly, image, runner, tiny_checkpoint


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["cost", "edsr_small", "--input", "0x0"], ["--input 0x0", "between 1 and 16384"]),
        (["cost", "edsr_small", "--input", "-5x10"], ["--input -5x10", "between 1 and 16384"]),
        (["cost", "edsr_small", "--input", "20000x10"], ["between 1 and 16384"]),
        (["cost", "edsr_small", "--input", "12x"], ["WIDTHxHEIGHT"]),
        (["cost", "rfdn_small", "--input", "1x1"], ["rfdn_small cannot run on a 1x1 input"]),
        (["speed", "edsr_small", "--sparsity", "2:4", "--input", "0x0"], ["between 1 and 16384"]),
        (["speed", "edsr_small", "--sparsity", "2:4", "--input", "-1x-1"], ["between 1 and 16384"]),
        (
            ["speed", "edsr_small", "--sparsity", "2:4", "--input", "4000x4000"],
            ["8000x8000 output", "3840x2160"],
        ),
        (["speed", "edsr_small", "--sparsity", "2:4", "--threads", "100000"], ["--threads", "100000"]),
        (["speed", "edsr_small", "--sparsity", "2:4", "--threads", "0"], ["--threads", "got 0"]),
        (["speed", "edsr_small", "--sparsity", "2:4", "--threads", "-4"], ["--threads", "got -4"]),
    ],
    ids=[
        "cost-0x0",
        "cost-negative",
        "cost-too-wide",
        "cost-malformed",
        "cost-too-small-for-the-model",
        "speed-0x0",
        "speed-negative",
        "speed-4000x4000",
        "speed-threads-100000",
        "speed-threads-0",
        "speed-threads-negative",
    ],
)
def test_sizes_and_threads_are_refused_up_front(args: list[str], needles: list[str]) -> None:
    started = time.perf_counter()
    fails_cleanly(args, *needles)
    assert time.perf_counter() - started < 60  # refused before any real work


def test_the_largest_thread_count_is_accepted() -> None:
    result = runner.invoke(
        app,
        [
            "speed",
            "fsrcnn_small",
            "--sparsity",
            "2:4",
            "--input",
            "16x16",
            "--threads",
            str(available_cpus()),
            "--repeats",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _big_flat_png(path: Path, width: int, height: int) -> Path:
    """A valid, fully decodable RGB PNG of one grey; compressed row by row (small memory)."""
    packer = zlib.compressobj(9)
    row = b"\x00" + bytes([128]) * (3 * width)
    data = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )
    return path


def test_an_8000x8000_png_is_refused_before_decoding(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "best.safetensors")
    big = _big_flat_png(tmp_path / "big.png", 8000, 8000)
    print(f"big.png: {big.stat().st_size:,} bytes")
    assert big.stat().st_size < 400_000 and Image.open(big).size == (8000, 8000)
    small = image(tmp_path / "small.png")
    started = time.perf_counter()
    fails_cleanly(
        ["infer", str(checkpoint), str(small), str(big), "--out", str(tmp_path / "out")],
        "big.png: 8000x8000 at x2 gives a 16000x16000 output (256.0 Mpx)",
        f"{MAX_INFER_OUTPUT_PIXELS / 1e6:.1f} Mpx",
    )
    assert time.perf_counter() - started < 30
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def classpruning(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from nmrestore.engine.runner import train
    from nmrestore.recipes.schema import recipe_from_dict
    from tests.methods.classpruning.test_program import _recipe_dict

    run = tmp_path_factory.mktemp("cp") / "run"
    train(recipe_from_dict(_recipe_dict()), run, show_progress=False)
    return run


@pytest.mark.parametrize(("height", "width"), [(1, 1), (3, 3), (3, 40), (40, 2)])
def test_infer_adaptive_refuses_images_under_4_px(
    classpruning: Path, tmp_path: Path, height: int, width: int
) -> None:
    tiny = image(tmp_path / "tiny.png", height, width)
    fails_cleanly(
        ["infer", str(classpruning), str(tiny), "--out", str(tmp_path / "out"), "--adaptive"],
        f"{width}x{height} px is too small for --adaptive",
    )
    assert not (tmp_path / "out").exists()


def test_infer_adaptive_refuses_a_patch_under_4_px(classpruning: Path, tmp_path: Path) -> None:
    ok = image(tmp_path / "ok.png", 16, 16)
    fails_cleanly(
        [
            "infer",
            str(classpruning),
            str(ok),
            "--out",
            str(tmp_path / "out"),
            "--adaptive",
            "--patch",
            "2",
            "--stride",
            "2",
        ],
        "--patch 2 is too small",
    )


def test_infer_adaptive_takes_a_4_px_image(classpruning: Path, tmp_path: Path) -> None:
    four = image(tmp_path / "four.png", 4, 4)
    result = runner.invoke(
        app, ["infer", str(classpruning), str(four), "--out", str(tmp_path / "out"), "--adaptive"]
    )
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------- tiling

TILED_MODELS = {
    "edsr_small": {"n_feats": 8, "n_blocks": 2},
    "carn_small": {"n_feats": 16},
    "unet_small": {},
    "fsrcnn_small": {},
}


@pytest.mark.parametrize("name", list(TILED_MODELS))
def test_tiled_inference_equals_untiled(name: str, one_thread: None) -> None:
    torch.manual_seed(0)
    model = create_model(name, **TILED_MODELS[name]).eval()
    overlap = choose_overlap(model, 3)
    radius = receptive_radius(model, 3)
    assert radius is not None and overlap >= radius
    x = torch.rand(1, 3, 45, 70)
    with torch.no_grad():
        full = model(x).clamp(0, 1)
    tiled = run_tiled(model, x, 16, overlap, as_uint8=False)  # 3 x 5 tiles of 16 LR px
    assert isinstance(tiled, torch.Tensor) and tiled.shape == full.shape
    assert float((tiled - full).abs().max()) <= 1e-5


class _GlobalMean(torch.nn.Module):
    """A 3x3 conv plus the image mean: a global operation in its simplest form."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + x.mean(dim=(2, 3), keepdim=True)


def test_a_global_model_gets_the_largest_overlap(one_thread: None) -> None:
    torch.manual_seed(0)
    model = _GlobalMean().eval()
    assert is_global(model, 3)
    assert choose_overlap(model, 3) == MAX_OVERLAP
    assert not is_global(create_model("edsr_small", n_feats=8, n_blocks=2).eval(), 3)


def test_infer_tiles_through_the_cli_like_an_untiled_run(tmp_path: Path) -> None:
    checkpoint = tiny_checkpoint(tmp_path / "best.safetensors")
    photo = image(tmp_path / "photo.png", 45, 70)
    outputs = {}
    for tile in ("0", "16"):
        result = runner.invoke(
            app, ["infer", str(checkpoint), str(photo), "--out", str(tmp_path / tile), "--tile", tile]
        )
        assert result.exit_code == 0, result.output
        outputs[tile] = np.asarray(Image.open(tmp_path / tile / "photo.png"), dtype=np.int16)
    assert outputs["0"].shape == outputs["16"].shape == (90, 140, 3)
    assert int(np.abs(outputs["0"] - outputs["16"]).max()) <= 1  # float rounding may move one 8-bit step
    fails_cleanly(
        ["infer", str(checkpoint), str(photo), "--out", str(tmp_path / "x"), "--tile", "-1"], "--tile"
    )
