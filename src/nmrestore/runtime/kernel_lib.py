"""The loaded C++ kernel library (:mod:`ctypes` bindings), its hand-off layouts and output pool.

Built and loaded by :mod:`nmrestore.runtime.kernel`. Three conv entry points share one parameter
block (``csrc/nm_common.h``): the f32 kernel (``nm_kernels.cpp``), in a build for a CPU with
AVX512-BF16 the bf16 one (``nm_bf16.cpp``: bf16 activations and weights, f32 accumulation), and in
a build for a CPU with AVX512-FP16 the fp16 one (``nm_fp16.cpp``: fp16 activations, weights and
sums). :meth:`KernelLibrary.conv2d` picks by the dtype of the weight values it is given.

**Hand-off layout.** A conv's output can be written straight into the zero-bordered
(image, row, channel, column) buffer that the kernel otherwise builds by copying (padding) its
input; the caller gets the valid region as an ordinary strided (B, C, H, W) view
(:class:`HandoffLayout` tags it), and a following sparse conv reads that buffer in place. Chains
of sparse convs (EDSR/RCAN residual bodies) then skip the per-layer padding pass, a full
read+write of the activation, which at 2:32 costs more than the convolution itself.

**16-bit hand-off.** The bf16 and fp16 kernels read input of their own 16-bit dtype (the *half*
dtype); given f32 they convert while padding. Their output can additionally (or only) be a
hand-off view of that dtype. "Additionally" is a *shadow*: the f32 output carries the 16-bit copy
as an attribute, stamped with the f32 tensor's version counter, so a consumer of that dtype reads
the copy only while nothing has modified the f32 tensor in place (EDSR's ``res += x``), and every
other consumer sees an ordinary f32 tensor. "Only" is for a producer whose sole consumer is known
to be that 16-bit conv (the first conv of a fused residual block).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from nmrestore.runtime.handoff import (
    HALF_DTYPES,
    HALF_NAMES,
    LAYOUT_ATTR,
    SHADOW_ATTR,
    HandoffLayout,
    Pair,
    half_shadow,
    handoff_layout,
)
from nmrestore.runtime.kernel_fused import FusedCalls
from nmrestore.runtime.packing import CSRWeight

ABI_VERSION = 11

#: Output buffers kept per size, and distinct sizes kept, by :meth:`KernelLibrary._output_buffer`.
POOL_PER_SIZE = 6
POOL_SIZES = 24
#: Attributes: on a pooled buffer, the zero border its last hand-off writer left; on a hand-off view
#: from :meth:`KernelLibrary._output`, the border its kernel zeroes; on any hand-off view, its pooled
#: buffer and the border that buffer had when handed out.
CLEAN_ATTR, BORDER_ATTR, BUFFER_ATTR = "_nmk_clean", "_nmk_border", "_nmk_buffer"


def _storage_use_count() -> Callable[[Tensor], int] | None:
    """How many owners a tensor's storage has (None where this torch does not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover - older/newer torch: outputs are not pooled
        return None
    return lambda t: int(count(t.untyped_storage()._cdata))


_use_count = _storage_use_count()

class KernelLibrary(FusedCalls):
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL, bf16_allowed: bool = True, f16_allowed: bool = True) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._lib = lib
        lib.nmk_abi_version.restype = i32
        ints = ("nmk_vector_floats", "nmk_tile_rows", "nmk_tile_cols", "nmk_openmp", "nmk_param_count")
        ints += ("nmk_has_bf16", "nmk_bf16_tile_rows", "nmk_bf16_tile_cols")
        ints += ("nmk_has_f16", "nmk_f16_tile_rows", "nmk_f16_tile_cols")
        ints += ("nmk_has_amx",)
        for name in ints:
            getattr(lib, name).restype = i32
            getattr(lib, name).argtypes = []
        lib.nmk_amx_convs.restype = i64
        lib.nmk_amx_convs.argtypes = []
        lib.nmk_conv2d_workspace.restype = i64
        lib.nmk_conv2d_workspace.argtypes = [i64] * 12
        for name in ("nmk_conv2d_rows_read", "nmk_bf16_rows_read", "nmk_f16_rows_read"):
            getattr(lib, name).restype = i64
            getattr(lib, name).argtypes = [i64] * 5
        for name in ("nmk_conv2d_tail_slack", "nmk_bf16_tail_slack", "nmk_f16_tail_slack"):
            getattr(lib, name).restype = i64
            getattr(lib, name).argtypes = [i64]
        for name in ("nmk_bf16_workspace", "nmk_f16_workspace"):
            getattr(lib, name).restype = i64
            getattr(lib, name).argtypes = [p]
        lib.nmk_conv2d_ex.restype = i32
        lib.nmk_conv2d_ex.argtypes = [p, p, p, p, p, p, p, p, p, ctypes.c_float, p]
        lib.nmk_conv2d_tiles.restype = i32
        lib.nmk_conv2d_tiles.argtypes = [p, p, p, p, p, p, i32, p, p, p, ctypes.c_float, p]
        for name in ("nmk_conv2d_bf16", "nmk_conv2d_f16"):
            getattr(lib, name).restype = i32
            getattr(lib, name).argtypes = [p, p, p, p, p, p, p, p, p, ctypes.c_float, p, p]
        lib.nmk_block_bf16.restype = i32
        lib.nmk_block_bf16.argtypes = [p, p, p, p, p, p, p, p, i32, p, p, p, p, p, p, ctypes.c_float, p, p]
        lib.nmk_tail_bf16.restype = i32
        lib.nmk_tail_bf16.argtypes = [p] * 14
        self._params = ctypes.c_int64 * int(lib.nmk_param_count())
        lib.nmk_conv_channel_block.restype = i32
        lib.nmk_conv_channel_block.argtypes = [p, p, p, i64, i64]
        lib.nmk_conv_input_blocks.restype = i32
        lib.nmk_conv_input_blocks.argtypes = [p, p, p, i64, i64, i64, i64]
        lib.nmk_linear.restype = i32
        lib.nmk_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i32, p, i32]
        self.abi = int(lib.nmk_abi_version())
        self.vector_floats = int(lib.nmk_vector_floats())
        self.tile = (int(lib.nmk_tile_rows()), int(lib.nmk_tile_cols()))
        self.openmp = bool(lib.nmk_openmp())
        #: The bf16 kernels are compiled in (and not switched off): precision="bf16" may use them.
        self.has_bf16 = bool(lib.nmk_has_bf16()) and bf16_allowed
        self.bf16_tile = (int(lib.nmk_bf16_tile_rows()), int(lib.nmk_bf16_tile_cols()))
        #: The fp16 kernels are compiled in (and not switched off): precision="fp16" may use them.
        self.has_f16 = bool(lib.nmk_has_f16()) and f16_allowed
        self.f16_tile = (int(lib.nmk_f16_tile_rows()), int(lib.nmk_f16_tile_cols()))
        # the bf16 conv's AMX path (csrc/nm_amx.h): masks shared by blocks of 16 output channels, dense convs
        self._amx_built = self.has_bf16 and bool(lib.nmk_has_amx())
        # per half dtype: (rows_read, tail_slack, workspace, conv) entry points
        self._half_fns = {
            torch.bfloat16: (lib.nmk_bf16_rows_read, lib.nmk_bf16_tail_slack, lib.nmk_bf16_workspace, lib.nmk_conv2d_bf16),
            torch.float16: (lib.nmk_f16_rows_read, lib.nmk_f16_tail_slack, lib.nmk_f16_workspace, lib.nmk_conv2d_f16),
        }
        self._local = threading.local()

    def _workspace(self, floats: int) -> Tensor:
        """A per-thread scratch buffer that only grows: re-allocating it per call page-faults."""
        buf: Tensor | None = getattr(self._local, "buf", None)
        if buf is None or buf.numel() < floats:
            buf = torch.empty(int(floats * 1.1) + 64, dtype=torch.float32)
            self._local.buf = buf
        return buf

    def release_workspace(self) -> None:
        """Drop the scratch buffer and the output pool (their memory goes once no tensor uses it)."""
        self._local.buf = None
        self._local.pool = None

    def _output_buffer(self, floats: int) -> Tensor:
        """A flat buffer for a conv output, reused once no tensor uses its memory any more.

        Why: activations are tens of MB, which the allocator hands out as fresh pages; faulting
        them in cost about 30% of an EDSR forward on the kernel (0.3 s of 1 s, 1 thread). A buffer
        is reused only when its storage has no user but the pool (its use count is back to what
        it was when the pool made it), so a tensor the caller still holds, or any view of it, is
        never overwritten.
        """
        return self._pooled(floats)[0]

    def _pooled(self, floats: int) -> tuple[Tensor, object]:
        """:meth:`_output_buffer`, and the zero border its last writer left (see :meth:`_output`),
        which no longer holds once it is handed out again."""
        if _use_count is None:
            return torch.empty(floats, dtype=torch.float32), None
        pool: dict[int, list[tuple[Tensor, int]]] | None = getattr(self._local, "pool", None)
        if pool is None or len(pool) > POOL_SIZES:  # many shapes (patch batches): start over
            pool = self._local.pool = {}
        entries = pool.setdefault(floats, [])
        for buf, idle in entries:
            if _use_count(buf) == idle:
                return buf, buf.__dict__.pop(CLEAN_ATTR, None)
        buf = torch.empty(floats, dtype=torch.float32)
        if len(entries) < POOL_PER_SIZE:
            entries.append((buf, _use_count(buf)))
        return buf, None

    @property
    def has_amx(self) -> bool:
        """Whether the bf16 conv runs masks shared by blocks of 16 output channels (and dense convs)
        on AMX tiles now (``NMRESTORE_DISABLE_AMX=1`` turns the path off, read at each call)."""
        return self._amx_built and bool(self._lib.nmk_has_amx())

    def amx_convs(self) -> int:
        """How many convs the AMX path has run in this process."""
        return int(self._lib.nmk_amx_convs())

    def has_half(self, half: torch.dtype) -> bool:
        """Whether this build runs the sparse kernel in that 16-bit dtype."""
        return self.has_bf16 if half == torch.bfloat16 else self.has_f16 if half == torch.float16 else False

    def rows_read(self, h: int, kh: int, sh: int, ph: int, dh: int, half: torch.dtype | None = None) -> int:
        """Rows of padded input (per image, from its top) a conv reads, tile rounding included
        (for the f32 kernel, or the 16-bit one of dtype ``half``)."""
        fn = self._half_fns[half][0] if half is not None else self._lib.nmk_conv2d_rows_read
        return int(fn(h, kh, sh, ph, dh))

    def accepts_handoff(
        self,
        x: Tensor,
        kernel_size: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        half: torch.dtype | None = None,
    ) -> bool:
        """True when ``x`` is a hand-off view (of the kernel's dtype: f32, or ``half``) this conv can
        read in place."""
        layout = handoff_layout(x)
        if layout is None or stride[1] != 1 or x.dtype != (half or torch.float32):
            return False
        (ph, pw), h, w = padding, x.shape[2], x.shape[3]
        if ph > layout.pad_h or pw > layout.pad_w or layout.width - layout.pad_w - w < pw:
            return False
        below = layout.rows - layout.pad_h - h
        need = self.rows_read(h, kernel_size[0], stride[0], ph, dilation[0], half)
        return below >= ph and layout.pad_h - ph + need <= layout.rows

    def handoff_empty(self, shape: tuple[int, int, int, int], pad: Pair, half: torch.dtype | None = None) -> Tensor:
        """An uninitialised hand-off view of ``shape`` with ``pad`` zero border (zeroed by the
        conv that writes it) and room for any conv's tile over-read (f32, or dtype ``half``)."""
        b, c, h, w = shape
        ph, pw = pad
        vec = 32 if half is not None else self.vector_floats  # elements per 64-byte vector
        left = -(-pw // vec) * vec  # a whole vector of zeros on the left: every row's valid part is
        # 64-byte aligned, so full-tile stores never straddle two cache lines
        width = -(-(left + w + pw) // vec) * vec
        rows = h + 2 * ph + max(self.tile[0], self.bf16_tile[0], self.f16_tile[0]) + 1
        layout = HandoffLayout(ph, left, rows, width)
        tail = self._half_fns[half][1] if half is not None else self._lib.nmk_conv2d_tail_slack
        elems = b * rows * c * width + int(tail(c * width))
        pooled, clean = self._pooled(-(-elems // 2) if half is not None else elems)
        buf = pooled.view(half) if half is not None else pooled
        view = buf.as_strided(shape, layout.strides(c), ph * c * width + left)
        setattr(view, LAYOUT_ATTR, layout)
        setattr(view, BUFFER_ATTR, (pooled, clean))
        return view

    def conv2d(
        self,
        x: Tensor,
        rowptr: Tensor,
        cin: Tensor,
        kpos: Tensor,
        values: Tensor,
        bias: Tensor | None,
        out_channels: int,
        kernel_size: Pair,
        stride: Pair,
        padding: Pair,
        dilation: Pair,
        relu: bool = False,
        threads: int | None = None,
        residual: Tensor | None = None,
        res_scale: float = 1.0,
        shuffle: int = 1,
        out_pad: Pair | None = None,
        half_pad: Pair | None = None,
        half_only: bool = False,
    ) -> Tensor:
        """Sparse conv of a (B, C, H, W) CPU tensor (any strides; a hand-off view that
        :meth:`accepts_handoff` is read in place, without the padding pass).

        ``values`` float32 runs the f32 kernel (16-bit inputs are converted first); bfloat16 runs the
        bf16 kernel (f32 accumulation; needs :attr:`has_bf16`), float16 the fp16 kernel (fp16 sums;
        needs :attr:`has_f16`): each reads a hand-off view or shadow (:func:`half_shadow`) of its
        dtype in place and converts anything else while padding.
        With ``residual`` (the output's shape, any strides; f32, or the 16-bit kernel's dtype) the
        result is ``act(res_scale * conv(x) + residual)``, act = ReLU when ``relu``. ``shuffle`` = r fuses a
        following ``pixel_shuffle(r)`` (not with a residual). ``out_pad``: write the output as a
        hand-off view with that zero border (for a following sparse conv), else a plain tensor.
        ``half_pad`` (16-bit kernels): also write a hand-off copy of the kernel's dtype with that
        border, attached as the output's shadow, or with ``half_only`` returned instead of any f32
        output.
        """
        half = values.dtype if values.dtype in HALF_DTYPES else None
        if half is not None and not self.has_half(half):
            raise RuntimeError(f"this kernel build has no {HALF_NAMES[half]} kernels")
        b, c, h, w = x.shape
        kh, kw = kernel_size
        (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        r = max(1, shuffle)
        if r > 1 and (residual is not None or out_channels % (r * r) or r > 4):
            raise ValueError(
                f"fused pixel shuffle {r} needs no residual, r <= 4 and channels divisible by r^2"
            )
        shape = (b, out_channels // (r * r), ho * r, wo * r)
        want_f32 = not (half is not None and half_pad is not None and half_only)
        if min(shape) <= 0:
            return torch.empty(shape, dtype=torch.float32 if want_f32 or half is None else half)
        out, zero = self._output(shape, out_pad if want_f32 else None, None) if want_f32 else (None, ())
        out2, zero2 = (None, ())
        if half is not None and half_pad is not None:
            out2, zero2 = self._output(shape, half_pad, half)
        if residual is not None:
            if tuple(residual.shape) != shape:
                raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {shape}")
            # a 16-bit kernel also reads a residual of its own dtype (a 16-bit hand-off chain), any other f32
            res16_ok = half is not None and residual.dtype == half
            if residual.stride(3) != 1 or (residual.dtype != torch.float32 and not res16_ok):
                residual = residual.float().contiguous()
        geometry = (kernel_size, stride, padding, dilation)
        src, padded, ws_ptr = self._input(x, geometry, half)
        rs = (
            (residual.stride(0), residual.stride(1), residual.stride(2))
            if residual is not None
            else (0, 0, 0)
        )
        os_ = (out.stride(0), out.stride(1), out.stride(2)) if out is not None else (0, 0, 0)
        o2s = (out2.stride(0), out2.stride(1), out2.stride(2)) if out2 is not None else (0, 0, 0)
        params = self._params(
            b, c, h, w, out_channels, kh, kw, sh, sw, ph, pw, dh, dw,
            *src[1], int(padded), int(relu), *rs, *os_, r, *(zero or (0, 0, 0, 0)),
            threads or torch.get_num_threads(),
            int(half is not None and src[0].dtype == half), int(out is not None), *o2s, *(zero2 or (0, 0, 0, 0)),
            int(residual is not None and residual.dtype in HALF_DTYPES),
        )  # fmt: skip
        start = (
            src[0].data_ptr() - src[0].element_size() * (ph * src[1][2] + pw) if padded else src[0].data_ptr()
        )
        args = (rowptr.data_ptr(), cin.data_ptr(), kpos.data_ptr(), values.data_ptr())
        bias_ptr = bias.data_ptr() if bias is not None else None
        res_ptr = residual.data_ptr() if residual is not None else None
        if half is not None:
            _, _, workspace, conv = self._half_fns[half]
            if ws_ptr is None and not padded:
                ws_ptr = self._workspace(-(-int(workspace(params)) // 2) + 16).data_ptr()
            out_ptr = out.data_ptr() if out is not None else None
            out2_ptr = out2.data_ptr() if out2 is not None else None
            status = conv(
                params, start, ws_ptr, *args, bias_ptr, res_ptr, float(res_scale), out_ptr, out2_ptr
            )
        else:
            if not padded:
                ws_ptr = self._workspace(
                    self._lib.nmk_conv2d_workspace(b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw)
                ).data_ptr()
            assert out is not None
            status = self._lib.nmk_conv2d_ex(
                params, start, ws_ptr, *args, bias_ptr, res_ptr, float(res_scale), out.data_ptr()
            )
        if status != 0:
            raise RuntimeError(f"sparse conv kernel rejected input {tuple(x.shape)} (status {status})")
        self._borders_written(out, out2)
        if out is None:
            assert out2 is not None
            return out2
        if out2 is not None:
            setattr(out, SHADOW_ATTR, (out2, out._version))
        return out

    def _output(
        self, shape: tuple[int, int, int, int], pad: Pair | None, half: torch.dtype | None
    ) -> tuple[Tensor, tuple[int, ...]]:
        """An output view and the zero border the kernel must write around it (hand-off) or ()."""
        if pad is None:
            assert half is None
            return self._output_buffer(shape[0] * shape[1] * shape[2] * shape[3]).view(shape), ()
        out = self.handoff_empty(shape, pad, half)
        layout = handoff_layout(out)
        assert layout is not None
        zero = (pad[0], layout.rows - pad[0] - shape[2], pad[1], layout.width - pad[1] - shape[3])
        _, clean = getattr(out, BUFFER_ATTR)
        border = (shape, out.dtype, layout, zero)
        setattr(out, BORDER_ATTR, border)
        # a pooled buffer whose last writer zeroed this very border still has it: the kernels write
        # only inside the image (EDSR-baseline x2, bf16 engine: zeroing took 3-6% of a forward)
        return out, ((0, 0, 0, 0) if clean == border else zero)

    @staticmethod
    def _borders_written(*outs: Tensor | None) -> None:
        """After a kernel call wrote ``outs`` (from :meth:`_output`): their buffers' borders are zero."""
        for out in outs:
            border = getattr(out, BORDER_ATTR, None) if out is not None else None
            if border is not None:
                pooled, _ = getattr(out, BUFFER_ATTR)
                setattr(pooled, CLEAN_ATTR, border)

    def _input(
        self, x: Tensor, geometry: tuple[Pair, Pair, Pair, Pair], half: torch.dtype | None
    ) -> tuple[tuple[Tensor, tuple[int, int, int]], bool, int | None]:
        """(tensor the kernel reads and its (image, channel, row) strides, read in place, workspace).

        In place: a hand-off view of the kernel's dtype (for a 16-bit kernel also an f32 output's
        valid shadow of its dtype), as (buffer view, (image stride, row width, C * row width)).
        Otherwise the tensor the padding pass reads (W contiguous; f32, or the 16-bit kernel's
        own dtype)."""
        candidates = [x]
        if half is not None and x.dtype == torch.float32:
            shadow = half_shadow(x, half)
            if shadow is not None:
                candidates.insert(0, shadow)
        for cand in candidates:
            if self.accepts_handoff(cand, *geometry, half=half):
                layout = handoff_layout(cand)
                assert layout is not None
                row = cand.shape[1] * layout.width
                return (cand, (layout.rows * row, layout.width, row)), True, None
        if x.dtype not in (torch.float32, half or torch.float32) or x.stride(3) != 1:
            x = x.contiguous() if half is not None and x.dtype == half else x.float().contiguous()
        return (x, (x.stride(0), x.stride(1), x.stride(2))), False, None

    def conv2d_tiles(
        self,
        x: Tensor,
        tiles: Sequence[tuple[int, int, int, int, int]],
        routes: Sequence[CSRWeight | None],
        bias: Tensor | None,
        out: Tensor,
        kernel_size: tuple[int, int],
        padding: tuple[int, int],
        relu: bool = False,
        threads: int | None = None,
        residual: Tensor | None = None,
        res_scale: float = 1.0,
        shuffle: int = 1,
    ) -> None:
        """A stride-1 'same' sparse conv on some tiles of one image, each on its own route, in place.

        ``x``: a (1, C, H, W) hand-off view this conv :meth:`accepts_handoff`. ``tiles``: (top, left,
        height, width, route) each; a tile reads its padded window in ``x`` and writes
        ``out[0, :, top*r : (top+height)*r, left*r : (left+width)*r]`` (r = ``shuffle``; ``out`` any
        strides with W contiguous), ``act(res_scale * conv + residual)`` with ``residual`` read at the
        same place when given. ``routes[k]``: route k's CSR weights (rowptr, cin, kpos, values), None
        for a route no tile uses. One call, one parallel region, no gather, no scatter, no padding
        pass: every tile a spatially routed layer runs on the kernel (:mod:`nmrestore.runtime.spatial`).
        """
        (kh, kw), (ph, pw) = kernel_size, padding
        r = max(1, shuffle)
        layout = handoff_layout(x)
        if layout is None or not self.accepts_handoff(x, kernel_size, (1, 1), padding, (1, 1)):
            raise ValueError(
                "conv2d_tiles reads its input in place: it needs a hand-off view with the conv's border"
            )
        if x.shape[0] != 1 or out.stride(3) != 1 or 2 * ph != kh - 1 or 2 * pw != kw - 1:
            raise ValueError(
                "conv2d_tiles runs stride-1 'same' convs on one image into an output with contiguous rows"
            )
        if residual is not None and (r > 1 or residual.stride(3) != 1):
            raise ValueError("conv2d_tiles: a residual needs no shuffle and contiguous rows")
        if not tiles:
            return
        c = x.shape[1]
        row = c * layout.width
        spec = torch.tensor(tiles, dtype=torch.int64)
        t, s = spec[:, 0], spec[:, 1]
        table = torch.empty(len(tiles), 6, dtype=torch.int64)
        table[:, 0] = (t - ph) * row + (s - pw)  # from x's origin to each tile's padded window
        table[:, 1] = t * r * out.stride(2) + s * r
        table[:, 2] = 0 if residual is None else t * residual.stride(2) + s
        table[:, 3:] = spec[:, 2:]
        pointers = [
            (ctypes.c_void_p * len(routes))(
                *[None if w is None else getattr(w, name).data_ptr() for w in routes]
            )
            for name in ("rowptr", "cin", "kpos", "values")
        ]
        rs = (0, residual.stride(1), residual.stride(2)) if residual is not None else (0, 0, 0)
        params = self._params(
            len(tiles), c, 0, 0, out.shape[1] * r * r, kh, kw, 1, 1, ph, pw, 1, 1,
            0, layout.width, row, 1, int(relu), *rs,
            0, out.stride(1), out.stride(2), r, 0, 0, 0, 0,
            threads or torch.get_num_threads(),
        )  # fmt: skip
        status = self._lib.nmk_conv2d_tiles(
            params,
            table.data_ptr(),
            *pointers,
            len(routes),
            x.data_ptr(),
            bias.data_ptr() if bias is not None else None,
            residual.data_ptr() if residual is not None else None,
            float(res_scale),
            out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"nmk_conv2d_tiles rejected {len(tiles)} tiles (status {status})")

    def channel_block(self, csr: CSRWeight) -> int:
        """How many output channels the conv tiles compute together for ``csr``: the kernel's block
        size when every whole block of that many channels keeps the same positions (masks shared by
        blocks of output channels, ``out_block``), else 1."""
        o = int(csr.rowptr.numel()) - 1
        kk = int(csr.shape[2] * csr.shape[3]) if len(csr.shape) == 4 else 1
        return int(
            self._lib.nmk_conv_channel_block(csr.rowptr.data_ptr(), csr.cin.data_ptr(), csr.kpos.data_ptr(), o, kk)
        )

    def input_blocks(self, csr: CSRWeight) -> int:
        """Into how many blocks of input channels the conv tiles split ``csr`` (a conv without a
        fused pixel shuffle): each block's inputs are read by all output channels, their partial
        sums kept aside, before the next block's; 1 when the kernel runs the layer unsplit."""
        if len(csr.shape) != 4:
            return 1
        o, c, kh, kw = (int(v) for v in csr.shape)
        c *= csr.groups  # the kernel counts all input channels; cin is absolute
        return int(
            self._lib.nmk_conv_input_blocks(csr.rowptr.data_ptr(), csr.cin.data_ptr(), csr.kpos.data_ptr(), o, c, kh, kw)
        )

    def linear(
        self,
        x: Tensor,
        rowptr: Tensor,
        cin: Tensor,
        values: Tensor,
        bias: Tensor | None,
        out_features: int,
        relu: bool = False,
        threads: int | None = None,
    ) -> Tensor:
        """Sparse linear of a contiguous float32 (B, I) CPU tensor."""
        b, i = x.shape
        out = torch.empty(b, out_features, dtype=torch.float32)
        if out.numel():
            self._lib.nmk_linear(
                x.data_ptr(),
                b,
                i,
                rowptr.data_ptr(),
                cin.data_ptr(),
                values.data_ptr(),
                bias.data_ptr() if bias is not None else None,
                out_features,
                int(relu),
                out.data_ptr(),
                threads or torch.get_num_threads(),
            )
        return out
