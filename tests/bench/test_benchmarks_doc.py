"""docs/BENCHMARKS.md is regenerable: every section is its script's rendering of committed JSON."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _report  # noqa: E402

#: Sections measured before their scripts saved JSON; each stays as it was written until its script
#: is rerun (timing sections need an idle machine; the others take longer than a shared one allows).
#: A rerun writes docs/bench/<key>.json: then the key must leave this set.
PENDING_RERUN: set[str] = set()
#: Sections removed from the document (superseded or stale); nothing may describe them any more.
REMOVED = {"sr", "sr-quick", "sls", "png", "restore", "classpruning", "classpruning-denoise"}

SECTIONS = _report.doc_sections(_report.DOC.read_text())


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)


def _in_git_checkout() -> bool:
    return shutil.which("git") is not None and _git("rev-parse", "--is-inside-work-tree").returncode == 0


@pytest.mark.parametrize("key", sorted(SECTIONS))
def test_each_section_is_rendered_from_its_committed_json(key: str) -> None:
    path = _report.results_path(key)
    if key in PENDING_RERUN:
        assert not path.exists(), f"{path.name} exists: {key!r} was rerun, remove it from PENDING_RERUN"
        pytest.skip(f"section {key!r} predates its JSON: rerun pending (PENDING_RERUN)")
    assert path.is_file(), f"section {key!r} has no {path.relative_to(ROOT)}: rerun its script"
    if _in_git_checkout():
        relative = str(path.relative_to(ROOT))
        assert _git("check-ignore", "-q", relative).returncode != 0, f"{relative} is git-ignored"
        assert _git("ls-files", "--error-unmatch", relative).returncode == 0, f"{relative} is not committed"
    assert _report.render_section(key) == SECTIONS[key], (
        f"section {key!r} differs from its rendering of {path.name} (a hand edit, or a script changed "
        f"since): `python benchmarks/{_report.script_of(_report.load_results(key))}.py --render` redraws it"
    )


def test_pending_reruns_are_sections_of_the_document() -> None:
    assert set(SECTIONS) >= PENDING_RERUN, f"not in docs/BENCHMARKS.md: {PENDING_RERUN - set(SECTIONS)}"


def test_removed_sections_are_gone_and_nothing_refers_to_them() -> None:
    assert not REMOVED & set(SECTIONS)
    for key in REMOVED:
        assert not _report.results_path(key).exists()
    readme = (ROOT / "README.md").read_text()
    for key in REMOVED:
        assert f"section `{key}`" not in readme and f"sections `{key}`" not in readme
    for section in SECTIONS.values():  # a kept section names no removed one
        for key in REMOVED:
            assert f"`{key}` section" not in section and f"section `{key}`" not in section


def test_the_renderers_are_pure_functions_of_the_json(tmp_path: Path) -> None:
    """Rendering twice, or from a copy of the payload, gives the same text and touches no file."""
    rendered = [key for key in SECTIONS if key not in PENDING_RERUN]
    assert rendered, "no section is rendered from JSON yet"
    docs = sorted((ROOT / "docs").rglob("*"))
    before = {p: p.stat().st_mtime_ns for p in docs if p.is_file()}
    for key in rendered:
        payload = _report.load_results(key)
        assert _report.render_section(key, payload=payload) == _report.render_section(key)
        assert {"command", "date", "machine"} <= payload.keys()
    assert {p: p.stat().st_mtime_ns for p in docs if p.is_file()} == before
