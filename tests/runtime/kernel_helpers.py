"""Helpers shared by the kernel-level tests: the loaded kernel, N:M weights, one sparse conv call."""

from __future__ import annotations

import pytest
import torch

from nmrestore.runtime import csr_from_dense, kernel_status, load_kernel
from nmrestore.runtime.kernel import KernelLibrary
from nmrestore.sparsity import nm


def kernel() -> KernelLibrary:
    """The compiled kernel, or skip the test (only on a machine without a compiler)."""
    lib = load_kernel()
    if lib is None:  # pragma: no cover - only on a machine without a compiler
        pytest.skip(kernel_status().reason)
    return lib


def nm_weight(shape: tuple[int, ...], n: int, m: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A seeded random weight pruned to N:M along input channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * scale
    return w * (nm.compute_ranks(w, m) < n)


def sparse_conv(
    w: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    groups: int = 1,
    **kwargs: object,
) -> torch.Tensor:
    """``w`` (dense with zeros) applied to ``x`` (any strides) by the kernel; ``kwargs`` go to
    :meth:`KernelLibrary.conv2d` (relu, residual, shuffle, out_pad, ...)."""
    csr = csr_from_dense(w, groups)
    return kernel().conv2d(
        x,
        csr.rowptr,
        csr.cin,
        csr.kpos,
        csr.values,
        bias,
        w.shape[0],
        (w.shape[2], w.shape[3]),
        (stride, stride),
        (padding, padding),
        (dilation, dilation),
        **kwargs,  # type: ignore[arg-type]
    )
