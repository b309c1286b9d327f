"""Bounds on sizes and thread counts, checked before any work.

Why: a size or a thread count straight from the command line reached torch unchecked, so
``--input 0x0`` or a negative size ended in a traceback, ``--input 4000x4000`` in an allocator
failure, ``--threads 100000`` in a segfault, and an 8000x8000 PNG (186 KB, under Pillow's pixel
limit) in a run of minutes and gigabytes. Each is now refused up front with one line.
"""

from __future__ import annotations

import os

from nmrestore.errors import NMRestoreError

#: Largest width or height accepted for ``--input`` (cost, speed).
MAX_SIDE = 16384
#: ``speed`` runs the model for real: at most a 4K (3840x2160) output per timed run.
MAX_SPEED_OUTPUT_PIXELS = 3840 * 2160
#: ``infer`` output size: 100 Mpx (300 MB as 8-bit RGB). A 2560x1600 photo at x4 (65.5 Mpx) fits.
MAX_INFER_OUTPUT_PIXELS = 100_000_000


def _mpx(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def parse_size(text: str | None, option: str = "--input") -> tuple[int, int] | None:
    """``320x180`` (width x height, as people write video sizes) -> (height, width), bounded."""
    if text is None:
        return None
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise NMRestoreError(f"{option} must look like WIDTHxHEIGHT (e.g. 320x180), got {text!r}") from None
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise NMRestoreError(f"{option} {text}: width and height must be between 1 and {MAX_SIDE} pixels")
    return height, width


def check_speed_size(size: tuple[int, int], scale: int) -> None:
    """Refuse a ``speed`` input whose output would exceed :data:`MAX_SPEED_OUTPUT_PIXELS`."""
    height, width = size
    out = height * width * scale * scale
    if out > MAX_SPEED_OUTPUT_PIXELS:
        raise NMRestoreError(
            f"--input {width}x{height} at x{scale} gives a {width * scale}x{height * scale} output "
            f"({_mpx(out)}); speed times at most {_mpx(MAX_SPEED_OUTPUT_PIXELS)} (3840x2160) per run"
        )


def check_infer_size(name: str, size: tuple[int, int], scale: int) -> None:
    """Refuse an ``infer`` input whose output would exceed :data:`MAX_INFER_OUTPUT_PIXELS`."""
    height, width = size
    out = height * width * scale * scale
    if out > MAX_INFER_OUTPUT_PIXELS:
        raise NMRestoreError(
            f"{name}: {width}x{height} at x{scale} gives a {width * scale}x{height * scale} output "
            f"({_mpx(out)}), above infer's limit of {_mpx(MAX_INFER_OUTPUT_PIXELS)}; crop or downscale it first"
        )


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_threads(threads: int | None, option: str = "--threads") -> None:
    """Refuse a thread count below 1 or above the CPUs available (a segfault in OpenMP before)."""
    if threads is None:
        return
    cpus = available_cpus()
    if not 1 <= threads <= cpus:
        raise NMRestoreError(
            f"{option} must be between 1 and {cpus} (the CPUs available here), got {threads}"
        )
