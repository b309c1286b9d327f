"""The machine probe of the timed sections: a run on a slowed machine says so."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _roofline import carried_quiet, machine_note, quiet_ceilings, slowed  # noqa: E402
from _speed_report import below_quiet  # noqa: E402

QUIET = {"copy_gbs": 27.0, "gemm_f32_gmacs": 230.0, "gemm_bf16_gmacs": 1280.0}


def test_a_run_at_the_quiet_ceilings_has_no_warning() -> None:
    note = machine_note({"machine_before": QUIET, "machine_after": QUIET, "quiet_ceilings": QUIET})
    assert note.startswith("Machine during the run")
    assert "bf16 GEMM 1280 / 1280 GMAC/s (quiet machine 1280)" in note
    assert "slowed" not in note


def test_a_ceiling_that_drops_below_three_quarters_marks_the_run() -> None:
    slow = {**QUIET, "gemm_f32_gmacs": 160.0}
    assert slowed(QUIET, QUIET, QUIET) == []
    # 160 is 70% of 230: moved between before and after, and below the quiet machine's
    assert slowed(QUIET, slow, QUIET) == ["f32 GEMM moved from 230 to 160", "f32 GEMM 160 against 230 on the quiet machine"]
    # slow throughout: steady before/after, still below the quiet machine
    assert slowed(slow, slow, QUIET) == ["f32 GEMM 160 against 230 on the quiet machine"]
    assert slowed(slow, slow, None) == []
    note = machine_note({"machine_before": slow, "machine_after": slow, "quiet_ceilings": QUIET})
    assert "**Timed on a slowed machine** (f32 GEMM 160 against 230 on the quiet machine)" in note


def test_runs_recorded_before_the_probe_have_no_sentence() -> None:
    assert machine_note({}) == ""


def test_a_slowed_roofline_run_does_not_lower_the_quiet_reference() -> None:
    slow = {"copy_gbs": 28.0, "gemm_f32_gmacs": 180.0, "gemm_bf16_gmacs": 1000.0}
    # per ceiling, the higher of the reference and the run: copy rose, the GEMMs stay at the reference
    assert carried_quiet(QUIET, slow) == {"copy_gbs": 28.0, "gemm_f32_gmacs": 230.0, "gemm_bf16_gmacs": 1280.0}
    assert carried_quiet(None, slow) == slow  # the first run is its own reference


def test_the_reference_comes_from_the_roofline_section(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import _report

    monkeypatch.setattr(_report, "results_path", lambda key: tmp_path / f"{key}.json")
    assert quiet_ceilings() is None
    (tmp_path / "speed_roofline.json").write_text('{"ceilings": {"gemm_f32_gmacs": 180.0}}')
    assert quiet_ceilings() == {"gemm_f32_gmacs": 180.0}  # runs recorded before the carried reference
    (tmp_path / "speed_roofline.json").write_text(
        '{"ceilings": {"gemm_f32_gmacs": 180.0}, "quiet_ceilings": {"gemm_f32_gmacs": 230.0}}'
    )
    assert quiet_ceilings() == {"gemm_f32_gmacs": 230.0}


def test_the_roofline_section_says_when_its_run_was_below_the_reference() -> None:
    slow = {**QUIET, "gemm_f32_gmacs": 188.0}
    assert "below the highest this machine has reached" in below_quiet({"ceilings": slow, "quiet_ceilings": QUIET})
    assert "f32 GEMM 230, bf16 GEMM 1280 GMAC/s, copy 27.0 GB/s" in below_quiet({"ceilings": slow, "quiet_ceilings": QUIET})
    assert below_quiet({"ceilings": QUIET, "quiet_ceilings": QUIET}) == ""
    assert below_quiet({"ceilings": slow}) == ""  # runs recorded before the carried reference


def test_the_probe_measures_in_a_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import _roofline

    def in_this_process(rounds: int = 5) -> None:
        raise AssertionError("the probe measured in the benchmark's own process")

    monkeypatch.setattr(_roofline, "measure_ceilings", in_this_process)
    monkeypatch.setattr(_roofline, "PROBE_PAUSE_S", 0.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        state = _roofline.machine_state(rounds=1)
    finally:
        torch.set_num_threads(threads)
    assert set(state) == {"copy_gbs", "gemm_f32_gmacs", "gemm_bf16_gmacs"} and min(state.values()) > 0
