"""How one masked layer is packed: bit packing of indices, ranks from the stored order, the route analysis that picks an encoding (see :mod:`nmrestore.export.packed`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from nmrestore.engine.checkpoint import (
    integrity_digest,
)
from nmrestore.errors import CheckpointError
from nmrestore.sparsity import nm
from nmrestore.sparsity.parametrization import NMMask


def bitpack(indices: Tensor, bits: int) -> Tensor:
    """Pack small non-negative ints (< 2**bits) into a uint8 stream, ``bits`` bits each.

    Big-endian bit order, as :func:`numpy.packbits`; :func:`nm.unpack_indices` reads it back.
    """
    flat = indices.to(torch.uint8).cpu().numpy().reshape(-1, 1)
    planes = np.unpackbits(flat, axis=1)[:, 8 - bits :]
    return torch.from_numpy(np.packbits(planes.reshape(-1)).copy())


def bitunpack(stream: Tensor, count: int, bits: int) -> Tensor:
    """Inverse of :func:`bitpack`: ``count`` ints of ``bits`` bits each, as uint8."""
    planes = np.unpackbits(stream.numpy())[: count * bits]
    if planes.size != count * bits:
        raise ValueError(f"bit stream too short for {count} values of {bits} bits")
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits :] = planes.reshape(count, bits)
    return torch.from_numpy(np.packbits(full, axis=1).reshape(count))


def small_int_bits(t: Tensor) -> int | None:
    """Bits per entry for a bool/uint8 tensor that fits in fewer than 8 (None: store it as is).

    Masks' own state (ranks, per-task bit fields, flags) is small integers; bit-packing it is exact.
    """
    if t.dtype not in (torch.bool, torch.uint8) or t.numel() == 0:
        return None
    bits = max(1, int(t.max()).bit_length())
    return bits if bits < 8 else None


def top_k_by_rank(ranks: Tensor, k: int, m: int, in_axis: int) -> Tensor:
    """In-group positions of ranks 0..k-1, in rank order: ``(..., I/M, k)`` int64."""
    groups = nm.to_groups(ranks.long(), m, in_axis)
    return torch.sort(groups, dim=-1, stable=True).indices[..., :k]


def ranks_from_order(order: Tensor, m: int) -> Tensor:
    """Group-view ranks whose first K positions are ``order`` (rank j at ``order[..., j]``).

    The other positions get ranks K..M-1 in in-group index order.
    """
    k = order.shape[-1]
    lead = order.shape[:-1]
    ranks = torch.empty((*lead, m), dtype=torch.int64)
    ranks.scatter_(-1, order, torch.arange(k).expand_as(order).contiguous())
    if k < m:
        taken = torch.zeros((*lead, m), dtype=torch.uint8)
        taken.scatter_(-1, order, 1)
        rest = torch.sort(taken, dim=-1, stable=True).indices[..., : m - k]
        ranks.scatter_(-1, rest, torch.arange(k, m).expand_as(rest).contiguous())
    return ranks


def canonical_ranks(band: Tensor, m: int, in_axis: int) -> Tensor:
    """Ranks that list band 0 first, then band 1...; in-group index order inside a band (uint8)."""
    order = torch.sort(nm.to_groups(band.long(), m, in_axis), dim=-1, stable=True).indices
    return nm.from_groups(ranks_from_order(order, m).to(torch.uint8), band.shape, in_axis)


def rank_cuts(ranks: Tensor, route_n: tuple[int, ...], m: int, in_axis: int) -> list[int] | None:
    """The fewest cuts (from the routes' N) whose bands reproduce ``ranks`` canonically, or None.

    PNG's ranks list a task's kept positions first, each part in index order: one cut, one bit.
    """
    values = sorted({n for n in route_n if 0 < n < m})
    for cuts in [[c] for c in values] + ([values] if len(values) > 1 else []):
        band = torch.bucketize(ranks.long(), torch.tensor(cuts), right=True)
        if torch.equal(canonical_ranks(band, m, in_axis), ranks):
            return cuts
    return None


def check_order(order: Tensor, m: int, layer: str) -> None:
    """Refuse indices outside 0..M-1 or repeated inside a group (a damaged or crafted file)."""
    if order.numel() == 0:
        return
    if int(order.max()) >= m:
        raise CheckpointError(f"packed layer {layer!r}: an in-group index is >= M={m}")
    if order.shape[-1] > 1:
        sorted_order = torch.sort(order, dim=-1).values
        if bool((sorted_order[..., 1:] == sorted_order[..., :-1]).any()):
            raise CheckpointError(f"packed layer {layer!r}: an in-group index repeats inside a group")


def packed_digest(tensors: dict[str, Tensor], header: dict[str, Any]) -> str:
    """SHA-256 over the tensors *and* the header (whose layer table the decoding trusts).

    The same scheme as training checkpoints (:func:`~nmrestore.engine.checkpoint.integrity_digest`).
    """
    return integrity_digest(tensors, header)


@dataclass(frozen=True)
class PackedLayer:
    """How one masked layer is stored, and what it costs (bytes of its weight only)."""

    name: str
    encoding: str  # ranked | banded | full | union | dense
    shape: tuple[int, ...]
    m: int
    route_n: tuple[int, ...]
    kept: int  # K: positions per group stored (ranked/full); the most any group keeps (union)
    in_axis: int
    stored_bytes: int
    dense_bytes: int


def state_keys(name: str, index: int) -> dict[str, str]:
    """``state_dict`` keys of a masked layer's dense weight, ranks and per-route N."""
    prefix = f"{name}." if name else ""
    mask = f"{prefix}parametrizations.weight.{index}."
    return {
        "original": f"{prefix}parametrizations.weight.original",
        "ranks": f"{mask}ranks",
        "route_n": f"{mask}route_n",
        "mask": mask,
    }


def mask_index(module: nn.Module, mask: NMMask) -> int:
    for index, p in enumerate(module.parametrizations.weight):
        if p is mask:
            return index
    raise CheckpointError("an N:M mask is not on its layer's weight")  # pragma: no cover - defensive


@torch.no_grad()
def masks_per_route(mask: NMMask) -> list[Tensor]:
    """The boolean mask of every route (the layer's active route is restored afterwards)."""
    previous = mask.route
    out = []
    try:
        for route in range(mask.num_routes):
            mask.set_route(route)
            out.append((mask.mask().detach() != 0).cpu())
    finally:
        mask.set_route(previous)
    return out


def prefix_sizes(mask: NMMask, route_masks: list[Tensor]) -> list[int] | None:
    """N_r per route when every route's mask is exactly ``rank < N_r``; None otherwise."""
    ranks = mask.ranks.long().cpu()
    sizes = []
    for keep in route_masks:
        counts = nm.to_groups(keep, mask.m, mask.in_axis).sum(-1)
        k = int(counts.flatten()[0]) if counts.numel() else 0
        if not bool((counts == k).all()) or not torch.equal(keep, ranks < k):
            return None
        sizes.append(k)
    return sizes


def banded_cheaper(original: Tensor, sizes: list[int], m: int) -> bool:
    """True when dense values + a band id per weight are smaller than K values + K indices per group.

    Happens when the largest route keeps (nearly) everything, e.g. ClassPruning's 8/16/32 of 32:
    the ranked form would store 32 values and 32 five-bit indices per group, the banded one 32
    values and 32 two-bit band ids.
    """
    kept, cuts = max(sizes), sorted(set(sizes))
    band_bits = max(1, (len(cuts) - (1 if kept == m else 0)).bit_length())
    groups = original.numel() // m
    ranked = groups * kept * (original.element_size() * 8 + nm.index_bits(m))
    banded = groups * m * (original.element_size() * 8 + band_bits)
    return banded < ranked
