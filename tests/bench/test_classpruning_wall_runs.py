"""The ClassPruning wall-time check reads every run: a re-timing adds evidence, never replaces it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _classpruning_photos_report import DENSE, INFER, wall_check, wall_summary  # noqa: E402
from _classpruning_wall import earlier_wall_runs, kernel_code  # noqa: E402


def _run(ratio: float, kernel: str, earlier: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "photo": "P",
        "lr_size": [4, 6],
        "threads": 2,
        "rounds": 5,
        "kernel": kernel,
        "measured_at": "now",
        "median_s": {DENSE: 1.0, INFER: ratio},
        "ratio_to_dense": {DENSE: 1.0, INFER: ratio},
        "earlier_runs": earlier or [],
    }


def _wall_check(wall: dict[str, Any]) -> tuple[str, bool]:
    found = wall_check(wall)
    assert found is not None
    return found


def test_a_retime_keeps_the_run_it_replaces() -> None:
    first = _run(0.69, "k1")
    second = _run(0.72, "k1", earlier_wall_runs(first))
    assert [r["ratio"] for r in second["earlier_runs"]] == [0.69]
    third = _run(0.68, "k1", earlier_wall_runs(second))
    assert [r["ratio"] for r in third["earlier_runs"]] == [0.69, 0.72]
    assert wall_summary(first) == third["earlier_runs"][0]


def test_the_check_needs_every_run_of_the_current_kernel_under_the_limit() -> None:
    failing_then_passing = _run(0.69, "k1", [wall_summary(_run(0.72, "k1"))])
    text, ok = _wall_check(failing_then_passing)
    assert not ok and "0.720x, 0.690x" in text
    assert wall_check({}) is None  # nothing timed: no claim
    # runs of an older kernel are shown but do not count against the current one
    newer_kernel = _run(0.69, "k2", [wall_summary(_run(0.78, "k1"))])
    assert _wall_check(newer_kernel)[1]


def test_runs_group_by_kernel_code_so_a_comment_edit_starts_no_new_group() -> None:
    code = {"k.cpp": "int f() { return 1; }  // fast\n"}
    commented = {"k.cpp": "// why it is fast\n/* more */\nint f() { return 1; }  // faster\n\n"}
    changed = {"k.cpp": "int f() { return 2; }\n"}
    assert kernel_code(code) == kernel_code(commented) != kernel_code(changed)
    before = {**_run(0.72, "lib-a"), "kernel_code": kernel_code(code)}
    after = {**_run(0.69, "lib-b", earlier_wall_runs(before)), "kernel_code": kernel_code(commented)}
    text, ok = _wall_check(after)  # another library file name, the same code: the failing run counts
    assert not ok and "0.720x, 0.690x" in text
