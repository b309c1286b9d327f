"""Reading and writing images, and the uint8 <-> float tensor conventions of the whole library.

Every image enters nmrestore through :func:`read_image`, so there is exactly one place that decides
what a 16-bit PNG, a palette GIF or a CMYK JPEG becomes, and exactly one set of error messages
(naming the file) for the ways a file can be broken. Pixels are held as ``H x W x 3`` uint8 RGB
arrays (compact, and what the distributed LR_bicubic PNGs contain) and turned into float ``C x H x W``
tensors in ``[0, 1]`` only when a sample is built.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from nmrestore.errors import DatasetError, ImageError
from nmrestore.io_atomic import atomic_open

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "list_images",
    "read_image",
    "to_tensor",
    "to_uint8",
    "write_image",
]

#: File extensions (lower-case) that count as images in a dataset folder.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Largest image (in pixels) that :func:`read_image` accepts by default: 8192 x 8192 is far above any
#: SR benchmark image (DIV2K is ~2040 x 1400) and far below what would exhaust memory on decode.
DEFAULT_MAX_PIXELS: int = 8192 * 8192

# ImageFile.LOAD_TRUNCATED_IMAGES is a process-wide switch; it is forced off while we decode, and
# this lock keeps two reader threads from restoring each other's value in the wrong order.
_DECODE_LOCK = threading.Lock()

_GRAY_MODES = ("1", "L", "LA", "La", "I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(path: str | os.PathLike[str], max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as an ``H x W x 3`` uint8 RGB array, or raise :class:`ImageError` naming it.

    The whole file is decoded here (not lazily), so a truncated or corrupt PNG/JPEG fails now, with
    its name, rather than as a garbled patch deep inside training; this holds even if some other code
    set Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES``.

    Conversions (one rule per source mode, so every dataset is handled alike):

    * grayscale (``1``, ``L``, ``I;16``, ``I``) -> RGB by replicating the channel; 1-bit becomes 0/255;
    * alpha is **dropped**, not composited (``RGBA``, ``LA``, ``PA``, ``P`` with transparency) --
      the colour stored under a transparent pixel is kept, as BasicSR's ``cv2.imread`` does;
    * palette (``P``) -> its RGB colours;
    * 16-bit (``I;16*``, 16-bit grayscale read as ``I``, and 16-bit RGB/RGBA PNGs, whose full 16 bits
      are decoded here instead of Pillow's high-byte-only 8-bit view) -> 8-bit by ``round(x / 257)``;
      (16-bit gray+alpha PNGs are the exception: Pillow offers only their high byte, ``x >> 8``);
    * ``CMYK``, ``YCbCr``, ``HSV`` -> RGB via Pillow's ``convert``;
    * floating-point (``F``) images are refused: their value range is not defined by the file.

    Multi-frame files (GIF, TIFF) give their first frame. EXIF orientation and ICC profiles are *not*
    applied: pixels are used as stored, so an LR file and its HR file stay aligned whatever their
    metadata says.

    Corruption inside a JPEG's entropy-coded data that libjpeg conceals (it only warns, and Pillow
    does not surface the warning) cannot be detected; truncated JPEGs and broken headers are.

    ``max_pixels`` guards against decompression bombs: a file whose header declares more pixels is
    refused before decoding. Pillow's own limit (``PIL.Image.MAX_IMAGE_PIXELS``) is enforced too and
    also reported as :class:`ImageError`, so the effective limit is the smaller of the two.
    ``max_pixels=None`` leaves only Pillow's limit.
    """
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: file does not exist")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(p)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{p}: image too large, refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{p}: not a recognised image file (cannot identify its format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(f"{p}: cannot open image: {exc}") from exc
    with im:
        width, height = im.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageError(
                f"{p}: image too large ({width}x{height} = {width * height} pixels, limit {max_pixels});"
                " refused as a possible decompression bomb"
            )
        if width == 0 or height == 0:
            raise ImageError(f"{p}: image has zero size ({width}x{height})")
        try:
            arr = _decode_rgb(p, im)
        except ImageError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
            raise ImageError(f"{p}: truncated or corrupt image data ({type(exc).__name__}: {exc})") from exc
    return arr


def _load_fully(im: Image.Image) -> None:
    """Decode every pixel now, with truncated images treated as errors whatever the global switch says."""
    with _DECODE_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            im.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _png16_tile(im: Image.Image) -> tuple[Any, str] | None:
    """The single zip tile and its band layout if ``im`` is a 16-bit-per-channel RGB(A) PNG, else None."""
    if im.format != "PNG" or im.mode not in ("RGB", "RGBA"):
        return None
    tiles = getattr(im, "tile", None)
    if not tiles or len(tiles) != 1:
        return None
    tile = tiles[0]
    args = tile[3]
    rawmode = args[0] if isinstance(args, tuple) else args
    if rawmode in ("RGB;16B", "RGBA;16B"):
        return tile, im.mode
    return None


def _decode_rgb16_png(path: Path, tile: Any, mode: str) -> np.ndarray:
    """Decode a 16-bit RGB(A) PNG at full precision and round it to 8 bits.

    Pillow has no 16-bit RGB mode: it keeps only the high byte (``x >> 8``), which differs from
    ``round(x / 257)`` by up to one level. Decoding the file a second time with the little-endian
    unpacker yields the low bytes (same zip decoder, same PNG unfiltering), and the two give ``x``.
    """
    planes = []
    for rawmode in (f"{mode};16B", f"{mode};16L"):
        with Image.open(path) as im:
            im.tile = [_with_rawmode(tile, rawmode)]
            _load_fully(im)
            planes.append(np.asarray(im, dtype=np.uint32))
    full = planes[0] * 256 + planes[1]
    return _round16(full[..., :3])


def _with_rawmode(tile: Any, rawmode: str) -> Any:
    """The same decoder tile with another raw mode (a NamedTuple in recent Pillow, a tuple before)."""
    args = tile[3]
    new_args = (rawmode, *args[1:]) if isinstance(args, tuple) else rawmode
    parts = (tile[0], tile[1], tile[2], new_args)
    return type(tile)(*parts) if hasattr(tile, "_replace") else parts


def _round16(x: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by round(x / 257) in exact integer arithmetic (0 -> 0, 65535 -> 255)."""
    x = x.astype(np.int64)
    return ((2 * x + 257) // 514).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _decode_rgb(path: Path, im: Image.Image) -> np.ndarray:
    """Decode ``im`` fully and apply the conversions documented in :func:`read_image`."""
    tile16 = _png16_tile(im)
    if tile16 is not None:
        return _decode_rgb16_png(path, *tile16)
    _load_fully(im)
    mode = im.mode
    if mode in _GRAY_MODES:
        if mode == "1":
            gray = np.asarray(im.convert("L"), dtype=np.uint8)
        elif mode in ("L", "LA", "La"):
            gray = np.asarray(im.getchannel(0), dtype=np.uint8)
        else:  # 16-bit grayscale (I;16*) or 32-bit integer holding 16-bit data (I)
            wide = np.asarray(im).astype(np.int64)
            if wide.min(initial=0) < 0 or wide.max(initial=0) > 65535:
                raise ImageError(
                    f"{path}: integer image with values outside 0..65535 (mode {mode}); only 8- and 16-bit"
                    " images are supported"
                )
            gray = _round16(wide)
        return _gray_to_rgb(gray)
    if mode == "RGB":
        return np.array(im, dtype=np.uint8)
    if mode in ("RGBA", "RGBa", "RGBX"):
        return np.array(im, dtype=np.uint8)[..., :3].copy()
    if mode in ("P", "PA"):
        return np.array(im.convert("RGBA"), dtype=np.uint8)[..., :3].copy()
    if mode == "F":
        raise ImageError(f"{path}: floating-point image (mode F) has no defined value range; not supported")
    try:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except ValueError as exc:
        raise ImageError(f"{path}: unsupported image mode {mode!r}") from exc


def write_image(path: str | os.PathLike[str], image: np.ndarray | torch.Tensor) -> Path:
    """Write an image atomically; the format follows the extension. Returns the path.

    Accepts a uint8 ``H x W x 3`` / ``H x W x 1`` / ``H x W`` array, or a float tensor ``C x H x W``
    (or ``1 x C x H x W``) in ``[0, 1]`` (converted by :func:`to_uint8`). The image goes to a temporary
    file in the same directory, then ``os.replace`` moves it into place, so a crash or a concurrent
    reader never sees a half-written file. Parent directories are created; the file gets the
    permissions of a plain ``open()``.
    """
    p = Path(path)
    arr = to_uint8(image) if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8:
        raise ImageError(f"{p}: write_image expects a uint8 array or a float tensor, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{p}: cannot write an array of shape {tuple(arr.shape)} as an image")
    ext = p.suffix.lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None:
        raise ImageError(f"{p}: unknown image extension {p.suffix!r}")
    with atomic_open(p) as fh:  # temp + fsync + os.replace; mode as a plain open (0644)
        Image.fromarray(np.ascontiguousarray(arr)).save(fh, format=fmt)
    return p


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """uint8 ``H x W x C`` array -> float32 ``C x H x W`` tensor in ``[0, 1]`` (a copy, never a view)."""
    if arr.dtype != np.uint8:
        raise ImageError(f"to_tensor expects a uint8 array, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3:
        raise ImageError(f"to_tensor expects an H x W x C array, got shape {tuple(arr.shape)}")
    data = np.array(arr, dtype=np.float32, order="C")
    return torch.from_numpy(data).permute(2, 0, 1).contiguous().div_(255.0)


def to_uint8(tensor: torch.Tensor) -> np.ndarray:
    """Float ``C x H x W`` (or ``1 x C x H x W``) tensor in ``[0, 1]`` -> uint8 ``H x W x C`` array.

    Values are clamped to ``[0, 1]``, scaled by 255 and rounded (NaN -> 0), the inverse of
    :func:`to_tensor` up to quantisation.
    """
    t = tensor.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ImageError(f"to_uint8 expects a C x H x W tensor, got shape {tuple(tensor.shape)}")
    t = torch.nan_to_num(t.to(device="cpu", dtype=torch.float32), nan=0.0)
    q = t.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return q.permute(1, 2, 0).contiguous().numpy()


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Sorted image files directly inside ``folder`` (not recursive; hidden files skipped).

    Raises :class:`DatasetError` naming the folder when it is missing, not a directory, or holds no
    file with an extension from :data:`IMAGE_EXTENSIONS` (case-insensitive), since an empty dataset
    is always a path mistake and should not surface later as a zero-length epoch.
    """
    d = Path(folder)
    if not d.exists():
        raise DatasetError(f"{d}: folder does not exist")
    if not d.is_dir():
        raise DatasetError(f"{d}: not a folder")
    files = sorted(
        f
        for f in d.iterdir()
        if f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".") and f.is_file()
    )
    if not files:
        raise DatasetError(f"{d}: folder contains no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files
