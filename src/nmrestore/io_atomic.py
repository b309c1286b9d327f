"""The one atomic file writer every part of nmrestore uses.

A file is written to a temp file in the same folder (``.NAME.XXXXXXXX.tmp``), flushed and
fsync'ed, given the permissions a plain ``open()`` would give (``0666 & ~umask``), then moved
into place with ``os.replace``. Readers therefore see the old file or the new one, never a part
of one: a kill, a full disk or an exception inside the writer leaves the previous file intact.
On every failure that Python sees (exceptions, ``KeyboardInterrupt``) the temp file is removed;
only a SIGKILL or a power cut can leave a dot temp file, which nothing reads.

Why one helper: checkpoints, packed files, ONNX models, PNG outputs and JSON/text reports all
need the same guarantees, and copies of this logic drift (the 0600 permissions bug came from
one writer forgetting the ``chmod``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "as_os_error",
    "atomic_open",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "plain_file_mode",
]


def _current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    ``os.umask(0)`` + restore has a window in which another thread would create files with
    umask 0 (world-writable); Linux reports the value in ``/proc/self/status`` instead.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_file_mode() -> int:
    """The mode ``open(path, "w")`` would create a file with (``0644`` under the usual umask)."""
    return 0o666 & ~_current_umask()


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable; best effort (some filesystems refuse fsync on folders)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that wants a file name; on success it
    replaces ``path`` atomically, on any failure it is removed and ``path`` is left untouched.

    The writer may replace the temp file itself (safetensors does, through its own ``0600``
    file): permissions are set after it returns, then the data is fsync'ed and renamed.
    ``mode`` defaults to :func:`plain_file_mode`. Parent folders are created (umask applies).
    """
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:  # read-only folder, no space...: name the file the user asked for
        if exc.errno is not None:
            exc.filename = str(target)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, plain_file_mode() if mode is None else mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:  # KeyboardInterrupt and SystemExit too: never leave the temp behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, str(tmp)):
            exc.filename = str(target)  # name the file the user asked for, not a removed temp
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """``open(path, "wb")`` made atomic, as :func:`atomic_path`."""
    with atomic_path(path, mode) as tmp, open(tmp, "wb") as f:
        yield f


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a part."""
    with atomic_open(path, mode=mode) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def as_os_error(exc: BaseException, path: str | os.PathLike[str]) -> BaseException:
    """The OSError inside a library's own error (Rust's ``... (os error 28)``), naming ``path``.

    safetensors reports a full disk as ``SafetensorError: ... No space left on device (os error
    28)``; turned back into ``OSError(ENOSPC)`` it gets the CLI's one-line answer. Any other
    exception is returned as it is.
    """
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))
