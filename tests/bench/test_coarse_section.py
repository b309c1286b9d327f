"""Section `coarse`: a speed-only rerun keeps the committed PSNR rows and says where they came from."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_coarse  # noqa: E402


def _committed() -> dict[str, object]:
    """The committed run as a full run (with the study) would have written it."""
    payload = json.loads((ROOT / "docs" / "bench" / "coarse.json").read_text())
    payload.pop("psnr_from", None)
    return payload  # type: ignore[no-any-return]


def _args(**kw: object) -> argparse.Namespace:
    base = {"speed_only": True, "no_speed": True, "threads": 1, "repeats": 1, "budgets": ("4:32",)}
    return argparse.Namespace(**{**base, **kw})


def test_speed_only_keeps_the_psnr_rows_and_records_their_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = {**_committed(), "command": "python benchmarks/bench_coarse.py --study-dir S", "date": "D"}
    (tmp_path / "docs" / "bench").mkdir(parents=True)
    (tmp_path / "docs" / "bench" / "coarse.json").write_text(json.dumps(old))
    monkeypatch.setattr(bench_coarse, "ROOT", tmp_path)
    data = bench_coarse.measure(_args())
    assert data["rows"] == old["rows"] and data["dense_digest"] == old["dense_digest"]
    assert data["psnr_from"] == {"command": "python benchmarks/bench_coarse.py --study-dir S", "date": "D"}
    assert "speed" not in data  # --no-speed: nothing timed
    # a second speed-only run keeps naming the run that measured the PSNR, not the first speed-only one
    (tmp_path / "docs" / "bench" / "coarse.json").write_text(json.dumps({**data, "command": "speed", "date": "E"}))
    assert bench_coarse.measure(_args())["psnr_from"]["date"] == "D"


def test_speed_only_without_an_earlier_run_says_what_it_needs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_coarse, "ROOT", tmp_path)
    with pytest.raises(SystemExit, match="needs the PSNR rows"):
        bench_coarse.measure(_args())


def test_the_section_names_the_run_its_psnr_rows_came_from() -> None:
    payload = {**_committed(), "psnr_from": {"command": "python benchmarks/bench_coarse.py --study-dir S", "date": "D"}}
    _, body = bench_coarse.render("coarse", payload)
    assert "PSNR rows from `python benchmarks/bench_coarse.py --study-dir S` (D)" in body
    _, plain = bench_coarse.render("coarse", _committed())
    assert "PSNR rows from" not in plain
