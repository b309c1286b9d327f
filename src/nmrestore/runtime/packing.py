"""The kernels' weight form: the kept weights of each output channel as a compressed row.

An N:M layer keeps N of every M consecutive input channels at each (output channel, kh, kw)
(docs/ARCHITECTURE.md, section 2). For the direct sparse convolution what matters per output channel is the list of
kept (input channel, kernel position, value), i.e. a CSR row: ``rowptr`` (O+1), ``cin`` (absolute
input channel), ``kpos`` (``kh * KW + kw``) and ``values``. It is built either from a
:class:`~nmrestore.sparsity.nm.PackedNM` (kept values + in-group indices: channel = group * M +
index) or from any dense-with-zeros weight (a squashed model, a mask's effective weight).

Within a row the entries are ordered by (kh, channel, kw): that is ascending address order in the
kernel's (row, channel, column) workspace, so one output channel walks its input forwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from nmrestore.errors import SparsityError
from nmrestore.sparsity import nm

#: Group sizes tried when the N:M pattern of a plain (squashed) weight is detected from its zeros.
DETECT_MS: tuple[int, ...] = (4, 8, 16, 32, 64)


@dataclass(frozen=True)
class CSRWeight:
    """Kept weights of a Conv2d (``(O, I/g, KH, KW)``) or Linear (``(O, I)``) layer, per output row."""

    rowptr: Tensor  # int32 (O + 1,)
    cin: Tensor  # int32 (nnz,), absolute input channel / feature
    kpos: Tensor  # int32 (nnz,), kh * KW + kw (0 for Linear)
    values: Tensor  # float32 (nnz,)
    shape: tuple[int, ...]  # the dense weight's shape
    groups: int = 1

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        total = 1
        for s in self.shape:
            total *= s
        return self.nnz / total if total else 0.0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rowptr, self.cin, self.kpos, self.values))


def _rows_to_csr(weight: Tensor, keep: Tensor, groups: int) -> CSRWeight:
    """CSR of ``weight`` (Conv ``(O, Ig, KH, KW)`` or Linear ``(O, I)``) at positions ``keep``."""
    w = weight.detach().float().cpu()
    keep = keep.cpu()
    if w.dim() == 2:
        w, keep = w[:, :, None, None], keep[:, :, None, None]
    o, ig, _, kw = w.shape
    if o % groups:
        raise SparsityError(f"{o} output channels do not split into {groups} groups")
    # (O, KH, Ig, KW): the kernel's address order (row, channel, column).
    wo = w.permute(0, 2, 1, 3).reshape(o, -1)
    ko = keep.permute(0, 2, 1, 3).reshape(o, -1)
    counts = ko.sum(1)
    rowptr = torch.zeros(o + 1, dtype=torch.int64)
    rowptr[1:] = counts.cumsum(0)
    row, flat = ko.nonzero(as_tuple=True)
    r_kh = flat // (ig * kw)
    c_local = (flat // kw) % ig
    r_kw = flat % kw
    group_of_row = row // (o // groups)
    cin = group_of_row * ig + c_local
    return CSRWeight(
        rowptr.to(torch.int32),
        cin.to(torch.int32).contiguous(),
        (r_kh * kw + r_kw).to(torch.int32).contiguous(),
        wo[row, flat].contiguous(),
        tuple(weight.shape),
        groups,
    )


def csr_from_dense(weight: Tensor, groups: int = 1) -> CSRWeight:
    """CSR of the non-zero entries of a dense-with-zeros weight."""
    if weight.dim() not in (2, 4):
        raise SparsityError(f"expected a Conv2d or Linear weight, got shape {tuple(weight.shape)}")
    return _rows_to_csr(weight, weight.detach() != 0, groups)


def csr_from_packed(packed: nm.PackedNM, groups: int = 1) -> CSRWeight:
    """CSR straight from kept values + in-group indices (no dense tensor in between).

    Every kept entry is listed, zero-valued ones included, so each output row holds exactly
    ``N * I/M * KH * KW`` entries.
    """
    if packed.in_axis != 1:
        raise SparsityError("only Conv2d/Linear weights (input axis 1) run on the sparse kernel")
    idx = nm.unpack_indices(packed)  # (O, KH, KW, I/M, N) or (O, I/M, N)
    values = packed.values.float()
    shape = packed.shape
    if len(shape) == 2:
        idx, values = idx[:, None, None], values[:, None, None]
    o, kh, kw, n_groups, _ = idx.shape
    ig = n_groups * packed.m
    channel = torch.arange(n_groups).view(1, 1, 1, n_groups, 1) * packed.m + idx  # in-group -> local channel
    kh_i = torch.arange(kh).view(1, kh, 1, 1, 1).expand_as(channel)
    kw_i = torch.arange(kw).view(1, 1, kw, 1, 1).expand_as(channel)
    key = (kh_i * ig + channel) * kw + kw_i  # (kh, channel, kw) address order
    key, values = key.reshape(o, -1), values.reshape(o, -1)
    order = key.argsort(dim=1)
    key = key.gather(1, order)
    values = values.gather(1, order)
    per_row = key.shape[1]
    c_local = (key // kw) % ig
    group_of_row = (torch.arange(o) // (o // groups)).view(o, 1)
    cin = group_of_row * ig + c_local
    kpos = (key // (ig * kw)) * kw + key % kw
    rowptr = torch.arange(o + 1, dtype=torch.int64) * per_row
    return CSRWeight(
        rowptr.to(torch.int32),
        cin.reshape(-1).to(torch.int32).contiguous(),
        kpos.reshape(-1).to(torch.int32).contiguous(),
        values.reshape(-1).contiguous(),
        tuple(shape),
        groups,
    )


def detect_nm(weight: Tensor, ms: tuple[int, ...] = DETECT_MS) -> tuple[int, int] | None:
    """The sparsest N:M pattern the zeros of ``weight`` satisfy (None when no M fits or N = M).

    N is the largest number of non-zeros found in one group; among the group sizes that divide
    the input channels the smallest N/M wins, the smaller M on a tie (2:4 rather than 16:32).
    """
    best: tuple[int, int] | None = None
    for m in ms:
        if weight.dim() < 2 or weight.shape[1] % m:
            continue
        n = int(nm.to_groups(weight.detach() != 0, m).sum(-1).max()) if weight.numel() else 0
        n = max(n, 1)
        if n < m and (best is None or n / m < best[0] / best[1]):
            best = (n, m)
    return best
