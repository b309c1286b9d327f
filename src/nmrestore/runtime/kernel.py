"""Build, cache and call the C++ N:M kernels (``csrc/nm_kernels.cpp``).

The kernels are compiled at first use with the machine's own C++ compiler (``-O3 -march=native
-fopenmp``) into a shared library with a plain C ABI, then called through :mod:`ctypes` (which
releases the GIL for the call). Why not ``torch.utils.cpp_extension``: its torch/pybind headers
cost about 80 s of compile on a 2-core machine and need ``ninja``; this file needs no Python or
torch headers and compiles in about a second. Why not numba: the same tiled algorithm written with
numba ran 5-7x slower than this C++ in the same process (accumulators in memory, no register
tile), and it would add a dependency.

The library links ``libgomp.so.1``; torch's wheel ships and loads that same soname first, so the
kernels' parallel regions run on torch's OpenMP runtime and follow ``torch.set_num_threads``.

Compiled libraries are cached under ``$NMRESTORE_KERNEL_CACHE`` (default
``$XDG_CACHE_HOME/nmrestore/kernels``), keyed by the source, the compiler, its flags and the CPU's
feature flags, and written atomically (concurrent processes may race to build; one wins).
Only a folder owned by the current user and not writable by others is used, and a library is
loaded only if its SHA-256 matches the one recorded when it was built (:mod:`.kernel_cache`).

If anything fails (no compiler, a compile error, a library that will not load) the kernel is
reported unavailable with the reason, logged once, and every caller falls back to dense PyTorch.
``NMRESTORE_DISABLE_KERNEL=1`` forces that fallback; ``NMRESTORE_CXX`` picks the compiler.

**Hand-off layout.** A conv's output can be written straight into the zero-bordered
(image, row, channel, column) buffer that the kernel otherwise builds by copying (padding) its
input; the caller gets the valid region as an ordinary strided (B, C, H, W) view
(:class:`HandoffLayout` tags it), and a following sparse conv reads that buffer in place. Chains
of sparse convs (EDSR/RCAN residual bodies) then skip the per-layer padding pass, a full
read+write of the activation, which at 2:32 costs more than the convolution itself.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from nmrestore.io_atomic import atomic_write_text
from nmrestore.runtime.kernel_cache import kernel_dir, sha256_file, sidecar, verify_library
from nmrestore.runtime.packing import CSRWeight

log = logging.getLogger("nmrestore.runtime")

ABI_VERSION = 4
SOURCE_NAME = "nm_kernels.cpp"
#: Flag sets tried in order; the first that compiles and loads wins.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
COMMON_FLAGS: tuple[str, ...] = ("-shared", "-fPIC", "-std=c++17")
COMPILE_TIMEOUT_S = 300


@dataclass(frozen=True)
class KernelStatus:
    """Whether the sparse kernels can run here, and if not, why."""

    available: bool
    reason: str
    library: Path | None = None
    compiler: str | None = None
    flags: tuple[str, ...] = ()
    openmp: bool = False
    vector_floats: int = 0
    tile: tuple[int, int] = (0, 0)
    attempts: tuple[str, ...] = field(default_factory=tuple)

    def summary(self) -> str:
        if not self.available:
            return f"sparse kernel unavailable: {self.reason}"
        return (
            f"sparse kernel: {self.library} ({self.compiler} {' '.join(self.flags)}; "
            f"{self.vector_floats}-float vectors, {self.tile[0]}x{self.tile[1]} tile, "
            f"{'OpenMP' if self.openmp else 'single-threaded'})"
        )


@dataclass(frozen=True)
class HandoffLayout:
    """Where a (B, C, H, W) hand-off view sits in its buffer of (B, rows, C, width) floats.

    ``pad_h`` zero rows lie above the image and at least as many below it (down to ``rows``);
    ``pad_w`` zero columns lie left of it and ``width - pad_w - W`` right of it.
    """

    pad_h: int
    pad_w: int
    rows: int
    width: int

    def strides(self, channels: int) -> tuple[int, int, int, int]:
        return (self.rows * channels * self.width, self.width, channels * self.width, 1)


#: Attribute of a hand-off view holding its :class:`HandoffLayout` (a plain Python attribute: any
#: op that makes a new tensor drops it, so only the very view the kernel wrote carries it).
LAYOUT_ATTR = "_nmk_layout"


def handoff_layout(x: Tensor) -> HandoffLayout | None:
    """The layout of a hand-off view that still has exactly its original strides, else None."""
    layout: HandoffLayout | None = getattr(x, LAYOUT_ATTR, None)
    if layout is None or x.dim() != 4 or x.stride() != layout.strides(x.shape[1]):
        return None
    return layout


#: Output buffers kept per size, and distinct sizes kept, by :meth:`KernelLibrary._output_buffer`.
POOL_PER_SIZE = 6
POOL_SIZES = 24


def _storage_use_count() -> Callable[[Tensor], int] | None:
    """How many owners a tensor's storage has (None where this torch does not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:  # pragma: no cover - older/newer torch: outputs are not pooled
        return None
    return lambda t: int(count(t.untyped_storage()._cdata))


_use_count = _storage_use_count()


class KernelLibrary:
    """The loaded library with typed entry points."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self._lib = lib
        lib.nmk_abi_version.restype = i32
        for name in ("nmk_vector_floats", "nmk_tile_rows", "nmk_tile_cols", "nmk_openmp"):
            getattr(lib, name).restype = i32
            getattr(lib, name).argtypes = []
        lib.nmk_conv2d_workspace.restype = i64
        lib.nmk_conv2d_workspace.argtypes = [i64] * 12
        lib.nmk_conv2d_rows_read.restype = i64
        lib.nmk_conv2d_rows_read.argtypes = [i64] * 5
        lib.nmk_conv2d_tail_slack.restype = i64
        lib.nmk_conv2d_tail_slack.argtypes = [i64]
        lib.nmk_param_count.restype = i32
        lib.nmk_param_count.argtypes = []
        lib.nmk_conv2d_ex.restype = i32
        lib.nmk_conv2d_ex.argtypes = [p, p, p, p, p, p, p, p, p, ctypes.c_float, p]
        lib.nmk_conv2d_tiles.restype = i32
        lib.nmk_conv2d_tiles.argtypes = [p, p, p, p, p, p, i32, p, p, p, ctypes.c_float, p]
        self._params = ctypes.c_int64 * int(lib.nmk_param_count())
        lib.nmk_linear.restype = i32
        lib.nmk_linear.argtypes = [p, i64, i64, p, p, p, p, i64, i32, p, i32]
        self.abi = int(lib.nmk_abi_version())
        self.vector_floats = int(lib.nmk_vector_floats())
        self.tile = (int(lib.nmk_tile_rows()), int(lib.nmk_tile_cols()))
        self.openmp = bool(lib.nmk_openmp())
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
        if _use_count is None:
            return torch.empty(floats, dtype=torch.float32)
        pool: dict[int, list[tuple[Tensor, int]]] | None = getattr(self._local, "pool", None)
        if pool is None or len(pool) > POOL_SIZES:  # many shapes (patch batches): start over
            pool = self._local.pool = {}
        entries = pool.setdefault(floats, [])
        for buf, idle in entries:
            if _use_count(buf) == idle:
                return buf
        buf = torch.empty(floats, dtype=torch.float32)
        if len(entries) < POOL_PER_SIZE:
            entries.append((buf, _use_count(buf)))
        return buf

    def rows_read(self, h: int, kh: int, sh: int, ph: int, dh: int) -> int:
        """Rows of padded input (per image, from its top) a conv reads, tile rounding included."""
        return int(self._lib.nmk_conv2d_rows_read(h, kh, sh, ph, dh))

    def accepts_handoff(
        self,
        x: Tensor,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> bool:
        """True when ``x`` is a hand-off view this conv can read in place (enough zero border)."""
        layout = handoff_layout(x)
        if layout is None or stride[1] != 1:
            return False
        (ph, pw), h, w = padding, x.shape[2], x.shape[3]
        if ph > layout.pad_h or pw > layout.pad_w or layout.width - layout.pad_w - w < pw:
            return False
        below = layout.rows - layout.pad_h - h
        need = self.rows_read(h, kernel_size[0], stride[0], ph, dilation[0])
        return below >= ph and layout.pad_h - ph + need <= layout.rows

    def handoff_empty(self, shape: tuple[int, int, int, int], pad: tuple[int, int]) -> Tensor:
        """An uninitialised hand-off view of ``shape`` with ``pad`` zero border (zeroed by the
        conv that writes it) and room for any conv's tile over-read."""
        b, c, h, w = shape
        ph, pw = pad
        vf = self.vector_floats
        left = -(-pw // vf) * vf  # a whole vector of zeros on the left: every row's valid part is
        # 64-byte aligned, so full-tile stores never straddle two cache lines
        width = -(-(left + w + pw) // vf) * vf
        rows = h + 2 * ph + self.tile[0] + 1
        layout = HandoffLayout(ph, left, rows, width)
        slack = int(self._lib.nmk_conv2d_tail_slack(c * width))
        buf = self._output_buffer(b * rows * c * width + slack)
        view = buf.as_strided(shape, layout.strides(c), ph * c * width + left)
        setattr(view, LAYOUT_ATTR, layout)
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
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        relu: bool = False,
        threads: int | None = None,
        residual: Tensor | None = None,
        res_scale: float = 1.0,
        shuffle: int = 1,
        out_pad: tuple[int, int] | None = None,
    ) -> Tensor:
        """Sparse conv of a float32 (B, C, H, W) CPU tensor (any strides; a hand-off view that
        :meth:`accepts_handoff` is read in place, without the padding pass).

        With ``residual`` (the output's shape, any strides) the result is
        ``act(res_scale * conv(x) + residual)``, act = ReLU when ``relu``. ``shuffle`` = r fuses a
        following ``pixel_shuffle(r)`` (not with a residual). ``out_pad``: write the output as a
        hand-off view with that zero border (for a following sparse conv), else a plain tensor.
        """
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
        if min(shape) <= 0:
            return torch.empty(shape, dtype=torch.float32)
        if out_pad is not None:
            out = self.handoff_empty(shape, out_pad)
            layout = handoff_layout(out)
            assert layout is not None
            zero = (
                out_pad[0],
                layout.rows - out_pad[0] - shape[2],
                out_pad[1],
                layout.width - out_pad[1] - shape[3],
            )
        else:
            out = self._output_buffer(shape[0] * shape[1] * shape[2] * shape[3]).view(shape)
            zero = (0, 0, 0, 0)
        if residual is not None:
            if tuple(residual.shape) != tuple(out.shape):
                raise ValueError(
                    f"residual of shape {tuple(residual.shape)} for an output of {tuple(out.shape)}"
                )
            if residual.stride(3) != 1 or residual.dtype != torch.float32:
                residual = residual.float().contiguous()
        if self.accepts_handoff(x, kernel_size, stride, padding, dilation):
            layout = handoff_layout(x)
            assert layout is not None
            row = c * layout.width
            start = x.data_ptr() - 4 * (ph * row + pw)  # top-left of this conv's padded window
            xs = (layout.rows * row, layout.width, row)
            padded, ws_ptr = 1, None
        else:
            if x.stride(3) != 1 or x.dtype != torch.float32:
                x = x.float().contiguous()
            start, xs, padded = x.data_ptr(), (x.stride(0), x.stride(1), x.stride(2)), 0
            ws_ptr = self._workspace(
                self._lib.nmk_conv2d_workspace(b, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw)
            ).data_ptr()
        rs = (
            (residual.stride(0), residual.stride(1), residual.stride(2))
            if residual is not None
            else (0, 0, 0)
        )
        params = self._params(
            b, c, h, w, out_channels, kh, kw, sh, sw, ph, pw, dh, dw,
            *xs, padded, int(relu), *rs,
            out.stride(0), out.stride(1), out.stride(2), r, *zero,
            threads or torch.get_num_threads(),
        )  # fmt: skip
        status = self._lib.nmk_conv2d_ex(
            params,
            start,
            ws_ptr,
            rowptr.data_ptr(),
            cin.data_ptr(),
            kpos.data_ptr(),
            values.data_ptr(),
            bias.data_ptr() if bias is not None else None,
            residual.data_ptr() if residual is not None else None,
            float(res_scale),
            out.data_ptr(),
        )
        if status != 0:
            raise RuntimeError(f"nmk_conv2d_ex rejected input {tuple(x.shape)} (status {status})")
        return out

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


# -- building ---------------------------------------------------------------------------------
_lock = threading.Lock()
_loaded: tuple[KernelLibrary | None, KernelStatus] | None = None


def _source() -> bytes:
    return resources.files("nmrestore.runtime").joinpath("csrc", SOURCE_NAME).read_bytes()


def find_compiler() -> str | None:
    """``$NMRESTORE_CXX``, else ``$CXX``, else the first of c++/g++/clang++ on PATH."""
    for candidate in (os.environ.get("NMRESTORE_CXX"), os.environ.get("CXX")):
        if candidate:
            return shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_flags() -> str:
    """The CPU feature line: -march=native code is only valid on a CPU with the same features."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    try:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
        return done.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        raise OSError(f"{compiler} --version failed: {exc}") from exc


def _build(compiler: str, flags: tuple[str, ...], source: bytes, version: str) -> Path:
    key = hashlib.sha256(
        b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    ).hexdigest()[:20]
    target_dir, trusted = kernel_dir()
    library = target_dir / f"nm_kernels-{key}.so"
    if library.exists():
        problem = verify_library(library) if trusted else "the cache folder was not private"
        if problem is None:
            return library
        log.warning("not loading %s (%s); rebuilding it", library, problem)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as tmp:
        src = Path(tmp) / SOURCE_NAME
        src.write_bytes(source)
        out = Path(tmp) / library.name
        cmd = [compiler, *flags, *COMMON_FLAGS, "-o", str(out), str(src)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OSError(f"`{' '.join(cmd[:-3])} ...` failed: {' | '.join(tail)}")
        digest = sha256_file(out)
        os.chmod(out, 0o755)  # never group/other-writable, whatever the umask
        os.replace(out, library)  # atomic: a concurrent builder either sees the old or the new file
        atomic_write_text(sidecar(library), f"{digest}  {library.name}\n")
    return library


def _load() -> tuple[KernelLibrary | None, KernelStatus]:
    if os.environ.get("NMRESTORE_DISABLE_KERNEL", "").strip() not in ("", "0"):
        return None, KernelStatus(False, "disabled by NMRESTORE_DISABLE_KERNEL")
    compiler = find_compiler()
    if compiler is None:
        return None, KernelStatus(False, "no C++ compiler found (set NMRESTORE_CXX or install g++)")
    try:
        source = _source()
        version = _compiler_version(compiler)
    except OSError as exc:
        return None, KernelStatus(False, str(exc), compiler=compiler)
    attempts: list[str] = []
    for flags in FLAG_SETS:
        try:
            path = _build(compiler, flags, source, version)
            problem = verify_library(path)  # checked right before loading, whatever _build did
            if problem is not None:
                raise OSError(f"refusing to load {path}: {problem}")
            lib = KernelLibrary(ctypes.CDLL(str(path)))
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            attempts.append(f"{' '.join(flags)}: {exc}")
            continue
        if lib.abi != ABI_VERSION:
            attempts.append(f"{' '.join(flags)}: ABI {lib.abi}, expected {ABI_VERSION}")
            continue
        status = KernelStatus(
            True,
            "ok",
            path,
            compiler,
            flags,
            lib.openmp,
            lib.vector_floats,
            lib.tile,
            tuple(attempts),
        )
        return lib, status
    return None, KernelStatus(
        False, "; ".join(attempts) or "compilation failed", compiler=compiler, attempts=tuple(attempts)
    )


def load_kernel() -> KernelLibrary | None:
    """The kernel library, built on first call; None (reason logged once) when it cannot be had."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
            lib, status = _loaded
            if lib is None:
                log.warning("%s; N:M layers run dense (PyTorch)", status.summary())
            else:
                log.info("%s", status.summary())
        return _loaded[0]


def kernel_status() -> KernelStatus:
    """Build (if needed) and describe the kernel."""
    load_kernel()
    assert _loaded is not None
    return _loaded[1]


def reset_kernel() -> None:
    """Forget the loaded kernel so the next use builds/loads again (tests, changed environment)."""
    global _loaded
    with _lock:
        _loaded = None
