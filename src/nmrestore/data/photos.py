"""The photo set: 12 nature photographs (1280-2560 px wide) from Debian's ``mate-backgrounds`` package.

The built-in scikit-image photos are too few and too small (under one megapixel in all) to tell
methods 0.1 dB apart, and DIV2K cannot be downloaded here. Debian's ``mate-backgrounds`` (GPL-2+)
ships twelve 2K-class nature photographs -- bokeh, sky, water, texture -- that any Debian/Ubuntu
machine can fetch with ``apt-get download`` (no root, nothing installed). :func:`obtain_photos`
reads the ``.deb`` in Python (an ``ar`` archive holding ``data.tar.*``) and writes HR PNGs in the
DIV2K folder layout with a fixed split (:data:`PHOTO_SPLITS`)::

    OUT/PHOTOS_train_HR/*.png   8 images
    OUT/PHOTOS_valid_HR/*.png   1 image  (validation: checkpoint choice, calibration)
    OUT/PHOTOS_test_HR/*.png    3 images (scores only)
    OUT/PHOTOS_{split}_LR_bicubic/X{2,3,4}/<name>x{s}.png   MATLAB-bicubic LR, as DIV2K ships it
    OUT/LICENSE.txt             the package's copyright entries for these files (GPL-2+)
    OUT/SOURCE.txt, OUT/manifest.json

The tree is built in a temporary folder beside ``OUT`` and moved into place in one rename, so a
broken archive leaves nothing behind; a complete ``OUT`` (its manifest checks out) is left alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nmrestore.data.datasets import make_lr
from nmrestore.data.io import read_image, write_image
from nmrestore.errors import DatasetError
from nmrestore.io_atomic import atomic_write_bytes, atomic_write_text

__all__ = [
    "PACKAGE",
    "PHOTO_PREFIX",
    "PHOTO_SPLITS",
    "PhotoSet",
    "obtain_photos",
    "read_deb_members",
]

PACKAGE = "mate-backgrounds"
#: Where the package installs the photographs (read directly when the package is installed).
INSTALLED_DIR = Path("/usr/share/backgrounds/mate/nature")
_MEMBER_DIR = "usr/share/backgrounds/mate/nature/"
_COPYRIGHT = "usr/share/doc/mate-backgrounds/copyright"
#: Folder prefix of the DIV2K-style tree (``PHOTOS_train_HR`` ...).
PHOTO_PREFIX = "PHOTOS"
#: Scales whose LR images are written once here (MATLAB bicubic is slow on 2K images; DIV2K ships them too).
LR_SCALES: tuple[int, ...] = (2, 3, 4)

#: The fixed split. Test: a flower with large bokeh, water drops, a flower on a smooth background
#: (the flat regions input-adaptive methods are about); val: one photo, never trained on.
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("Aqua", "Blinds", "Dune", "Garden", "GreenMeadow", "LadyBird", "Storm", "Wood"),
    "valid": ("TwoWings",),
    "test": ("FreshFlower", "RainDrops", "YellowFlower"),
}
_ALL = tuple(name for names in PHOTO_SPLITS.values() for name in names)
_AR_MAGIC = b"!<arch>\n"
_TAR_MODES = {"data.tar.xz": "r:xz", "data.tar.gz": "r:gz", "data.tar.bz2": "r:bz2", "data.tar": "r:"}

_HOW_TO_GET = (
    f"cannot fetch the '{PACKAGE}' package: no apt-get here. Download {PACKAGE}_*_all.deb from any "
    f"Debian or Ubuntu mirror (packages.debian.org/{PACKAGE}) and pass it with --deb FILE"
)


@dataclass(frozen=True)
class PhotoSet:
    """A written photo set: its folder, images per split, and whether this call wrote it."""

    root: Path
    counts: dict[str, int]
    created: bool

    def split_dir(self, split: str) -> Path:
        return self.root / f"{PHOTO_PREFIX}_{split}_HR"


def _ar_members(data: bytes, source: str) -> dict[str, bytes]:
    """The members of a (System V/GNU) ``ar`` archive, the container format of a ``.deb``."""
    if not data.startswith(_AR_MAGIC):
        raise DatasetError(f"{source}: not a Debian package (no ar archive header)")
    members: dict[str, bytes] = {}
    pos = len(_AR_MAGIC)
    while pos < len(data):
        header = data[pos : pos + 60]
        if len(header) < 60 or header[58:60] != b"`\n":
            raise DatasetError(f"{source}: truncated or corrupt package (bad ar header at byte {pos})")
        name = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            size = int(header[48:58].decode("ascii").strip())
        except ValueError:
            raise DatasetError(f"{source}: corrupt package (bad member size at byte {pos})") from None
        start = pos + 60
        if start + size > len(data):
            raise DatasetError(f"{source}: truncated package ({name} needs {size} bytes, fewer remain)")
        members[name] = data[start : start + size]
        pos = start + size + (size % 2)  # members are padded to an even offset
    return members


def read_deb_members(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The files of ``deb``'s data archive whose path (without a leading ``./``) satisfies ``wanted``."""
    try:
        data = deb.read_bytes()
    except OSError as exc:
        raise DatasetError(f"{deb}: cannot read ({exc.strerror or exc})") from None
    members = _ar_members(data, str(deb))
    name = next((n for n in _TAR_MODES if n in members), None)
    if name is None:
        found = ", ".join(sorted(members)) or "nothing"
        raise DatasetError(f"{deb}: no data.tar.xz/.gz/.bz2 in the package (found {found})")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(members[name]), mode=_TAR_MODES[name]) as tar:  # type: ignore[call-overload]
            for info in tar:
                path = info.name.removeprefix("./")
                if info.isfile() and wanted(path):
                    extracted = tar.extractfile(info)
                    if extracted is not None:
                        files[path] = extracted.read()
    except (tarfile.TarError, lzma.LZMAError, EOFError, OSError) as exc:
        raise DatasetError(f"{deb}: truncated or corrupt package data ({type(exc).__name__}: {exc})") from None
    return files


def _package_version(deb: Path) -> str:
    members = _ar_members(deb.read_bytes(), str(deb))
    for name, mode in (("control.tar.xz", "r:xz"), ("control.tar.gz", "r:gz")):
        if name not in members:
            continue
        try:
            with tarfile.open(fileobj=io.BytesIO(members[name]), mode=mode) as tar:  # type: ignore[call-overload]
                control = tar.extractfile("./control")
                text = control.read().decode("utf-8", "replace") if control else ""
        except (tarfile.TarError, lzma.LZMAError, EOFError, KeyError, OSError):
            return "unknown"
        for line in text.splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def _download_deb(folder: Path) -> Path:
    """``apt-get download mate-backgrounds`` into ``folder`` (needs no root and installs nothing)."""
    apt = shutil.which("apt-get")
    if apt is None:
        raise DatasetError(_HOW_TO_GET)
    done = subprocess.run(
        [apt, "download", PACKAGE], cwd=folder, capture_output=True, text=True, timeout=900, check=False
    )
    debs = sorted(folder.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DatasetError(f"apt-get download {PACKAGE} failed ({last}); {_HOW_TO_GET.split(': ', 1)[1]}")
    return debs[-1]


def _copyright_entries(text: str) -> str:
    """The package's copyright paragraphs that name the nature photographs (plus its header)."""
    paragraphs = text.split("\n\n")
    keep = [p for p in paragraphs[:1]]
    keep += [p for p in paragraphs[1:] if "nature/" in p]
    return "\n\n".join(keep).strip() + "\n"


def _decode(name: str, blob: bytes, folder: Path) -> np.ndarray:
    """A JPEG from the package as an RGB array, read through the project's checked reader."""
    path = atomic_write_bytes(folder / f"{name}.jpg", blob)
    try:
        return read_image(path)
    finally:
        path.unlink(missing_ok=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _expected_files() -> list[str]:
    files = []
    for split, names in PHOTO_SPLITS.items():
        for name in names:
            files.append(f"{PHOTO_PREFIX}_{split}_HR/{name}.png")
            files += [f"{PHOTO_PREFIX}_{split}_LR_bicubic/X{s}/{name}x{s}.png" for s in LR_SCALES]
    return files


def _complete(out: Path) -> PhotoSet | None:
    """The photo set already in ``out`` if its manifest lists every image and the files match it."""
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        entries = json.loads(manifest.read_text())["files"]
        if set(entries) != set(_expected_files()):
            return None
        if any(_sha256(out / rel) != digest for rel, digest in entries.items()):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    counts = {split: len(names) for split, names in PHOTO_SPLITS.items()}
    return PhotoSet(out, counts, created=False)


def _sources(deb: Path | None, installed: Path, scratch: Path) -> tuple[dict[str, bytes], str, str]:
    """The 12 JPEGs, the copyright text and a line saying where they came from."""
    if deb is None and all((installed / f"{n}.jpg").is_file() for n in _ALL):
        blobs = {n: (installed / f"{n}.jpg").read_bytes() for n in _ALL}
        copyright_file = Path("/") / _COPYRIGHT
        text = copyright_file.read_text() if copyright_file.is_file() else ""
        return blobs, text, f"the installed package's folder {installed}"
    if deb is None:
        deb = _download_deb(scratch)
        origin = f"`apt-get download {PACKAGE}`"
    else:
        origin = f"the package file {deb.name}"
    if not deb.is_file():
        raise DatasetError(f"{deb}: no such package file")
    files = read_deb_members(deb, lambda p: p.startswith(_MEMBER_DIR) or p == _COPYRIGHT)
    blobs = {n: files[f"{_MEMBER_DIR}{n}.jpg"] for n in _ALL if f"{_MEMBER_DIR}{n}.jpg" in files}
    missing = [n for n in _ALL if n not in blobs]
    if missing:
        raise DatasetError(f"{deb}: the package lacks {', '.join(missing)} (is it {PACKAGE}?)")
    version = _package_version(deb)
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    text = files.get(_COPYRIGHT, b"").decode("utf-8", "replace")
    return blobs, text, f"{origin}: {PACKAGE} {version}, sha256 {digest}"


def obtain_photos(
    out: str | os.PathLike[str],
    deb: str | os.PathLike[str] | None = None,
    installed_dir: str | os.PathLike[str] = INSTALLED_DIR,
) -> PhotoSet:
    """Write the photo set to ``out`` (see the module docstring); a no-op when ``out`` is complete.

    The photographs come from ``deb`` if given, else from the installed package's folder, else from
    ``apt-get download``. Raises :class:`DatasetError` (one line) on any problem, leaving ``out`` as
    it was.
    """
    target = Path(out)
    existing = _complete(target)
    if existing is not None:
        return existing
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(f"{target}: exists and is not a complete photo set; remove it or pick another --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it 0700; the set is for everyone who can read OUT
    try:
        scratch = staging / ".scratch"
        scratch.mkdir()
        blobs, copyright_text, origin = _sources(None if deb is None else Path(deb), Path(installed_dir), scratch)
        files: dict[str, str] = {}
        for split, names in PHOTO_SPLITS.items():
            for name in names:
                hr = _decode(name, blobs[name], scratch)
                images = {f"{PHOTO_PREFIX}_{split}_HR/{name}.png": hr}
                for scale in LR_SCALES:
                    images[f"{PHOTO_PREFIX}_{split}_LR_bicubic/X{scale}/{name}x{scale}.png"] = make_lr(hr, scale)
                for rel, image in images.items():
                    write_image(staging / rel, image)
                    files[rel] = _sha256(staging / rel)
        shutil.rmtree(scratch)
        atomic_write_text(
            staging / "LICENSE.txt",
            "The photographs in this folder are from the Debian package mate-backgrounds and are\n"
            "distributed under the GNU General Public License, version 2 or later (GPL-2+).\n"
            "Converted from JPEG to PNG without other change. The package's copyright entries:\n\n"
            + _copyright_entries(copyright_text)
        )
        atomic_write_text(
            staging / "SOURCE.txt",
            f"Source: {origin}\n"
            + "".join(f"{split}: {', '.join(names)}\n" for split, names in PHOTO_SPLITS.items())
        )
        atomic_write_text(staging / "manifest.json", json.dumps({"files": files}, indent=1) + "\n")
        if target.is_dir():
            target.rmdir()  # empty (checked above)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    counts = {split: len(names) for split, names in PHOTO_SPLITS.items()}
    return PhotoSet(target, counts, created=True)
