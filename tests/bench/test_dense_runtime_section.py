"""The dense-runtime section: its checks come from the rounds, and an inconsistent run says so."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _dense_runtime_checks import (  # noqa: E402
    check_results,
    compare,
    consistency,
    control_verdicts,
    history_table,
    not_slower_rates,
    with_history,
)
from bench_dense_runtime import render  # noqa: E402


def _row(nm: str, bf16_on: str, peer_default: list[float]) -> dict[str, Any]:
    runs = {"engine f32": [10.0, 10.0, 10.0], "engine bf16": [5.0, 5.0, 5.0], "onnxruntime": [30.0, 30.0, 30.0],
            "openvino f32": [20.0, 20.0, 20.0], "openvino default": peer_default}  # fmt: skip
    engines = {
        "engine f32": {"runs_on": "the engine", "choices": [{"engine_ms": 10.0}], "plans": []},
        "engine bf16": {"runs_on": bf16_on, "choices": [{"engine_ms": 9.0}], "plans": []},
    }
    return {"nm": nm, "runs_ms": runs, "max_abs_diff": {"engine f32": 1e-7}, "engines": engines}


def test_speed_ups_and_the_best_runtime_come_from_the_rounds() -> None:
    row = _row("2:4", "openvino default (bf16)", [5.0, 5.0, 5.0])
    name, median, (geo, low, high) = compare(row, "engine f32", "openvino f32")
    assert name == "openvino f32" and median == 2.0
    assert (geo, low, high) == pytest.approx((2.0, 2.0, 2.0))
    assert compare(row, "engine bf16", "best")[0] == "openvino default"
    assert compare(row, "engine f32", "best f32")[0] == "openvino f32"  # the fastest at f32


def test_a_run_where_the_same_runtime_times_apart_is_marked_unreliable() -> None:
    steady = {"2:4": _row("2:4", "openvino default (bf16)", [5.0, 5.0, 5.0])}
    noisy = {"4:32": _row("4:32", "openvino default (bf16)", [12.0, 12.0, 12.0])}
    assert consistency(steady) == []
    assert consistency(noisy) == [
        "at 4:32 the openvino default peer took 2.40x the time of engine bf16, which ran the same model on "
        "openvino default (bf16)"
    ]
    payload = {"model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3, "settle_s": 0.05, "kernel": "k",
               "rows": list(noisy.values())}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert "**This run's timings are not reliable**" in body and "No check above is a claim" in body


def test_a_run_on_a_slowed_machine_is_marked_unreliable() -> None:
    steady = _row("2:4", "openvino default (bf16)", [5.0, 5.0, 5.0])
    quiet = {"copy_gbs": 27.0, "gemm_f32_gmacs": 230.0, "gemm_bf16_gmacs": 1280.0}
    slow = {**quiet, "gemm_bf16_gmacs": 350.0}
    payload = {"model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3, "settle_s": 0.05, "kernel": "k",
               "rows": [steady], "machine_before": quiet, "machine_after": quiet, "quiet_ceilings": quiet}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert "**This run's timings are not reliable**" not in body
    assert "f32 GEMM 230 / 230 GMAC/s (quiet machine 230)" in body
    _, body = render("speed_dense_runtime", {**payload, "machine_after": slow})
    assert (
        "the machine was slowed (bf16 GEMM moved from 1280 to 350; bf16 GEMM 350 against 1280 on the quiet machine)"
        in body
    )


def test_a_target_is_held_against_both_compiles_of_the_openvino_peer() -> None:
    row = _row(
        "2:32 coarse", "the engine", [12.0, 12.0, 12.0]
    )  # the bf16 engine: 5 ms, 2.4x the first compile
    payload = {"model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3, "settle_s": 0.05, "kernel": "k",
               "rows": [row]}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert "- PASS: engine bf16 vs openvino default at 2:32 coarse: median 2.40x" in body
    row["runs_ms"]["openvino default (compiled again)"] = [9.0, 9.0, 9.0]  # 1.8x the second
    _, body = render("speed_dense_runtime", payload)
    line = next(x for x in body.splitlines() if "engine bf16 vs openvino default at 2:32 coarse" in x)
    assert line.startswith("- FAIL") and "against its second compile median 1.80x" in line


def test_each_run_keeps_the_runs_before_it_and_the_section_shows_them_side_by_side() -> None:
    quiet = {"copy_gbs": 27.0, "gemm_f32_gmacs": 230.0, "gemm_bf16_gmacs": 1280.0}
    base = {"model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3, "settle_s": 0.05,
            "quiet_ceilings": quiet, "machine_before": quiet, "machine_after": quiet}  # fmt: skip
    first = {**base, "date": "2026-12-01 10:00 UTC", "kernel": "x/nm_kernels-aaaaaaaa11.so",
             "rows": [_row("2:4", "openvino default (bf16)", [5.0, 5.0, 5.0])]}  # fmt: skip
    second = with_history(
        {**base, "kernel": "x/nm_kernels-bbbbbbbb22.so", "machine_after": {**quiet, "gemm_f32_gmacs": 100.0},
         "rows": [_row("2:4", "openvino default (bf16)", [4.0, 4.0, 4.0])]},
        first,
    )  # fmt: skip
    assert [h["date"] for h in second["history"]] == ["2026-12-01 10:00 UTC"]
    third = with_history(
        {**base, "kernel": "k", "rows": first["rows"]}, {**second, "date": "2026-12-02 10:00 UTC"}
    )
    assert [h["kernel"] for h in third["history"]] == ["aaaaaaaa", "bbbbbbbb"]
    assert [h["slowed"] for h in third["history"]] == [False, True]
    table = history_table({**third, "date": "2026-12-03 10:00 UTC"})
    header = table.splitlines()[0]
    assert header == "| check | 12-01 10:00 aaaaaa | 12-02 10:00 bbbbbb (slowed) | 12-03 10:00 - |"
    # engine f32 (10 ms) against the fastest f32 runtime (openvino f32, 20 ms): 2x, not slower
    assert "| engine f32 vs best f32 at 2:4 (not slower) | 2.00 PASS | 2.00 PASS | 2.00 PASS |" in table
    # engine bf16 (5 ms) against openvino default at 5 ms, then 4 ms (slower: FAIL), then 5 ms
    assert "| engine bf16 vs best at 2:4 (not slower) | 1.00 PASS | 0.80 FAIL | 1.00 PASS |" in table
    assert "| engine f32 vs openvino f32 at 4:32 (>= 2x) | - | - | - |" in table
    assert "| f32 GEMM before / after, GMAC/s | 230 / 230 | 230 / 100 | 230 / 230 |" in table


def test_a_run_without_a_machine_probe_is_not_called_quiet() -> None:
    payload = {
        "date": "2026-12-01 10:00 UTC",
        "kernel": "k",
        "rows": [_row("2:4", "the engine", [5.0, 5.0, 5.0])],
    }
    summary = with_history({"rows": []}, payload)["history"][0]
    assert summary["slowed"] is None and summary["machine_before"] is None


def _twins(row: dict[str, Any], f32_again: list[float], default_again: list[float]) -> dict[str, Any]:
    row["runs_ms"]["openvino f32 (compiled again)"] = f32_again
    row["runs_ms"]["openvino default (compiled again)"] = default_again
    return row


def test_the_control_holds_openvino_to_the_not_slower_rule_against_its_own_second_compile() -> None:
    # openvino f32 runs 20 ms: its twin at 20 ms is not shown apart, at 22 ms (slower) or 18 ms (faster) it is
    same = _twins(
        _row("2:4", "openvino default (bf16)", [5.0, 5.1, 4.9]), [20.0, 20.2, 19.8], [5.0, 5.0, 5.0]
    )
    assert control_verdicts({"2:4": same}) == {"compared": 2, "differ": 0, "differ_margin": 0}
    # twins 1.10x slower (f32) and 1.11x faster (default): each is judged by the other's gap as its margin,
    # so only the default pair, 1.111x apart against a margin of 1.100x, is shown apart by the margin
    slower = _twins(_row("4:32", "the engine", [5.0, 5.0, 5.0]), [22.0, 22.0, 22.0], [4.5, 4.5, 4.5])
    assert control_verdicts({"4:32": slower}) == {"compared": 2, "differ": 2, "differ_margin": 1}
    none = {"compared": 0, "differ": 0, "differ_margin": 0}
    assert control_verdicts({"2:4": _row("2:4", "the engine", [5.0, 5.0, 5.0])}) == none


def test_not_slower_is_judged_by_the_margin_of_openvino_against_itself() -> None:
    # the control: openvino default's twin runs 4% faster than its first compile (5.2 against 5.0 ms), so a
    # hand-off 2% slower than both compiles passes (and says it is not above 1), one 6% slower fails
    def run(bf16_ms: float) -> dict[str, dict[str, Any]]:
        row = _twins(_row("2:4", "openvino default (bf16)", [5.2] * 3), [20.0] * 3, [5.0] * 3)
        row["runs_ms"]["engine bf16"] = [bf16_ms] * 3
        return {"2:4": row}

    [within] = [c for c in check_results(run(5.1 * 1.0)) if c["engine"] == "engine bf16"]
    assert within["margin"] == pytest.approx(1.04) and within["ok"] and not within["ok_strict"]
    [beyond] = [c for c in check_results(run(5.0 * 1.06)) if c["engine"] == "engine bf16"]
    assert not beyond["ok"] and not beyond["ok_strict"]
    payload = {"model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3, "settle_s": 0.05, "kernel": "k",
               "rows": list(run(5.1).values())}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert (
        "needs the interval's top not below 1 / 1.040 (the control's margin; not slower), though not above 1"
        in body
    )
    assert 'The margin for "not slower": 1.040x' in body


def test_the_reported_checks_are_shown_apart_and_do_not_count_as_targets() -> None:
    # the bf16 engine at per-channel 4:32 is 1.0x openvino default (reported); at 4:32 coarse it is 2.4x
    rows = [_row("4:32", "openvino default (bf16)", [5.0] * 3), _row("4:32 coarse", "the engine", [12.0] * 3)]
    payload = {"date": "2026-12-02 10:00 UTC", "model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3,
               "settle_s": 0.05, "kernel": "k", "rows": rows}  # fmt: skip
    roles = {(c["nm"], c["engine"]): (c["role"], c["ok"]) for c in check_results({r["nm"]: r for r in rows})}
    assert roles[("4:32", "engine bf16")] == ("reported", False)
    assert roles[("4:32 coarse", "engine bf16")] == ("target", True)
    _, body = render("speed_dense_runtime", payload)
    targets, reported = body.split("Reported, not targets")
    assert "PASS: engine bf16 vs openvino default at 4:32 coarse" in targets
    assert "FAIL: engine bf16 vs openvino default at 4:32:" in reported
    table = history_table(with_history(payload, {**payload, "date": "2026-12-01 10:00 UTC"}))
    assert "| engine bf16 vs openvino default at 4:32 (>= 1.3x, reported) | 1.00 FAIL | 1.00 FAIL |" in table
    assert "| every target met | yes | yes |" in table


def test_the_section_sets_the_hand_offs_failures_beside_the_controls() -> None:
    # run 1: the bf16 engine hands off and ties both compiles; the twins agree
    # run 2: the bf16 engine hands off at 5 ms against a first compile at 4 ms (FAIL); one twin differs
    first = {
        "date": "2026-12-01 10:00 UTC",
        "kernel": "k",
        "rows": [_twins(_row("2:4", "openvino default (bf16)", [5.0, 5.0, 5.0]), [20.0] * 3, [5.0] * 3)],
    }
    second = with_history(
        {"kernel": "k", "order": "shuffled",
         "rows": [_twins(_row("2:4", "openvino default (bf16)", [4.0] * 3), [20.0] * 3, [5.0] * 3)]},
        first,
    )  # fmt: skip
    assert second["history"][0]["control"] == {"compared": 2, "differ": 0, "differ_margin": 0}
    rates = not_slower_rates({**second, "date": "2026-12-02 10:00 UTC"})
    # engine f32 runs on the engine (not a hand-off): only the bf16 engine's check counts; in run 2 the
    # margin is 1.25x (the default twin at 5 ms against 4 ms), so the hand-off 1.25x slower passes by it
    assert rates == {
        "runs": 2,
        "checks": 2,
        "checks_failed": 1,
        "compared": 4,
        "differ": 1,
        "margin_runs": 2,
        "margin_checks": 2,
        "margin_checks_failed": 0,
        "margin_compared": 4,
        "margin_differ": 1,
    }
    table = history_table({**second, "date": "2026-12-02 10:00 UTC"})
    # run 2's control margin (1.25x) is wider than the limit: its column says its timings are unreliable
    header = "| check | 12-01 10:00 - (not probed) | 12-02 10:00 - shuffled (not probed) (unreliable) |"
    assert table.splitlines()[0] == header
    row = "| openvino vs its own second compile, not slower either way (by the interval alone / by the margin) |"
    assert f"{row} 0 / 0 of 2 FAIL | 1 / 1 of 2 FAIL |" in table
    payload = {**second, "date": "2026-12-02 10:00 UTC", "model": "m", "input": [1, 3, 4, 4], "threads": 2,
               "rounds": 3, "settle_s": 0.05}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert "after a warm-up (the contenders in a random order each round, seeded)" in body
    assert (
        'over the 2 runs that timed the control, the "not slower" checks of engines that handed the model to '
        "OpenVINO failed 1 of 2 (50%); OpenVINO against its own second compile, either way, 1 of 4 (25%). By order "
        'of the rounds: in the 1 with rotated rounds the "not slower" checks of engines that handed the model to '
        "OpenVINO failed 0 of 1 (0%); OpenVINO against its own second compile, either way, 0 of 2 (0%); in the 1 "
        "with shuffled rounds"
    ) in body
    assert (
        "By the margin rule, over the 2 runs whose timings are kept: the hand-offs' checks failed 0 of 2 (0%), "
        "OpenVINO's pairs, each judged by the margin of the run's other pairs, 1 of 4 (25%)."
    ) in body


def test_a_run_whose_control_is_wider_than_the_limit_is_marked_unreliable() -> None:
    # openvino default's twin 1.10x faster than its first compile: the run cannot resolve a few percent
    wide = _twins(_row("2:4", "openvino default (bf16)", [5.5] * 3), [20.0] * 3, [5.0] * 3)
    steady = _twins(_row("2:4", "openvino default (bf16)", [5.1] * 3), [20.0] * 3, [5.0] * 3)
    assert consistency({"2:4": steady}) == []
    assert consistency({"2:4": wide}) == ["OpenVINO timed up to 1.100x apart from its own second compile (more than 1.05x)"]
    payload = {"date": "2026-12-01 10:00 UTC", "model": "m", "input": [1, 3, 4, 4], "threads": 2, "rounds": 3,
               "settle_s": 0.05, "kernel": "k", "rows": [wide]}  # fmt: skip
    _, body = render("speed_dense_runtime", payload)
    assert "**This run's timings are not reliable**: OpenVINO timed up to 1.100x apart" in body
    table = history_table(with_history({**payload, "rows": [steady]}, payload))
    assert table.splitlines()[0] == "| check | 12-01 10:00 - (not probed) (unreliable) | 12-01 10:00 - (not probed) |"
