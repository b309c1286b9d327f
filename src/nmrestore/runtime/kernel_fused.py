"""The kernel library's fused calls on AMX (bf16): a residual block in one call
(:meth:`FusedCalls.block_bf16`) and EDSR's tail in one call (:meth:`FusedCalls.tail_bf16`); each keeps
the activation between its two convs in the thread's L2 (``csrc/nm_amx_block.h``, ``csrc/nm_amx_tail.h``).
A mixin of :class:`nmrestore.runtime.kernel_lib.KernelLibrary`, whose loading, inputs and outputs
these use."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from nmrestore.runtime.handoff import SHADOW_ATTR, Pair, half_shadow
from nmrestore.runtime.packing import CSRWeight


@dataclass(frozen=True)
class FusedConv:
    """One conv of a fused call: its weights, bf16 values, bias and geometry (stride 1)."""

    csr: CSRWeight
    values: Tensor  # bfloat16, the CSR's order
    bias: Tensor | None
    out_channels: int
    kernel_size: Pair
    padding: Pair
    dilation: Pair
    relu: bool = False


class FusedCalls:
    """The fused entry points (see the module's text)."""

    if TYPE_CHECKING:  # provided by KernelLibrary
        _lib: Any
        _params: Any
        has_amx: bool

        def accepts_handoff(self, x: Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
                            half: torch.dtype | None = None) -> bool: ...  # fmt: skip
        def _input(self, x: Tensor, geometry: tuple[Pair, Pair, Pair, Pair], half: torch.dtype | None) -> Any: ...
        def _output(self, shape: tuple[int, int, int, int], pad: Pair | None, half: torch.dtype | None) -> Any: ...
        def _output_buffer(self, floats: int) -> Tensor: ...
        @staticmethod
        def _borders_written(*outs: Tensor | None) -> None: ...

    def block_bf16(
        self,
        x: Tensor,
        first: tuple[CSRWeight, Tensor, Tensor | None, bool],
        second: tuple[CSRWeight, Tensor, Tensor | None],
        res_scale: float = 1.0,
        relu: bool = False,
        pad: Pair = (1, 1),
        half_only: bool = True,
        threads: int | None = None,
    ) -> Tensor | None:
        """A residual block ``act(res_scale * conv2(act1(conv1(x))) + x)`` in one bf16 kernel call on
        AMX (3x3 convs, stride 1, padding 1, C -> C, masks shared by blocks of 16 output channels),
        the intermediate kept in each thread's L2. ``first`` = (weights, bf16 values, bias, ReLU),
        ``second`` = (weights, bf16 values, bias); ``x`` a bf16 hand-off view with a border of at
        least 1, or an f32 tensor with such a shadow (:func:`half_shadow`, the skip then added in f32). Returns a bf16 hand-off of the output with border ``pad`` (with ``half_only``; else
        f32 with its bf16 shadow), or None where the block does not qualify (the caller runs the two
        convs)."""
        geometry = ((3, 3), (1, 1), (1, 1), (1, 1))
        b, c, h, w = x.shape
        # conv1 reads the bf16 hand-off (x itself, or an f32 x's bf16 shadow); the skip adds x as it is
        src_x = x if x.dtype == torch.bfloat16 else half_shadow(x, torch.bfloat16) if x.dtype == torch.float32 else None
        if not self.has_amx or src_x is None or x.stride(3) != 1 or not self.accepts_handoff(src_x, *geometry, half=torch.bfloat16):
            return None
        (csr1, v1, b1, relu1), (csr2, v2, b2) = first, second
        (src, strides), _, _ = self._input(src_x, geometry, torch.bfloat16)
        out, zero = self._output(x.shape, pad, None) if not half_only else (None, ())  # type: ignore[arg-type]
        out2, zero2 = self._output(x.shape, pad, torch.bfloat16)  # type: ignore[arg-type]
        os_ = (out.stride(0), out.stride(1), out.stride(2)) if out is not None else (0, 0, 0)
        params = self._params(
            b, c, h, w, c, 3, 3, 1, 1, 1, 1, 1, 1, *strides, 1, int(relu), x.stride(0), x.stride(1), x.stride(2),
            *os_, 1, *(zero or (0, 0, 0, 0)), threads or torch.get_num_threads(), 1, int(out is not None),
            out2.stride(0), out2.stride(1), out2.stride(2), *zero2, int(x.dtype == torch.bfloat16),
        )  # fmt: skip
        start = src.data_ptr() - src.element_size() * (strides[2] + 1)  # the padded top-left
        status = self._lib.nmk_block_bf16(
            params, start, None, csr1.rowptr.data_ptr(), csr1.cin.data_ptr(), csr1.kpos.data_ptr(), v1.data_ptr(),
            b1.data_ptr() if b1 is not None else None, int(relu1), csr2.rowptr.data_ptr(), csr2.cin.data_ptr(),
            csr2.kpos.data_ptr(), v2.data_ptr(), b2.data_ptr() if b2 is not None else None, x.data_ptr(),
            float(res_scale), out.data_ptr() if out is not None else None, out2.data_ptr(),
        )  # fmt: skip
        if status == -4:
            return None
        if status != 0:
            raise RuntimeError(f"fused block kernel rejected input {tuple(x.shape)} (status {status})")
        self._borders_written(out, out2)
        if out is None:
            return out2
        setattr(out, SHADOW_ATTR, (out2, out._version))
        return out

    def tail_bf16(self, x: Tensor, upsampler: FusedConv, shuffle: int, last: FusedConv,
                  threads: int | None = None) -> Tensor | None:  # fmt: skip
        """EDSR's and RCAN's tail in one bf16 call on AMX: ``last(pixel_shuffle(upsampler(x), shuffle))``
        with ``upsampler``'s masks shared by blocks of 16 output channels and ``last`` a dense 3x3 conv
        with padding 1 and few outputs (``O * 3 <= 16``); the shuffled activation stays in each thread's
        L2. ``x``: a bf16 hand-off view the upsampler reads in place, or an f32 tensor with such a
        shadow. Returns ``last``'s f32 output, or None where they do not qualify (the caller runs the
        two convs)."""
        src_x = x if x.dtype == torch.bfloat16 else half_shadow(x, torch.bfloat16) if x.dtype == torch.float32 else None
        up, r = upsampler, shuffle
        geometry = (up.kernel_size, (1, 1), up.padding, up.dilation)
        if not self.has_amx or src_x is None or r < 2 or up.out_channels % (r * r):
            return None
        if not self.accepts_handoff(src_x, *geometry, half=torch.bfloat16):
            return None
        b, c, h, w = x.shape
        (kh, kw), (ph, pw), (dh, dw) = up.kernel_size, up.padding, up.dilation
        ho, wo = h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)
        c2, h2, w2 = up.out_channels // (r * r), ho * r, wo * r
        (lkh, lkw), (lph, lpw), (ldh, ldw) = last.kernel_size, last.padding, last.dilation
        shape = (b, last.out_channels, h2 + 2 * lph - ldh * (lkh - 1), w2 + 2 * lpw - ldw * (lkw - 1))
        if min(shape) <= 0:
            return None
        (src, strides), _, _ = self._input(src_x, geometry, torch.bfloat16)
        out = self._output_buffer(shape[0] * shape[1] * shape[2] * shape[3]).view(shape)
        n = threads or torch.get_num_threads()
        params = self._params(
            b, c, h, w, up.out_channels, kh, kw, 1, 1, ph, pw, dh, dw, *strides, 1, int(up.relu), 0, 0, 0,
            0, 0, 0, r, 0, 0, 0, 0, n, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        params2 = self._params(
            b, c2, h2, w2, last.out_channels, lkh, lkw, 1, 1, lph, lpw, ldh, ldw, 0, 0, 0, 0, int(last.relu),
            0, 0, 0, out.stride(0), out.stride(1), out.stride(2), 1, 0, 0, 0, 0, n, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0,
        )  # fmt: skip
        start = src.data_ptr() - src.element_size() * (ph * strides[2] + pw)  # the padded top-left
        status = self._lib.nmk_tail_bf16(
            params, params2, start, up.csr.rowptr.data_ptr(), up.csr.cin.data_ptr(), up.csr.kpos.data_ptr(),
            up.values.data_ptr(), up.bias.data_ptr() if up.bias is not None else None, last.csr.rowptr.data_ptr(),
            last.csr.cin.data_ptr(), last.csr.kpos.data_ptr(), last.values.data_ptr(),
            last.bias.data_ptr() if last.bias is not None else None, out.data_ptr(),
        )  # fmt: skip
        if status == -4:
            return None
        if status != 0:
            raise RuntimeError(f"fused tail kernel rejected input {tuple(x.shape)} (status {status})")
        return out
