"""The compiled-kernel cache: a folder only the current user can write, and verified libraries.

Why: when the user cache was not writable, the kernel was built into (and loaded from) a
predictable path under the temp folder without any check, so a ``.so`` planted there by another
user ran as the caller. Now a cache folder is used only when it is a directory owned by the
current user and not writable by group or others (created 0700); a library is loaded only if it
is a regular file of ours whose SHA-256 equals the one recorded when it was built (a sidecar
``<library>.sha256`` written atomically); anything else is rebuilt.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("nmrestore.runtime")


def cache_dir() -> Path:
    """Where compiled kernels live (``$NMRESTORE_KERNEL_CACHE`` or the user cache)."""
    explicit = os.environ.get("NMRESTORE_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nmrestore" / "kernels"


def _unsafe_reason(folder: Path) -> str | None:
    """Why ``folder`` must not hold libraries we load (None: it is ours alone).

    A library is code that runs as the caller: the folder must be a directory owned by the
    current user and not writable by group or others, or another user could plant a ``.so``.
    """
    try:
        st = folder.stat()
    except OSError as exc:
        return f"cannot stat it ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return "not a directory"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}, not by the current user (uid {os.getuid()})"
    if st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _private_dir(folder: Path) -> tuple[Path | None, bool, str]:
    """Make ``folder`` (0700) or check it; returns (usable folder or None, contents trusted, note).

    A folder of ours that was group/other-writable is tightened to 0700 but its contents are not
    trusted (everything in it is rebuilt before use); one owned by someone else is refused.
    """
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        return None, False, f"{folder}: cannot create it ({exc.strerror or exc})"
    reason = _unsafe_reason(folder)
    if reason is None:
        if not os.access(folder, os.W_OK | os.X_OK):
            return None, False, f"{folder}: not writable"
        return folder, True, ""
    if reason.startswith("writable by group"):
        try:
            os.chmod(folder, 0o700)
        except OSError:
            return None, False, f"{folder}: {reason}"
        if _unsafe_reason(folder) is None:
            return folder, False, f"{folder}: was {reason}; tightened to 0700, its libraries are rebuilt"
    return None, False, f"{folder}: {reason}"


_private_tmp: Path | None = None


def kernel_dir() -> tuple[Path, bool]:
    """The cache folder to build into and whether libraries already there may be reused.

    Tried in order: :func:`cache_dir`, ``$TMPDIR/nmrestore-kernels-<uid>``, and last a fresh
    private ``mkdtemp`` folder for this process. Only folders that pass :func:`_private_dir`.
    """
    global _private_tmp
    uid = os.getuid() if hasattr(os, "getuid") else 0
    notes = []
    for candidate in (cache_dir(), Path(tempfile.gettempdir()) / f"nmrestore-kernels-{uid}"):
        folder, trusted, note = _private_dir(candidate)
        if note:
            notes.append(note)
        if folder is not None:
            if notes:
                log.warning("kernel cache: %s", "; ".join(notes))
            return folder, trusted
    if _private_tmp is None or not _private_tmp.is_dir():  # unpredictable name, 0700; removed at exit
        _private_tmp = Path(tempfile.mkdtemp(prefix="nmrestore-kernels-"))
        atexit.register(shutil.rmtree, _private_tmp, True)
    log.warning("kernel cache: %s; building in %s", "; ".join(notes), _private_tmp)
    return _private_tmp, True


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sidecar(library: Path) -> Path:
    """``<library>.sha256``: the SHA-256 of the library as built, written atomically beside it."""
    return library.with_name(library.name + ".sha256")


def verify_library(library: Path) -> str | None:
    """Why ``library`` must not be loaded (None: it is the file this user built).

    It must be a regular file (not a symlink) owned by the current user, not writable by group or
    others, and its SHA-256 must equal the one recorded at build time in :func:`_sidecar`.
    """
    try:
        st = os.lstat(library)
    except OSError as exc:
        return f"cannot stat it ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return "writable by group or others"
    try:
        recorded = sidecar(library).read_text(encoding="ascii").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return "no SHA-256 recorded for it"
    if not hmac.compare_digest(recorded, sha256_file(library)):
        return "its SHA-256 differs from the one recorded when it was built"
    return None
