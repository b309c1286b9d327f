"""Build, cache and load the C++ N:M kernels (``csrc/*.cpp``).

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

``NMRESTORE_DISABLE_BF16=1`` builds without the bf16 kernels (``csrc/nm_bf16.cpp``), as on a CPU
without AVX512-BF16, where they are never compiled in: ``precision="bf16"`` then runs the f32 kernel.
``NMRESTORE_DISABLE_FP16=1`` does the same for the fp16 kernels (``csrc/nm_fp16.cpp``, AVX512-FP16).

The library's entry points, the hand-off layout between consecutive sparse convs and the 16-bit
copies are in :mod:`nmrestore.runtime.kernel_lib`.
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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from nmrestore.io_atomic import atomic_write_text
from nmrestore.runtime.cpu_features import cpu_features
from nmrestore.runtime.kernel_cache import kernel_dir, sha256_file, sidecar, verify_library
from nmrestore.runtime.kernel_lib import (  # noqa: F401  (re-exported: the names callers know)
    ABI_VERSION,
    LAYOUT_ATTR,
    HandoffLayout,
    KernelLibrary,
    _use_count,
    half_shadow,
    handoff_layout,
)

log = logging.getLogger("nmrestore.runtime")

#: The sources, compiled together (the header is written next to them); the cache key covers all.
SOURCE_NAMES = (
    "nm_common.h", "nm_half_common.h", "nm_amx.h", "nm_amx_block.h", "nm_amx_tail.h", "nm_weights.h", "nm_tiles.h", "nm_f16_tiles.h", "nm_kernels.cpp", "nm_bf16.cpp", "nm_fp16.cpp"
)
#: Defined to build without the bf16 kernels.
NO_BF16_FLAG = "-DNMK_NO_BF16"
#: Defined to build without the fp16 kernels.
NO_F16_FLAG = "-DNMK_NO_F16"
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
    bf16: bool = False
    bf16_reason: str = ""  # why there are no bf16 kernels (empty when there are)
    f16: bool = False
    f16_reason: str = ""  # why there are no fp16 kernels (empty when there are)
    amx: bool = False  # the bf16 conv runs masks shared by 16-channel blocks on AMX tiles

    def summary(self) -> str:
        if not self.available:
            return f"sparse kernel unavailable: {self.reason}"
        bf16 = "bf16 kernels" if self.bf16 else f"no bf16 kernels: {self.bf16_reason}"
        bf16 += "; fp16 kernels" if self.f16 else f"; no fp16 kernels: {self.f16_reason}"
        bf16 += "; AMX for block-shared masks" if self.amx else ""
        return (
            f"sparse kernel: {self.library} ({self.compiler} {' '.join(self.flags)}; "
            f"{self.vector_floats}-float vectors, {self.tile[0]}x{self.tile[1]} tile, "
            f"{'OpenMP' if self.openmp else 'single-threaded'}; {bf16})"
        )


# -- building ---------------------------------------------------------------------------------
_lock = threading.Lock()
_loaded: tuple[KernelLibrary | None, KernelStatus] | None = None


def _sources() -> dict[str, bytes]:
    folder = resources.files("nmrestore.runtime").joinpath("csrc")
    return {name: folder.joinpath(name).read_bytes() for name in SOURCE_NAMES}


def bf16_build_reason() -> str | None:
    """Why the kernels are built without bf16 (None: with). Checked before compiling, so a CPU
    without AVX512-BF16 never gets code it cannot run, whatever the compiler would target."""
    if os.environ.get("NMRESTORE_DISABLE_BF16", "").strip() not in ("", "0"):
        return "disabled by NMRESTORE_DISABLE_BF16"
    if not cpu_features().get("avx512_bf16"):
        return "the CPU has no avx512_bf16"
    return None


def f16_build_reason() -> str | None:
    """Why the kernels are built without fp16 (None: with); as :func:`bf16_build_reason`."""
    if os.environ.get("NMRESTORE_DISABLE_FP16", "").strip() not in ("", "0"):
        return "disabled by NMRESTORE_DISABLE_FP16"
    if not cpu_features().get("avx512_fp16"):
        return "the CPU has no avx512_fp16"
    return None


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


def _build(compiler: str, flags: tuple[str, ...], sources: dict[str, bytes], version: str) -> Path:
    key = hashlib.sha256(
        b"\0".join([*sources.values(), version.encode(), " ".join(flags).encode(), _cpu_flags().encode()])
    ).hexdigest()[:20]
    target_dir, trusted = kernel_dir()
    library = target_dir / f"nm_kernels-{key}.so"
    if library.exists():
        problem = verify_library(library) if trusted else "the cache folder was not private"
        if problem is None:
            return library
        log.warning("not loading %s (%s); rebuilding it", library, problem)
    with tempfile.TemporaryDirectory(dir=target_dir, prefix=".build-") as tmp:
        units = []
        for name, text in sources.items():
            (Path(tmp) / name).write_bytes(text)
            if name.endswith(".cpp"):
                units.append(str(Path(tmp) / name))
        out = Path(tmp) / library.name
        cmd = [compiler, *flags, *COMMON_FLAGS, "-o", str(out), *units]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise OSError(f"`{' '.join(cmd[: -2 - len(units)])} ...` failed: {' | '.join(tail)}")
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
        sources = _sources()
        version = _compiler_version(compiler)
    except OSError as exc:
        return None, KernelStatus(False, str(exc), compiler=compiler)
    attempts: list[str] = []
    no_bf16, no_f16 = bf16_build_reason(), f16_build_reason()
    for base in FLAG_SETS:
        flags = (*base, *((NO_BF16_FLAG,) if no_bf16 else ()), *((NO_F16_FLAG,) if no_f16 else ()))
        try:
            lib, path = _open(compiler, flags, sources, version, no_bf16 is None, no_f16 is None)
        except (OSError, subprocess.SubprocessError, AttributeError) as exc:
            attempts.append(f"{' '.join(flags)}: {exc}")
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
            lib.has_bf16,
            "" if lib.has_bf16 else (no_bf16 or "the compiler does not target AVX512-BF16 here"),
            lib.has_f16,
            "" if lib.has_f16 else (no_f16 or "the compiler does not target AVX512-FP16 here"),
            lib.has_amx,
        )
        return lib, status
    return None, KernelStatus(
        False, "; ".join(attempts) or "compilation failed", compiler=compiler, attempts=tuple(attempts)
    )


def _open(
    compiler: str, flags: tuple[str, ...], sources: dict[str, bytes], version: str, bf16: bool, f16: bool
) -> tuple[KernelLibrary, Path]:
    """Build (or find in the cache) and load one flag set; OSError when it cannot be used."""
    path = _build(compiler, flags, sources, version)
    problem = verify_library(path)  # checked right before loading, whatever _build did
    if problem is not None:
        raise OSError(f"refusing to load {path}: {problem}")
    lib = KernelLibrary(ctypes.CDLL(str(path)), bf16_allowed=bf16, f16_allowed=f16)
    if lib.abi != ABI_VERSION:
        raise OSError(f"ABI {lib.abi}, expected {ABI_VERSION}")
    return lib, path


def load_kernel_variant(defines: tuple[str, ...]) -> KernelLibrary:
    """The kernel's sources built with extra ``-D`` definitions (e.g. ``("NMK_AMX_ABLATE=3",)``), cached
    like the kernel itself; for benchmarks that time what one part of a kernel costs. An ablated build
    computes wrong outputs: never hand it to an engine. Raises OSError when it cannot be built."""
    compiler = find_compiler()
    if compiler is None:
        raise OSError("no C++ compiler found (set NMRESTORE_CXX or install g++)")
    no_bf16, no_f16 = bf16_build_reason(), f16_build_reason()
    flags = (
        *FLAG_SETS[0],
        *((NO_BF16_FLAG,) if no_bf16 else ()),
        *((NO_F16_FLAG,) if no_f16 else ()),
        *(f"-D{d}" for d in defines),
    )
    return _open(compiler, flags, _sources(), _compiler_version(compiler), no_bf16 is None, no_f16 is None)[0]


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
