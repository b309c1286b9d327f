"""Pure N:M tensor math: group views, ranks, masks, pattern checks, pack/unpack.

Conventions (docs/ARCHITECTURE.md, section 2), fixed here and nowhere else:

* A *group* is M consecutive **input** channels at a fixed output channel and kernel position.
  For ``Conv2d``/``Linear`` weights ``(O, I, ...)`` the input axis is 1; for ``ConvTranspose2d``
  weights ``(I, O/g, kh, kw)`` it is 0. Grouped convolutions store ``I/g`` input channels per
  group on that axis, so grouping M consecutive entries of it stays inside one conv group as long
  as ``M`` divides ``I/g``.
* **N counts kept weights** (2:4 keeps 2 of 4).
* Each weight has a **rank** inside its group (uint8, 0 = most important). The mask for N is
  ``rank < N``, so masks for different N are nested by construction. Ties are broken towards the
  lower in-group index, which makes ranks deterministic.

No modules and no state live here: everything is a function of tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from nmrestore.errors import SparsityError

#: A criterion maps a weight tensor to an importance score of the same shape (higher = keep).
Criterion = Callable[[Tensor], Tensor]


def magnitude(weight: Tensor) -> Tensor:
    """The default criterion: |w|."""
    return weight.detach().abs()


def check_divisible(weight_shape: tuple[int, ...] | torch.Size, m: int, in_axis: int = 1) -> None:
    """Raise :class:`SparsityError` unless the input axis splits into whole groups of ``m``."""
    if m < 1 or m > 255:
        raise SparsityError(f"M must be in 1..255 (ranks are uint8), got {m}")
    size = weight_shape[in_axis]
    if size % m:
        raise SparsityError(f"{size} input channels are not a multiple of M={m}")


def to_groups(t: Tensor, m: int, in_axis: int = 1) -> Tensor:
    """View ``t`` as ``(..., I/M, M)`` with groups of M consecutive input channels last.

    The other axes keep their order (output channel first, then kernel positions), so the
    result is ``(O, kh, kw, I/M, M)`` for a Conv2d weight and ``(O, I/M, M)`` for a Linear one.
    """
    check_divisible(t.shape, m, in_axis)
    moved = t.movedim(in_axis, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)


def from_groups(g: Tensor, shape: tuple[int, ...] | torch.Size, in_axis: int = 1) -> Tensor:
    """Inverse of :func:`to_groups` for a tensor of the original ``shape``."""
    moved_shape = list(shape)
    channels = moved_shape.pop(in_axis)
    flat = g.reshape(*moved_shape, channels)
    return flat.movedim(-1, in_axis)


def ranks_from_scores(scores: Tensor, m: int, in_axis: int = 1) -> Tensor:
    """Rank of every entry inside its group of M (uint8, same shape as ``scores``; 0 = best).

    A stable descending sort breaks ties towards the lower in-group index.
    """
    g = to_groups(scores, m, in_axis)
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(m, device=g.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return from_groups(ranks.to(torch.uint8), scores.shape, in_axis)


def compute_ranks(weight: Tensor, m: int, in_axis: int = 1, criterion: Criterion = magnitude) -> Tensor:
    """Ranks of ``weight`` under ``criterion`` (magnitude by default)."""
    with torch.no_grad():
        return ranks_from_scores(criterion(weight), m, in_axis)


def block_scores(scores: Tensor, block: int, out_axis: int = 0) -> Tensor:
    """``scores`` summed over blocks of ``block`` consecutive output channels, every channel of a
    block given its block's sum (same shape): ranks from it are the same for the whole block.

    Why blocks: when the output channels of a block keep the same inputs, the block's kept inputs
    form one dense reduction axis, the shape matrix units (AMX tiles) multiply."""
    if block < 1:
        raise SparsityError(f"out_block must be >= 1, got {block}")
    size = scores.shape[out_axis]
    if size % block:
        raise SparsityError(f"{size} output channels are not a multiple of out_block={block}")
    if block == 1:
        return scores
    moved = scores.movedim(out_axis, 0)
    grouped = moved.reshape(size // block, block, *moved.shape[1:])
    summed = grouped.sum(1, keepdim=True).expand_as(grouped).reshape(moved.shape)
    return summed.movedim(0, out_axis)


def blocked(criterion: Criterion, block: int, out_axis: int = 0) -> Criterion:
    """``criterion`` with its scores shared by blocks of output channels (see :func:`block_scores`)."""
    if block == 1:
        return criterion

    def score(weight: Tensor) -> Tensor:
        return block_scores(criterion(weight), block, out_axis)

    return score


def ranks_are_permutations(ranks: Tensor, m: int, in_axis: int = 1) -> bool:
    """True when every group of ``ranks`` holds each of 0..M-1 exactly once.

    The one check of a rank tensor's validity (pattern checks and checkpoint loading use it).
    """
    groups = to_groups(ranks.long(), m, in_axis)
    return bool((torch.sort(groups, dim=-1).values == torch.arange(m, device=groups.device)).all())


def mask_from_ranks(ranks: Tensor, n: int) -> Tensor:
    """Boolean mask keeping the N best-ranked weights of every group: ``rank < N``."""
    return ranks < n


def keep_table(n: int, m: int, device: torch.device | None = None) -> Tensor:
    """Float vector of length M with ones at ranks ``< n``: ``mask = keep_table[ranks]``.

    Methods that learn N (SLS) replace this table by a differentiable one, so a mask stays a
    gather from one small vector whatever produced it.
    """
    if not 1 <= n <= m:
        raise SparsityError(f"N must be in 1..M={m}, got {n}")
    return (torch.arange(m, device=device) < n).float()


def is_nm(weight_or_mask: Tensor, n: int, m: int, in_axis: int = 1) -> bool:
    """True when no group of M holds more than N non-zero entries."""
    nonzero = to_groups(weight_or_mask != 0, m, in_axis).sum(-1)
    return bool((nonzero <= n).all())


def density(weight_or_mask: Tensor) -> float:
    """Fraction of non-zero entries."""
    return float((weight_or_mask != 0).float().mean()) if weight_or_mask.numel() else 0.0


def index_bits(m: int) -> int:
    """Bits needed for one in-group index (0..M-1)."""
    return max(1, math.ceil(math.log2(m)))


@dataclass(frozen=True)
class PackedNM:
    """Kept values and their in-group indices; everything needed to rebuild the dense tensor.

    ``values`` has shape ``(..., I/M, N)`` (the group view with the M axis cut to N), ordered by
    in-group index; ``indices`` is the bit-packed stream of those indices, ``index_bits(M)`` bits
    each (big-endian bit order, as :func:`numpy.packbits`).
    """

    values: Tensor
    indices: Tensor  # uint8, 1-D
    shape: tuple[int, ...]
    n: int
    m: int
    in_axis: int

    @property
    def nbytes(self) -> int:
        """Storage of values plus indices, in bytes."""
        return self.values.numel() * self.values.element_size() + self.indices.numel()


def pack(weight: Tensor, ranks: Tensor, n: int, m: int, in_axis: int = 1) -> PackedNM:
    """Pack the N kept entries (``rank < n``) of every group with their in-group indices."""
    if not 1 <= n <= m:
        raise SparsityError(f"N must be in 1..M={m}, got {n}")
    w = to_groups(weight.detach(), m, in_axis)
    keep = to_groups(ranks, m, in_axis) < n
    counts = keep.sum(-1)
    if not bool((counts == n).all()):
        raise SparsityError("ranks do not describe a permutation of 0..M-1 in every group")
    # Sorting the keep flags (stable, descending) lists kept positions first, in index order.
    idx = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[..., :n]
    values = torch.gather(w, -1, idx).contiguous()
    bits = index_bits(m)
    idx_np = idx.to(torch.uint8).cpu().numpy().reshape(-1, 1)
    bit_planes = np.unpackbits(idx_np, axis=1)[:, 8 - bits :]
    packed = torch.from_numpy(np.packbits(bit_planes.reshape(-1)).copy())
    return PackedNM(values.cpu(), packed, tuple(weight.shape), n, m, in_axis)


def unpack_indices(packed: PackedNM) -> Tensor:
    """The in-group indices of a :class:`PackedNM`, as int64 of the values' shape."""
    bits = index_bits(packed.m)
    count = packed.values.numel()
    stream = np.unpackbits(packed.indices.numpy())[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), dtype=np.uint8)
    full[:, 8 - bits :] = stream
    idx = np.packbits(full, axis=1).reshape(packed.values.shape)
    return torch.from_numpy(idx.astype(np.int64))


def unpack(packed: PackedNM) -> Tensor:
    """Rebuild the dense-with-zeros tensor from a :class:`PackedNM` (exact)."""
    idx = unpack_indices(packed)
    groups_shape = (*packed.values.shape[:-1], packed.m)
    dense = torch.zeros(groups_shape, dtype=packed.values.dtype)
    dense.scatter_(-1, idx, packed.values)
    return from_groups(dense, packed.shape, packed.in_axis)


def packed_nbytes(numel: int, n: int, m: int, value_bytes: int = 4) -> int:
    """Bytes of a packed N:M tensor with ``numel`` dense entries (values + bit-packed indices)."""
    kept = numel // m * n
    return kept * value_bytes + math.ceil(kept * index_bits(m) / 8)
