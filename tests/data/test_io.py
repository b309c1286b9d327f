"""Image reading/writing: every broken-file case names the file; every mode conversion is pinned."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from nmrestore.data.io import (
    DEFAULT_MAX_PIXELS,
    list_images,
    read_image,
    to_tensor,
    to_uint8,
    write_image,
)
from nmrestore.errors import DatasetError, ImageError

RNG = np.random.default_rng(1234)
NOISE = RNG.integers(0, 256, size=(48, 40, 3), dtype=np.uint8)


def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG (gray, gray+alpha, RGB, RGBA) written by hand: Pillow cannot write these."""
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def _with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """Patch a PNG's declared size (and the IHDR CRC) without touching its pixel data."""
    assert png[12:16] == b"IHDR"
    ihdr = bytearray(png[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    chunk = _chunk(b"IHDR", bytes(ihdr))
    return png[:8] + chunk + png[8 + len(chunk) :]


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- broken files


def test_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"nope\.png.*does not exist"):
        read_image(tmp_path / "nope.png")


def test_zero_byte_file(tmp_path: Path) -> None:
    p = _write(tmp_path / "empty.png", b"")
    with pytest.raises(ImageError, match=r"empty\.png.*empty"):
        read_image(p)


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageError, match=r"dir\.png"):
        read_image(tmp_path / "dir.png")


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    p = _write(tmp_path / "x.png", b"this is not an image at all\n" * 10)
    with pytest.raises(ImageError, match=r"x\.png.*not a recognised image"):
        read_image(p)


def test_truncated_png(tmp_path: Path) -> None:
    data = _png_bytes(NOISE)
    p = _write(tmp_path / "half.png", data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.png.*(truncated|corrupt)"):
        read_image(p)


def test_truncated_png_fails_even_if_pillow_is_told_to_tolerate_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = _png_bytes(NOISE)
    p = _write(tmp_path / "half.png", data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.png"):
        read_image(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the global switch is restored


def test_corrupt_png_data(tmp_path: Path) -> None:
    data = bytearray(_png_bytes(NOISE))
    idat = data.find(b"IDAT")
    data[idat + 10 : idat + 60] = bytes(50)  # zlib stream destroyed
    p = _write(tmp_path / "corrupt.png", bytes(data))
    with pytest.raises(ImageError, match=r"corrupt\.png"):
        read_image(p)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_bytes(NOISE)
    p = _write(tmp_path / "half.jpg", data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"half\.jpg.*truncated"):
        read_image(p)


def test_corrupt_jpeg_scan_header(tmp_path: Path) -> None:
    data = bytearray(_jpeg_bytes(NOISE))
    sos = data.find(b"\xff\xda")
    data[sos + 2 : sos + 14] = bytes(12)
    p = _write(tmp_path / "bad.jpeg", bytes(data))
    with pytest.raises(ImageError, match=r"bad\.jpeg"):
        read_image(p)


def test_decompression_bomb_declared_size(tmp_path: Path) -> None:
    p = _write(tmp_path / "bomb.png", _with_ihdr_size(_png_bytes(NOISE), 100_000, 100_000))
    with pytest.raises(ImageError, match=r"bomb\.png.*too large"):
        read_image(p)


def test_declared_size_just_above_default_limit(tmp_path: Path) -> None:
    # 8193 x 8192 is below Pillow's own limit (~89.5 Mpx), so only our limit can refuse it.
    p = _write(tmp_path / "big.png", _with_ihdr_size(_png_bytes(NOISE), 8193, 8192))
    assert DEFAULT_MAX_PIXELS < 8193 * 8192
    with pytest.raises(ImageError, match=r"big\.png.*too large.*8193x8192"):
        read_image(p)


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    p = _write(tmp_path / "small.png", _png_bytes(NOISE))
    with pytest.raises(ImageError, match=r"small\.png.*too large"):
        read_image(p, max_pixels=48 * 40 - 1)
    assert read_image(p, max_pixels=48 * 40).shape == (48, 40, 3)


def test_pillow_bomb_warning_becomes_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path / "warn.png", _png_bytes(NOISE))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # 1920 px: warning zone (1500..3000)
    with pytest.raises(ImageError, match=r"warn\.png.*too large"):
        read_image(p, max_pixels=None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1920 px > 2 * 500: Pillow's error
    with pytest.raises(ImageError, match=r"warn\.png.*too large"):
        read_image(p, max_pixels=None)


# ----------------------------------------------------------------------------- conversions


def test_rgb_png_roundtrip_exact(tmp_path: Path) -> None:
    p = _write(tmp_path / "rgb.png", _png_bytes(NOISE))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (48, 40, 3)
    np.testing.assert_array_equal(out, NOISE)


def test_grayscale_replicated(tmp_path: Path) -> None:
    gray = NOISE[..., 0]
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (48, 40, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_one_bit_becomes_0_and_255(tmp_path: Path) -> None:
    bits = NOISE[..., 0] > 127
    Image.fromarray(bits).convert("1").save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    out = read_image(tmp_path / "b.png")
    np.testing.assert_array_equal(out[..., 1], np.where(bits, 255, 0).astype(np.uint8))
    assert set(np.unique(out)) <= {0, 255}


def test_la_drops_alpha(tmp_path: Path) -> None:
    la = np.stack([NOISE[..., 0], np.zeros_like(NOISE[..., 0])], axis=-1)  # fully transparent
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out, np.repeat(NOISE[..., :1], 3, axis=2))


def test_rgba_alpha_dropped_not_composited(tmp_path: Path) -> None:
    alpha = np.zeros((48, 40, 1), dtype=np.uint8)
    alpha[:24] = 255
    Image.fromarray(np.concatenate([NOISE, alpha], axis=2), mode="RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, NOISE)  # colour under transparent pixels kept (not black)


def test_palette_with_transparency(tmp_path: Path) -> None:
    idx = (np.arange(48 * 40).reshape(48, 40) % 4).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    palette = [10, 20, 30, 200, 100, 50, 0, 255, 0, 255, 255, 255]
    im.putpalette(palette)
    im.info["transparency"] = 1  # colour index 1 transparent
    im.save(tmp_path / "p.png", transparency=1)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = read_image(tmp_path / "p.png")
    lut = np.array(palette, dtype=np.uint8).reshape(4, 3)
    np.testing.assert_array_equal(out, lut[idx])


def test_gif_palette(tmp_path: Path) -> None:
    idx = (np.arange(48 * 40).reshape(48, 40) % 3).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "p.gif")
    out = read_image(tmp_path / "p.gif")
    np.testing.assert_array_equal(out[0, :3], [[255, 0, 0], [0, 255, 0], [0, 0, 255]])


def test_gray16_rounds_by_257(tmp_path: Path) -> None:
    values = np.array([[0, 1, 128, 129, 255, 13055, 0x7F80, 65534, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = read_image(tmp_path / "g16.png")
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)
    np.testing.assert_array_equal(out[..., 2], expected)
    assert list(out[0, 4:6, 0]) == [1, 51]  # the high byte (Pillow's 8-bit view) would give 0 and 50


def test_rgb16_png_uses_all_16_bits(tmp_path: Path) -> None:
    values = np.array(
        [[[0x80FF, 0x0101, 65535], [0, 0x7F80, 255]], [[128, 129, 385], [65407, 65408, 13055]]],
        dtype=np.uint16,
    )
    p = _write(tmp_path / "rgb16.png", _png16(values))
    with Image.open(p) as im:
        assert im.mode == "RGB"  # Pillow's own view keeps only the high byte
        assert np.asarray(im)[0, 0, 0] == 0x80
    out = read_image(p)
    np.testing.assert_array_equal(out, np.floor(values / 257 + 0.5).astype(np.uint8))
    assert out[0, 1, 2] == 1 and out[1, 1, 2] == 51  # high bytes: 0 and 50


def test_rgba16_png_drops_alpha_and_rounds(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 65536, size=(5, 7, 3)).astype(np.uint16)
    alpha = np.zeros((5, 7, 1), dtype=np.uint16)
    p = _write(tmp_path / "rgba16.png", _png16(np.concatenate([rgb, alpha], axis=2)))
    np.testing.assert_array_equal(read_image(p), np.floor(rgb / 257 + 0.5).astype(np.uint8))


def test_gray_alpha16_png_keeps_high_byte(tmp_path: Path) -> None:
    """The documented exception: Pillow exposes only the high byte of 16-bit gray+alpha PNGs."""
    values = np.array([[[255, 0], [13055, 65535], [65535, 0]]], dtype=np.uint16)
    p = _write(tmp_path / "la16.png", _png16(values))
    out = read_image(p)
    np.testing.assert_array_equal(out[..., 0], [[0, 50, 255]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_int32_gray_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 257, 0x80FF, 65535]], dtype=np.int32)
    Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
    out = read_image(tmp_path / "i.tif")
    np.testing.assert_array_equal(out[..., 1], [[0, 1, 128, 255]])


def test_int32_out_of_16bit_range_refused(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(ImageError, match=r"wide\.tif.*0\.\.65535"):
        read_image(tmp_path / "wide.tif")


def test_float_image_refused(tmp_path: Path) -> None:
    Image.fromarray(np.ones((4, 4), dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match=r"f\.tif.*mode F"):
        read_image(tmp_path / "f.tif")


def test_cmyk_converted(tmp_path: Path) -> None:
    cmyk = np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 0, 255], [0, 0, 255, 0]]], dtype=np.uint8
    )
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    assert Image.open(tmp_path / "c.tif").mode == "CMYK"
    out = read_image(tmp_path / "c.tif")
    expected = [[[255, 255, 255], [0, 255, 255], [255, 0, 255], [0, 0, 0], [255, 255, 0]]]
    np.testing.assert_array_equal(out, expected)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    flat = np.zeros((16, 16, 4), dtype=np.uint8)
    flat[..., 0] = 255  # pure cyan
    Image.fromarray(flat, mode="CMYK").save(tmp_path / "c.jpg", quality=95)
    out = read_image(tmp_path / "c.jpg")
    assert out.shape == (16, 16, 3)
    assert np.abs(out.astype(int) - [0, 255, 255]).max() <= 3


def test_bmp_and_webp_lossless(tmp_path: Path) -> None:
    Image.fromarray(NOISE).save(tmp_path / "a.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "a.bmp"), NOISE)
    Image.fromarray(NOISE).save(tmp_path / "a.webp", lossless=True)
    np.testing.assert_array_equal(read_image(tmp_path / "a.webp"), NOISE)


# ----------------------------------------------------------------------------- writing


def test_write_image_roundtrip_and_no_temp_left(tmp_path: Path) -> None:
    p = write_image(tmp_path / "sub" / "out.png", NOISE)
    assert p == tmp_path / "sub" / "out.png"
    np.testing.assert_array_equal(read_image(p), NOISE)
    assert sorted(os.listdir(tmp_path / "sub")) == ["out.png"]


def test_write_image_from_tensor(tmp_path: Path) -> None:
    t = to_tensor(NOISE)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "t.png", t)), NOISE)
    np.testing.assert_array_equal(read_image(write_image(tmp_path / "b.png", t[None])), NOISE)


def test_write_grayscale_array(tmp_path: Path) -> None:
    write_image(tmp_path / "g.png", NOISE[..., :1])
    np.testing.assert_array_equal(read_image(tmp_path / "g.png")[..., 2], NOISE[..., 0])


def test_write_image_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_image(tmp_path / "keep.png", NOISE)
    before = target.read_bytes()

    def failing_save(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        fp.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_image(target, 255 - NOISE)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.png"]


def test_write_image_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="unknown image extension"):
        write_image(tmp_path / "x.xyz", NOISE)
    with pytest.raises(ImageError, match="uint8"):
        write_image(tmp_path / "x.png", NOISE.astype(np.float32))
    with pytest.raises(ImageError, match="shape"):
        write_image(tmp_path / "x.png", NOISE[..., :2])


# ----------------------------------------------------------------------------- tensors


def test_to_tensor_and_back() -> None:
    t = to_tensor(NOISE)
    assert t.dtype == torch.float32 and t.shape == (3, 48, 40)
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0
    np.testing.assert_array_equal(to_uint8(t), NOISE)


def test_to_tensor_accepts_views_and_copies() -> None:
    view = NOISE[::-1, ::2]
    t = to_tensor(view)
    np.testing.assert_array_equal(to_uint8(t), view)
    t.zero_()
    assert NOISE.any()  # never shares memory with the array


def test_to_uint8_rounds_and_clamps() -> None:
    t = torch.tensor([[[-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.0, 1.7, float("nan")]]])
    np.testing.assert_array_equal(to_uint8(t)[..., 0], [[0, 0, 0, 1, 255, 255, 0]])


def test_to_tensor_rejects_non_uint8() -> None:
    with pytest.raises(ImageError):
        to_tensor(NOISE.astype(np.float32))


# ----------------------------------------------------------------------------- listing


def test_list_images_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in [
        "b.PNG",
        "a.jpg",
        "c.JpEg",
        "d.bmp",
        "e.tif",
        "f.TIFF",
        "g.webp",
        "notes.txt",
        ".hidden.png",
    ]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()
    names = [p.name for p in list_images(tmp_path)]
    assert names == ["a.jpg", "b.PNG", "c.JpEg", "d.bmp", "e.tif", "f.TIFF", "g.webp"]


def test_list_images_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*does not exist"):
        list_images(tmp_path / "nowhere")


def test_list_images_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"empty.*no images"):
        list_images(tmp_path / "empty")
