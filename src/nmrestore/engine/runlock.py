"""One run per run folder: an exclusive, non-blocking lock held for the whole of ``train``.

Why: two ``nmrestore train`` runs into one ``--out`` both exited 0 and left the checkpoints of
one, the ``recipe.yaml`` of the other and their ``metrics.jsonl`` lines interleaved. The lock is
``fcntl.flock`` on ``<run>/.nmrestore.lock``: the kernel drops it when the process dies (even by
SIGKILL), so a crashed run never leaves a stale lock, and ``--resume`` just works. The holder
writes its pid into the file so the refused run can name it. The refused run changes nothing:
it opens the existing lock file without truncating it and stops before any other file access.

Under torchrun only rank 0 (``RANK``) takes the lock; the other ranks of the same run share it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from nmrestore.errors import NMRestoreError

LOCK_NAME = ".nmrestore.lock"

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, no lock
    fcntl = None  # type: ignore[assignment]


class RunInUseError(NMRestoreError):
    """Another process is training into this run folder."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path | None]:
    """Hold the run folder's lock for the ``with`` block; :class:`RunInUseError` if it is taken.

    Creates ``run_dir`` (umask permissions) when it does not exist. Yields the lock file's path,
    or None where no lock is taken (a non-zero torchrun rank, or no ``fcntl``).
    """
    if fcntl is None or int(os.environ.get("RANK", "0") or 0) != 0:
        yield None
        return
    folder = Path(run_dir)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(20, "not a folder", str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUseError(f"{folder} is in use by another run (pid {_holder(fd)})") from None
        try:
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as exc:  # e.g. a full disk: say which file
                exc.filename = str(path)
                raise
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale pid once the run is over
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
