"""A sparse conv under a route map: which routes the kernel computes in place, the rest gathered.

Split from :mod:`nmrestore.runtime.layers` (whose :class:`~nmrestore.runtime.layers.SparseConv2d`
calls :func:`run_conv_spatial` while a route map is set) to keep the layer classes short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nmrestore.errors import NMRestoreError
from nmrestore.runtime.layer_types import LayerDecision
from nmrestore.runtime.spatial import InPlaceConv, run_routed_conv

if TYPE_CHECKING:
    from nmrestore.runtime.layers import SparseConv2d


def run_conv_spatial(
    layer: SparseConv2d, x: Tensor, residual: Tensor | None, scale: float, post_relu: bool
) -> Tensor:
    """One routed conv under the engine's route map: every tile on its route (:mod:`.spatial`)."""
    route_map = layer._state.spatial
    assert route_map is not None
    kh, kw = layer.kernel_size
    (ph, pw), (dh, dw) = layer.padding, layer.dilation
    if layer.stride != (1, 1) or (dh, dw) != (1, 1) or 2 * ph != kh - 1 or 2 * pw != kw - 1:
        raise NMRestoreError(
            f"{layer.layer_name}: only stride-1 'same' convolutions run under a route map "
            f"(stride {layer.stride}, padding {layer.padding}, dilation {layer.dilation}, kernel {layer.kernel_size})"
        )
    grad = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
    # relu(conv) + residual is not the kernel epilogue's order (as in _sparse): such calls are gathered
    in_place = None if grad or (residual is not None and layer.relu) else in_place_conv(layer, x)
    saved = layer.padding, layer.out_pad
    # gathered tiles carry their halo: they run with padding 0, into plain (not hand-off) outputs
    layer.padding, layer.out_pad = (0, 0), None
    try:
        return run_routed_conv(
            route_map,
            x,
            (ph, pw),
            layer.shuffle,
            layer.run_tiles,
            residual,
            scale,
            post_relu,
            layer._state.kernel if in_place is not None else None,
            in_place,
        )
    finally:
        layer.padding, layer.out_pad = saved


def in_place_conv(layer: SparseConv2d, x: Tensor) -> InPlaceConv | None:
    """The routes that run on the kernel in place under a route map: every route the kernel can
    run (N:M, density <= max_density, float32 on the CPU, kernel built, tactic not dense). No
    timing: a timed choice per tile shape would cost more than it saves, and at these densities
    the kernel wins (docs/BENCHMARKS.md, speed)."""
    kernel = layer._state.kernel
    if kernel is None:
        return None
    padding: tuple[int, int] = tuple(layer.padding)  # type: ignore[assignment]
    routes = []
    threads = torch.get_num_threads()
    for k, rw in enumerate(layer.routes):
        why = layer._why_not_sparse(x, rw)
        if why is None and x.dtype != torch.float32:
            why = "the tile kernel takes float32"
        key = (k, tuple(x.shape), threads)
        if key not in layer._choices.by_tile:  # recorded once per map shape (not kept for whole-image calls)
            layer._choices.by_tile[key] = "dense" if why else "sparse"
            nm_text = f"{rw.nm[0]}:{rw.nm[1]}" if rw.nm else "-"
            layer._state.record(
                LayerDecision(
                    layer.layer_name, layer.kind, k, tuple(x.shape), threads, nm_text, rw.density, None, None,
                    "dense" if why else "sparse", f"route map: {why}" if why else "route map: tiles in place",
                )
            )  # fmt: skip
        if why is None:
            routes.append(k)
    if not routes:
        return None

    def conv(
        source: Tensor,
        tiles: list[tuple[int, int, int, int, int]],
        out: Tensor,
        residual: Tensor | None,
        scale: float,
        post_relu: bool,
    ) -> None:
        assert kernel is not None
        kernel.conv2d_tiles(
            source,
            tiles,
            [rw.csr if k in routes else None for k, rw in enumerate(layer.routes)],
            layer._bias,
            out,
            layer.kernel_size,  # type: ignore[arg-type]
            padding,
            relu=layer.relu or post_relu,
            residual=residual,
            res_scale=scale,
            shuffle=layer.shuffle,
        )

    def reads(y: Tensor) -> bool:
        return kernel.accepts_handoff(y, layer.kernel_size, (1, 1), padding, (1, 1))  # type: ignore[arg-type]

    return InPlaceConv(frozenset(routes), layer.out_channels, reads, conv)
