"""The compiled-kernel cache never loads a library it did not build.

Each test plants a real shared library whose constructor creates a marker file (so loading it
would be visible) at the exact path the kernel would be loaded from, then asks for the kernel:
the marker must never appear and the kernel must come back rebuilt (or from another, private
folder). Also: a world-writable cache folder, a folder owned by another user (root only), the
predictable temp fallback owned by another user, and a symlink in place of the library.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from nmrestore.runtime import kernel_status, load_kernel
from nmrestore.runtime.kernel_cache import sha256_file, sidecar, verify_library

pytestmark = pytest.mark.skipif(
    shutil.which("c++") is None and shutil.which("g++") is None, reason="no compiler"
)


@pytest.fixture(scope="module")
def library_name(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The file name the kernel gets on this machine (the cache key: source, compiler, flags, CPU)."""
    from nmrestore.runtime import reset_kernel

    cache = tmp_path_factory.mktemp("probe_cache")
    old = os.environ.get("NMRESTORE_KERNEL_CACHE")
    os.environ["NMRESTORE_KERNEL_CACHE"] = str(cache)
    reset_kernel()
    try:
        status = kernel_status()
    finally:
        if old is None:
            os.environ.pop("NMRESTORE_KERNEL_CACHE")
        else:
            os.environ["NMRESTORE_KERNEL_CACHE"] = old
        reset_kernel()
    if not status.available or status.library is None:
        pytest.skip(status.reason)
    return status.library.name


@pytest.fixture(scope="module")
def evil_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a .so that creates a marker file when loaded, that marker's path)."""
    folder = tmp_path_factory.mktemp("evil")
    marker = folder / "PWNED"
    source = folder / "evil.c"
    source.write_text(
        "#include <stdio.h>\n__attribute__((constructor)) static void pwn(void) {\n"
        f'  FILE *f = fopen("{marker}", "w"); if (f) {{ fputs("loaded", f); fclose(f); }}\n}}\n'
        "int nmk_abi_version(void) { return 3; }\n"
    )
    compiler = shutil.which("cc") or shutil.which("gcc") or shutil.which("c++")
    assert compiler is not None
    library = folder / "evil.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


def _plant(folder: Path, name: str, evil: tuple[Path, Path], with_digest: bool | str) -> Path:
    target = folder / name
    shutil.copyfile(evil[0], target)
    os.chmod(target, 0o755)
    if with_digest is True:  # a sidecar that matches the planted file
        sidecar(target).write_text(f"{sha256_file(target)}  {name}\n")
    elif with_digest:  # a sidecar that matches something else
        sidecar(target).write_text(f"{with_digest}  {name}\n")
    return target


def _assert_not_loaded_and_rebuilt(evil: tuple[Path, Path], expect_in: Path | None) -> None:
    lib = load_kernel()
    status = kernel_status()
    assert not evil[1].exists(), "the planted library was loaded"
    assert lib is not None and status.available, status.reason
    assert status.library is not None
    assert sha256_file(status.library) != sha256_file(evil[0])
    assert verify_library(status.library) is None
    if expect_in is not None:
        assert status.library.parent == expect_in


@pytest.mark.parametrize(
    "digest", [False, True, "0" * 64], ids=["no-sidecar", "matching-sidecar-in-shared-dir", "wrong-sidecar"]
)
def test_a_planted_library_is_never_loaded(
    fresh_kernel: pytest.MonkeyPatch,
    tmp_path: Path,
    library_name: str,
    evil_library: tuple[Path, Path],
    digest: bool | str,
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if digest is True:
        cache.chmod(0o777)  # a matching sidecar only helps an attacker who could write the folder
    _plant(cache, library_name, evil_library, digest)
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(cache))
    _assert_not_loaded_and_rebuilt(evil_library, cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700  # our own folder: tightened


def test_a_new_cache_folder_is_private_and_the_digest_is_recorded(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cache = tmp_path / "new" / "kernels"
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(cache))
    status = kernel_status()
    if not status.available:
        pytest.skip(status.reason)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert status.library is not None and sidecar(status.library).read_text().split()[0] == sha256_file(
        status.library
    )


def test_a_symlink_in_place_of_the_library_is_refused(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path, library_name: str, evil_library: tuple[Path, Path]
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / library_name).symlink_to(evil_library[0])
    sidecar(cache / library_name).write_text(f"{sha256_file(evil_library[0])}  x\n")
    assert verify_library(cache / library_name) == "not a regular file"
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(cache))
    _assert_not_loaded_and_rebuilt(evil_library, cache)


def test_a_tampered_library_is_rebuilt(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path, library_name: str
) -> None:
    cache = tmp_path / "cache"
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(cache))
    built = kernel_status().library
    assert built is not None
    from nmrestore.runtime import reset_kernel

    reset_kernel()
    with open(built, "r+b") as f:  # flip one byte: the recorded SHA-256 no longer matches
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert verify_library(built) is not None
    assert load_kernel() is not None and verify_library(built) is None


def _other_user(folder: Path) -> None:
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        pytest.skip("making a folder owned by another user needs root")
    os.chown(folder, 65534, 65534)  # nobody


def test_a_cache_folder_owned_by_another_user_is_not_used(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path, library_name: str, evil_library: tuple[Path, Path]
) -> None:
    cache = tmp_path / "theirs"
    cache.mkdir(mode=0o755)
    _plant(cache, library_name, evil_library, True)
    _other_user(cache)
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(cache))
    fresh_kernel.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    _assert_not_loaded_and_rebuilt(evil_library, tmp_path / "tmp" / f"nmrestore-kernels-{os.getuid()}")


def test_the_predictable_temp_folder_planted_by_another_user_is_not_used(
    fresh_kernel: pytest.MonkeyPatch, tmp_path: Path, library_name: str, evil_library: tuple[Path, Path]
) -> None:
    """The old attack: the user cache is unusable, so the kernel went to $TMPDIR/nmrestore-kernels-<uid>,
    which another user had created in advance with a library in it."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the user cache cannot be created
    fresh_kernel.setenv("NMRESTORE_KERNEL_CACHE", str(blocker / "kernels"))
    tmp = tmp_path / "tmp"
    tmp.mkdir(mode=0o1777)
    fresh_kernel.setattr(tempfile, "tempdir", str(tmp))
    planted = tmp / f"nmrestore-kernels-{os.getuid()}"
    planted.mkdir(mode=0o777)
    planted.chmod(0o777)
    _plant(planted, library_name, evil_library, True)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        os.chown(planted, 65534, 65534)  # as another user would have it: we cannot tighten it
    _assert_not_loaded_and_rebuilt(evil_library, None)
    status = kernel_status()
    assert status.library is not None and status.library.parent != planted
    assert stat.S_IMODE(status.library.parent.stat().st_mode) == 0o700
