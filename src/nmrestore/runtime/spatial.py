"""Spatially routed inference: each tile of an image runs every routed layer on its own route.

A :class:`RouteMap` gives one route to every tile of a grid over the LR input (``tile`` LR pixels a
side; the last row and column of tiles are cut at the border). While it is set on an engine
(:func:`~nmrestore.runtime.engine.use_spatial_routes`), every sparse conv whose routes differ runs
the *whole* feature map tile by tile: the tiles of one route (and one shape) are gathered with a
halo of the conv's padding, run as one batch on that route's weights with padding 0, and scattered
into the output. Every output pixel is therefore computed once, on its tile's route, from the same
whole-image features a plain forward would read: no patch overlap, no stitching, no zero padding
inside the image. The per-pixel cost of a route is its per-patch cost, so the MACs of an image are
exactly the route mix over its pixels. Layers whose routes are identical (the dense first and last
convs, untouched layers) run on the whole map as usual.

At layer resolution ``factor`` times the LR size (after a pixel shuffle) a tile is ``factor * tile``
pixels a side. Only stride-1 'same' convolutions can be routed this way (output size = input size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from nmrestore.errors import NMRestoreError
from nmrestore.runtime.kernel_lib import KernelLibrary, handoff_layout

#: Attribute of a routed conv's output: (the zero-bordered buffer it lives in, the border).
BORDER_ATTR = "_nm_spatial_border"

#: ``run_tiles(route, tiles, residual_tiles, scale, post_relu) -> outputs`` of one layer.
TileRunner = Callable[[int, Tensor, Tensor | None, float, bool], Tensor]


@dataclass(frozen=True)
class TileGroup:
    """The tiles of one route and one shape (h, w) at one layer resolution: the top-left pixel of each."""

    route: int
    shape: tuple[int, int]
    positions: tuple[tuple[int, int], ...]


@dataclass
class RouteMap:
    """The route of every ``tile`` x ``tile`` LR tile of an ``lr_size`` image, row-major ``(rows, cols)``."""

    routes: Tensor
    tile: int
    lr_size: tuple[int, int]
    _groups: dict[int, list[TileGroup]] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        h, w = self.lr_size
        if self.tile < 1 or h < 1 or w < 1:
            raise NMRestoreError(
                f"a route map needs a positive tile and image size, got {self.tile}, {self.lr_size}"
            )
        expected = grid_shape(self.lr_size, self.tile)
        if tuple(self.routes.shape) != expected:
            raise NMRestoreError(
                f"{tuple(self.routes.shape)} routes for a {h}x{w} image in {self.tile}-pixel tiles "
                f"(needs {expected[0]}x{expected[1]})"
            )
        self.routes = self.routes.to(torch.int64).cpu()

    def tile_boxes(self) -> list[tuple[int, int, int, int]]:
        """(top, left, height, width) of every LR tile, row-major."""
        h, w = self.lr_size
        t = self.tile
        rows, cols = self.routes.shape
        return [
            (i * t, j * t, min(t, h - i * t), min(t, w - j * t)) for i in range(rows) for j in range(cols)
        ]

    def pixels_per_route(self, num_routes: int) -> list[int]:
        """LR pixels each route computes (every pixel exactly once)."""
        counts = [0] * num_routes
        for route, (_, _, bh, bw) in zip(self.routes.flatten().tolist(), self.tile_boxes(), strict=True):
            counts[route] += bh * bw
        return counts

    def groups(self, factor: int) -> list[TileGroup]:
        """Tiles at ``factor`` x the LR resolution, grouped by (route, shape); cached per factor."""
        if factor not in self._groups:
            found: dict[tuple[int, tuple[int, int]], list[tuple[int, int]]] = {}
            for route, (t, s, bh, bw) in zip(self.routes.flatten().tolist(), self.tile_boxes(), strict=True):
                found.setdefault((route, (bh * factor, bw * factor)), []).append((t * factor, s * factor))
            self._groups[factor] = [
                TileGroup(route, shape, tuple(cells)) for (route, shape), cells in sorted(found.items())
            ]
        return self._groups[factor]


def grid_shape(lr_size: tuple[int, int], tile: int) -> tuple[int, int]:
    """Tile rows and columns covering ``lr_size`` (the last ones cut at the border)."""
    return -(-lr_size[0] // tile), -(-lr_size[1] // tile)


def layer_factor(route_map: RouteMap, x: Tensor) -> int:
    """How many times the LR resolution ``x`` (1, C, H, W) is at; refuses anything else."""
    h, w = route_map.lr_size
    height, width = x.shape[-2:]
    factor = height // h
    if x.dim() != 4 or x.shape[0] != 1 or factor < 1 or height != factor * h or width != factor * w:
        raise NMRestoreError(
            f"a spatially routed layer got input {tuple(x.shape)}; it needs one image at an integer "
            f"multiple of the route map's {h}x{w}"
        )
    return factor


def run_routed_conv(
    route_map: RouteMap,
    x: Tensor,
    padding: tuple[int, int],
    shuffle: int,
    run_tiles: TileRunner,
    residual: Tensor | None = None,
    scale: float = 1.0,
    post_relu: bool = False,
    kernel: KernelLibrary | None = None,
    in_place: InPlaceConv | None = None,
) -> Tensor:
    """One stride-1 'same' conv over the whole map, each tile group on its route (see the module doc).

    ``padding``: the conv's zero padding, the halo of every tile; ``shuffle``: a pixel shuffle fused
    into the conv (its output tiles are that much larger). ``run_tiles`` runs a batch of gathered tiles
    (with their halo, padding 0). With ``kernel`` and ``in_place`` (which says which routes run on the
    kernel), those routes' tiles are computed in place: read from a zero-bordered hand-off view of
    the whole map and written into a hand-off output, no gather, no scatter; the others are gathered.
    """
    factor = layer_factor(route_map, x)
    groups = route_map.groups(factor)
    if kernel is None or in_place is None or not any(in_place.runs(g.route) for g in groups):
        return _gathered(groups, x, padding, shuffle, run_tiles, residual, scale, post_relu)
    ph, pw = padding
    r = shuffle
    with one_thread():
        source = x if in_place.reads(x) else _as_handoff(kernel, x, padding)
        out = kernel.handoff_empty(
            (1, in_place.out_channels // (r * r), x.shape[-2] * r, x.shape[-1] * r), padding
        )
        _zero_border(out)
    # the same map with its zero border, for the tiles that are gathered
    sh, sw = source.stride()[2:]
    h, w = x.shape[-2:]
    bordered = source.as_strided(
        (1, x.shape[1], h + 2 * ph, w + 2 * pw), source.stride(), source.storage_offset() - ph * sh - pw * sw
    )
    # every tile the kernel runs, whatever its route and shape: one call, one parallel region
    tiles = [(t, s, *g.shape, g.route) for g in groups if in_place.runs(g.route) for t, s in g.positions]
    in_place.conv(source, merge_runs(tiles, kernel.tile[1]), out, residual, scale, post_relu)
    for group in groups:
        if in_place.runs(group.route):
            continue
        th, tw = group.shape
        with one_thread():
            tiles, res = _gather(group, bordered, residual, (ph, pw))
        y = run_tiles(group.route, tiles, res, scale, post_relu)
        with one_thread():
            for b, (t, s) in enumerate(group.positions):
                out[0, :, t * r : (t + th) * r, s * r : (s + tw) * r].copy_(y[b])
    return out


Tile = tuple[int, int, int, int, int]  # (top, left, height, width, route)


def merge_runs(tiles: list[Tile], width: int) -> list[Tile]:
    """Tiles of one route and height that touch side by side, as fewer, wider tiles.

    Why: the kernel computes a tile in ``width``-column blocks, and a narrow tile runs narrower,
    slower blocks (and a whole vector per kernel column for its own alignment). A run of tiles is cut
    into one tile of whole blocks and a rest; every output pixel still gets exactly the same sums.
    """
    merged: list[Tile] = []
    for top, left, h, w, route in sorted(tiles, key=lambda t: (t[4], t[0], t[2], t[1])):
        if merged:
            mt, ml, mh, mw, mr = merged[-1]
            if (mr, mt, mh) == (route, top, h) and ml + mw == left:
                merged[-1] = (mt, ml, mh, mw + w, mr)
                continue
        merged.append((top, left, h, w, route))
    out: list[Tile] = []
    for top, left, h, w, route in merged:
        whole = w // width * width
        if whole and whole < w:
            out += [(top, left, h, whole, route), (top, left + whole, h, w - whole, route)]
        else:
            out.append((top, left, h, w, route))
    return out


@dataclass(frozen=True)
class InPlaceConv:
    """What :func:`run_routed_conv` needs to run some routes of a conv in place on the kernel."""

    routes: frozenset[int]  # the routes computed in place
    out_channels: int  # before a fused shuffle
    reads: Callable[[Tensor], bool]  # whether the conv reads this map in place (a hand-off view)
    # (source, tiles as (top, left, height, width, route), out, residual, scale, post_relu)
    conv: Callable[[Tensor, list[Tile], Tensor, Tensor | None, float, bool], None]

    def runs(self, route: int) -> bool:
        return route in self.routes


def _gather(
    group: TileGroup, padded: Tensor, residual: Tensor | None, halo: tuple[int, int]
) -> tuple[Tensor, Tensor | None]:
    """The group's tiles with their halo from ``padded`` (the map with its zero border), and their residual."""
    th, tw = group.shape
    ph, pw = halo
    tiles = padded.new_empty(len(group.positions), padded.shape[1], th + 2 * ph, tw + 2 * pw)
    for b, (t, s) in enumerate(group.positions):
        tiles[b].copy_(padded[0, :, t : t + th + 2 * ph, s : s + tw + 2 * pw])
    res = None
    if residual is not None:
        res = residual.new_empty(len(group.positions), residual.shape[1], th, tw)
        for b, (t, s) in enumerate(group.positions):
            res[b].copy_(residual[0, :, t : t + th, s : s + tw])
    return tiles, res


def _gathered(
    groups: list[TileGroup],
    x: Tensor,
    padding: tuple[int, int],
    shuffle: int,
    run_tiles: TileRunner,
    residual: Tensor | None,
    scale: float,
    post_relu: bool,
) -> Tensor:
    """Every group gathered into a batch, run, and scattered back (no kernel, or no route on it)."""
    ph, pw = padding
    r = shuffle
    with one_thread():
        padded = _with_zero_border(x, ph, pw)
    out: Tensor | None = None
    for group in groups:
        th, tw = group.shape
        with one_thread():
            tiles, res = _gather(group, padded, residual, padding)
        y = run_tiles(group.route, tiles, res, scale, post_relu)  # the convolution: every thread
        with one_thread():
            if out is None:
                out = _bordered_output(y, x.shape[-2] * r, x.shape[-1] * r, ph, pw)
            for b, (t, s) in enumerate(group.positions):
                out[0, :, t * r : (t + th) * r, s * r : (s + tw) * r].copy_(y[b])
    assert out is not None  # the groups cover the map
    return out


def _as_handoff(kernel: KernelLibrary, x: Tensor, padding: tuple[int, int]) -> Tensor:
    """``x`` copied into a zero-bordered hand-off view (one pass) that a conv with ``padding`` reads in place."""
    view = kernel.handoff_empty(tuple(x.shape), padding)  # type: ignore[arg-type]
    _zero_border(view)
    view.copy_(x)
    return view


def _zero_border(view: Tensor) -> None:
    """Zero everything of a hand-off view's buffer around the view (rows above/below, columns left/right)."""
    layout = handoff_layout(view)
    assert layout is not None
    _, c, h, w = view.shape
    row = c * layout.width
    full = view.as_strided(
        (layout.rows, c, layout.width),
        (row, layout.width, 1),
        view.storage_offset() - layout.pad_h * row - layout.pad_w,
    )
    full[: layout.pad_h].zero_()
    full[layout.pad_h + h :].zero_()
    middle = full[layout.pad_h : layout.pad_h + h]
    middle[..., : layout.pad_w].zero_()
    middle[..., layout.pad_w + w :].zero_()


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the tile copies on one thread.

    Each copy is a small op, and every op with more than one thread is an OpenMP region that waits for
    all its threads: on a machine shared with other jobs a descheduled thread stalls it for a
    scheduler slice. Measured on 2 busy cores: 30 tile copies took 352 ms on 2 threads and 2.3 ms on
    one. Switching costs nothing measurable (torch keeps its thread pool).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _with_zero_border(x: Tensor, ph: int, pw: int) -> Tensor:
    """``x`` with ``ph`` / ``pw`` zero rows / columns around it: a view into the zero-bordered buffer a
    routed conv wrote it into when there is one (no copy), else ``F.pad``."""
    if not ph and not pw:
        return x
    found = getattr(x, BORDER_ATTR, None)
    if found is not None:
        buffer, (bh, bw) = found
        if bh >= ph and bw >= pw:
            h, w = x.shape[-2:]
            return buffer[..., bh - ph : bh + h + ph, bw - pw : bw + w + pw]
    return F.pad(x, (pw, pw, ph, ph))


def _bordered_output(y: Tensor, height: int, width: int, ph: int, pw: int) -> Tensor:
    """An uninitialised (1, C, height, width) output inside a buffer with a zero border of ``ph`` / ``pw``:
    the next routed conv (the same padding, in a chain of 'same' convs) reads it without padding it."""
    buffer = y.new_empty(1, y.shape[1], height + 2 * ph, width + 2 * pw)
    if ph:
        buffer[..., :ph, :].zero_()
        buffer[..., height + ph :, :].zero_()
    if pw:
        buffer[..., :, :pw].zero_()
        buffer[..., :, width + pw :].zero_()
    out = buffer[..., ph : ph + height, pw : pw + width]
    setattr(out, BORDER_ATTR, (buffer, (ph, pw)))
    return out


__all__ = [
    "InPlaceConv",
    "RouteMap",
    "TileGroup",
    "grid_shape",
    "layer_factor",
    "one_thread",
    "run_routed_conv",
]
