"""One line on stderr and exit code 2 for every error a user can cause (never a traceback)."""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from typing import Any, TypeVar

import typer

from nmrestore.errors import NMRestoreError

F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def clean_errors(fn: F) -> F:
    """Turn the project's errors (and missing files) into one line + exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except NMRestoreError as exc:
            raise fail(str(exc)) from None
        except OSError as exc:  # permissions, full disk, read-only FS, a file where a folder is...
            raise fail(os_error_message(exc)) from None

    return wrapper  # type: ignore[return-value]


#: Plain words for the OS errors a user can cause or fix (errno -> what to tell them).
_OS_HINTS = {
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EEXIST: "already exists (a file is in the way)",
    errno.EISDIR: "is a folder, expected a file",
    errno.ENOTDIR: "not a folder (a file is in the way)",
    errno.EFBIG: "file too large",
    errno.ENAMETOOLONG: "name too long",
    errno.ENOTEMPTY: "folder is not empty",
}


def os_error_message(exc: OSError) -> str:
    """One line for an OSError: the path(s) it names, then what went wrong."""
    what = _OS_HINTS.get(exc.errno or -1) or (exc.strerror or str(exc) or type(exc).__name__).lower()
    where = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{where}: {what}" if where else what
