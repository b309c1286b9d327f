"""Per-layer N of every route: nested route vectors and reading/writing them on a model."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.sparsity.parametrization import nm_layers


def nested_route_ns(per_route: Sequence[Sequence[int]]) -> list[list[int]]:
    """Make per-layer N non-decreasing over routes (running max), so the masks are nested.

    ``per_route[k][l]`` is N of layer l on route k (routes cheapest first); a layer where a
    cheaper route kept more than a dearer one gets the larger N on the dearer route too.
    """
    out: list[list[int]] = []
    for ns in per_route:
        current = list(ns) if not out else [max(a, b) for a, b in zip(out[-1], ns, strict=True)]
        out.append(current)
    return out


def set_layer_route_ns(model: nn.Module, per_layer: dict[str, Sequence[int]]) -> None:
    """Give each named N:M layer its N per route (keeps the active route index)."""
    masks = {name: mask for name, _, mask in nm_layers(model)}
    missing = sorted(set(masks) - set(per_layer))
    if missing:
        raise SparsityError(f"no route N given for layer(s) {', '.join(missing[:3])}")
    for name, ns in per_layer.items():
        if name not in masks:
            raise SparsityError(f"the model has no N:M layer {name!r}")
        masks[name].set_route_ns(list(ns))


def layer_route_ns(model: nn.Module) -> dict[str, list[int]]:
    """``{layer: [N of route 0, ..., N of route K-1]}``."""
    return {name: [int(v) for v in mask.route_n] for name, _, mask in nm_layers(model)}
