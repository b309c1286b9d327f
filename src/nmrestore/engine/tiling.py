"""Tiled inference: restore a large image tile by tile so memory stays bounded.

A 2560x1600 photo through EDSR x4 needs activations of 64-256 channels at up to 10240x6400,
tens of GB at once. Here the image is cut into tiles of ``tile`` LR pixels, each run with an
``overlap`` margin of context on every side (clipped at the image border), and only the tile's
own part of the output is kept, written straight into an 8-bit output image.

The overlap comes from the model itself (:func:`choose_overlap`): one probe changes a single pixel
and finds how far the output moves; a second changes every pixel beyond the proposed margin and
checks the output block is bitwise unchanged. With such a margin every kept output pixel saw
exactly the input it sees in an untiled run, so the result equals the untiled one up to float
rounding (tested within 1e-5). Models with a global operation (RCAN's channel attention, RFDN's
pooled attention) fail the second probe; they get the largest margin and their output differs
slightly from an untiled run, as with any tiled restoration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from nmrestore.data.io import to_uint8

log = logging.getLogger("nmrestore")

#: Tile starts and margins are multiples of this, so models that downsample by up to 8 (U-Nets)
#: see the same pixel grid as in an untiled run.
ALIGN = 8
MIN_OVERLAP = 16
MAX_OVERLAP = 64
#: Default tile: about 1024 output pixels per side (LR: 1024 // scale), a few hundred MB at x4.
TILE_OUTPUT_SIDE = 1024

Model = Callable[[Tensor], Tensor]


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def default_tile(scale: int) -> int:
    """LR tile side for a model of ``scale``: ~1024 output px, a multiple of :data:`ALIGN`."""
    return max(4 * ALIGN, _round_up(TILE_OUTPUT_SIDE // max(1, scale), ALIGN))


@torch.no_grad()
def receptive_radius(model: Model, channels: int, limit: int = MAX_OVERLAP) -> int | None:
    """How many LR pixels away an input change can move an output pixel; None if ``limit`` or more.

    Changes the centre pixel of a seeded random probe of ``2 * limit + 1`` pixels and measures the
    extent of the change in the output (bitwise: outside the receptive field the computation is
    identical). Reaching the probe's border means a global operation: no finite margin is exact.
    """
    side = 2 * limit + 1
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(1, channels, side, side, generator=generator)
    moved = probe.clone()
    moved[..., limit, limit] = 1.0 - moved[..., limit, limit]
    base, changed = model(probe), model(moved)
    scale = base.shape[-1] / side
    diff = (changed - base).abs().amax(dim=(0, 1))
    rows, cols = torch.nonzero(diff > 0, as_tuple=True)
    if rows.numel() == 0:
        return 0
    centre = (limit + 0.5) * scale
    reach = max(
        float((rows.float() + 0.5 - centre).abs().max()),
        float((cols.float() + 0.5 - centre).abs().max()),
    )
    radius = math.ceil(reach / scale)
    return None if radius >= limit else radius


@torch.no_grad()
def _depends_beyond(model: Model, channels: int, margin: int) -> bool:
    """Whether the central ALIGN x ALIGN block of the output changes when every input pixel more
    than ``margin`` LR px away from that block changes (global pooling, attention over the image).

    This is exactly what a tile needs: its kept part must not see past its margin.
    """
    side = ALIGN + 2 * (MAX_OVERLAP + ALIGN)
    lo = MAX_OVERLAP + ALIGN
    generator = torch.Generator().manual_seed(1)
    probe = torch.rand(1, channels, side, side, generator=generator)
    moved = torch.rand(1, channels, side, side, generator=generator)
    keep = slice(lo - margin, lo + ALIGN + margin)
    moved[..., keep, keep] = probe[..., keep, keep]
    base, changed = model(probe), model(moved)
    scale = base.shape[-1] // side
    centre = slice(lo * scale, (lo + ALIGN) * scale)
    return not torch.equal(base[..., centre, centre], changed[..., centre, centre])


def choose_overlap(model: Model, channels: int) -> int:
    """A margin (multiple of :data:`ALIGN`, :data:`MIN_OVERLAP`..:data:`MAX_OVERLAP`) beyond which
    the model's output does not depend on its input, or the largest one (with a log line) for a
    model with a global operation.

    The single-pixel probe (:func:`receptive_radius`) proposes a margin; a second probe changes
    everything beyond it and checks that the output block is bitwise unchanged. That catches
    global pooling too (RCAN's channel attention), whose single-pixel effect can round away.
    """
    radius = receptive_radius(model, channels)
    if radius is not None:
        margin = min(MAX_OVERLAP, max(MIN_OVERLAP, _round_up(radius + 2, ALIGN)))
        if not _depends_beyond(model, channels, margin):
            return margin
        if margin < MAX_OVERLAP and not _depends_beyond(model, channels, MAX_OVERLAP):
            return MAX_OVERLAP
    log.info(
        "the model's receptive field is global; tiles overlap by %d px (seams may differ slightly)",
        MAX_OVERLAP,
    )
    return MAX_OVERLAP


def is_global(model: Model, channels: int) -> bool:
    """True when the output depends on input pixels beyond :data:`MAX_OVERLAP` (no exact tiling)."""
    return _depends_beyond(model, channels, MAX_OVERLAP)


def _spans(length: int, tile: int, overlap: int) -> Iterator[tuple[int, int, int, int]]:
    """(kept start, kept end, window start, window end) along one axis."""
    for start in range(0, length, tile):
        end = min(start + tile, length)
        yield start, end, max(0, start - overlap), min(length, end + overlap)


@torch.no_grad()
def run_tiled(
    model: Model, image: Tensor, tile: int, overlap: int, as_uint8: bool = True
) -> np.ndarray | Tensor:
    """``model(image)`` computed tile by tile; ``image`` is (1, C, H, W) in [0, 1].

    Returns the H*s x W*s x C uint8 array (``as_uint8``, quantised as :func:`to_uint8` does for
    the whole output) or the (1, C, H*s, W*s) float tensor. ``tile`` and ``overlap`` are LR pixels.
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"run_tiled expects a (1, C, H, W) tensor, got {tuple(image.shape)}")
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got {tile}, {overlap}")
    height, width = image.shape[-2:]
    out: np.ndarray | Tensor | None = None
    scale = 0
    for top, bottom, win_top, win_bottom in _spans(height, tile, overlap):
        for left, right, win_left, win_right in _spans(width, tile, overlap):
            window = image[..., win_top:win_bottom, win_left:win_right]
            result = model(window).clamp(0, 1)
            if out is None:
                scale = result.shape[-1] // window.shape[-1]
                if scale < 1 or result.shape[-1] != window.shape[-1] * scale:
                    raise ValueError(
                        f"the model's output {tuple(result.shape)} is not a multiple of its input"
                    )
                channels = result.shape[1]
                out = (
                    np.empty((height * scale, width * scale, channels), dtype=np.uint8)
                    if as_uint8
                    else result.new_empty(1, channels, height * scale, width * scale)
                )
            kept = result[
                ...,
                (top - win_top) * scale : (bottom - win_top) * scale,
                (left - win_left) * scale : (right - win_left) * scale,
            ]
            rows = slice(top * scale, bottom * scale)
            cols = slice(left * scale, right * scale)
            if isinstance(out, np.ndarray):
                out[rows, cols] = to_uint8(kept)
            else:
                out[..., rows, cols] = kept
    assert out is not None
    return out
