"""Helpers shared by the kernel-level tests: the loaded kernel, N:M weights, one sparse conv call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st

from nmrestore.runtime import csr_from_dense, kernel_status, load_kernel
from nmrestore.runtime.kernel import KernelLibrary
from nmrestore.sparsity import nm


def kernel() -> KernelLibrary:
    """The compiled kernel, or skip the test (only on a machine without a compiler)."""
    lib = load_kernel()
    if lib is None:  # pragma: no cover - only on a machine without a compiler
        pytest.skip(kernel_status().reason)
    return lib


def half_kernel(half: torch.dtype) -> KernelLibrary:
    """The compiled kernel with its 16-bit (``half``: bf16 or fp16) kernels, or skip the test (a CPU
    without AVX512-BF16 / AVX512-FP16)."""
    lib = kernel()
    if not lib.has_half(half):
        status = kernel_status()
        pytest.skip(f"no {half} kernels here ({status.bf16_reason if half == torch.bfloat16 else status.f16_reason})")
    return lib


def half_conv(
    w: torch.Tensor,
    x: torch.Tensor,
    b: torch.Tensor | None = None,
    stride: int = 1,
    padding: int = 1,
    dilation: int = 1,
    groups: int = 1,
    *,
    half: torch.dtype,
    **kwargs: object,
) -> torch.Tensor:
    """``w`` applied to ``x`` by the 16-bit kernel of dtype ``half`` (weights rounded to it);
    ``kwargs`` go to :meth:`KernelLibrary.conv2d`."""
    csr = csr_from_dense(w, groups)
    return half_kernel(half).conv2d(
        x, csr.rowptr, csr.cin, csr.kpos, csr.values.to(half), b, w.shape[0],
        (w.shape[2], w.shape[3]), (stride, stride), (padding, padding), (dilation, dilation),
        **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


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


def two_routes_side_by_side(left: torch.Tensor, right: torch.Tensor, handoff: torch.Tensor) -> float:
    """Largest difference to PyTorch of one ``nmk_conv2d_tiles`` call over a 1 x C x 8 x 64 hand-off
    input (``handoff``, zero-bordered by 1): its left half on the route of weight ``left``, its right
    half on ``right`` (3x3, same C), written in place into a hand-off output."""
    lib = kernel()
    c = left.shape[0]
    b = torch.randn(c)
    out = lib.handoff_empty((1, c, 8, 64), (1, 1))
    tiles = [(0, 0, 8, 32, 0), (0, 32, 8, 32, 1)]
    lib.conv2d_tiles(handoff, tiles, [csr_from_dense(left), csr_from_dense(right)], b, out, (3, 3), (1, 1))
    plain = handoff.contiguous()
    ref = torch.cat(
        [F.conv2d(plain, left, b, padding=1)[..., :32], F.conv2d(plain, right, b, padding=1)[..., 32:]], dim=-1
    )
    return float((out - ref).abs().max())


def geometry_error(w: torch.Tensor, x: torch.Tensor, b: torch.Tensor, stride: int, dilation: int) -> float:
    """Largest difference to PyTorch of the kernel's conv of ``x`` by ``w`` ('same' padding for its
    dilation) at ``stride`` / ``dilation``, after checking that the shapes agree."""
    pad = dilation * (w.shape[2] - 1) // 2
    ref = F.conv2d(x, w, b, stride=stride, padding=pad, dilation=dilation)
    out = sparse_conv(w, x, b, stride, pad, dilation)
    assert out.shape == ref.shape
    return float((out - ref).abs().max())


def residual_block_matches(first: torch.Tensor, second: torch.Tensor, relu: bool, border: int, tol: float) -> bool:
    """A residual block as the engine runs it on a 1 x C x 6 x 70 input: ``first`` hands its output
    over in a buffer zero-bordered by ``border``, read in place by ``second`` (border 0: the input
    goes to ``second`` as a plain tensor), which adds 0.5 x its conv to a skip and applies the ReLU."""
    c = first.shape[0]
    x = torch.randn(1, c, 6, 70)
    h = sparse_conv(first, x, out_pad=(border, border)) if border else x
    ref_h = F.conv2d(x, first, padding=1) if border else x
    b = torch.randn(c)
    skip = torch.randn(1, c, 6, 70)
    out = sparse_conv(second, h, b, relu=relu, residual=skip, res_scale=0.5)
    ref = 0.5 * F.conv2d(ref_h, second, b, padding=1) + skip
    ref = F.relu(ref) if relu else ref
    return torch.allclose(out, ref, rtol=1e-5, atol=tol)


#: Hypothesis strategies for one conv of a property test: N kept of M, kernel size, input size, seed.
CONV_CASE = {
    "n": st.sampled_from([1, 2, 4]),
    "k": st.sampled_from([1, 3]),
    "h": st.integers(1, 9),
    "w": st.integers(1, 80),
    "seed": st.integers(0, 2**16),
}


def seeded_conv_error(weight: torch.Tensor, h: int, w: int, seed: int) -> float:
    """Largest difference to PyTorch's 'same' conv of ``weight`` on a seeded 1 x C x h x w input with
    a seeded bias."""
    o, c, k = weight.shape[0], weight.shape[1], weight.shape[2]
    x = torch.randn(1, c, h, w, generator=torch.Generator().manual_seed(seed))
    b = torch.randn(o, generator=torch.Generator().manual_seed(seed + 1))
    ref = F.conv2d(x, weight, b, padding=k // 2)
    return float((sparse_conv(weight, x, b, 1, k // 2) - ref).abs().max())


def fused_and_apart(
    monkeypatch: pytest.MonkeyPatch, engine: torch.nn.Module, x: torch.Tensor, owner: type, method: str
) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """``engine(x)`` once its tactics are decided, with ``owner.method`` (a fused call that returns
    None where it does not apply) watched, then again with that call turned off: (fused output,
    output apart, whether each call ran fused)."""
    calls: list[bool] = []
    original = getattr(owner, method)

    def spy(self: object, inp: torch.Tensor) -> torch.Tensor | None:
        out = original(self, inp)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(owner, method, spy)
    with torch.no_grad():
        engine(x)  # decides the tactics (each conv alone)
        calls.clear()
        fused = engine(x)
        ran = list(calls)
        monkeypatch.setattr(owner, method, lambda self, inp: None)
        apart = engine(x)
    return fused, apart, ran


def amx_kernel() -> KernelLibrary:
    """The kernel library with its bf16 AMX path, or the test skipped where there is none."""
    lib = half_kernel(torch.bfloat16)
    if not lib.has_amx:
        pytest.skip("no AMX path here (a CPU without AMX-BF16, or NMRESTORE_DISABLE_AMX)")
    return lib


def block_shared_weight(shape: tuple[int, ...], n: int, m: int, seed: int = 0) -> torch.Tensor:
    """A seeded random weight pruned to N:M along input channels, one mask per 16 output channels."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return w * (nm.compute_ranks(nm.block_scores(w.abs(), 16), m) < n)
