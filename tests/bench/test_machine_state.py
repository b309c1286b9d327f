"""The machine probe of the timed sections: a run on a slowed machine says so."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _roofline import machine_note, slowed  # noqa: E402

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
