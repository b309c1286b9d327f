"""The checks of section ``speed_dense_runtime``, its control and the history of its runs.

Every check comes from the rounds of one run: the paired speed-up of an engine over a runtime (median and
geometric mean with a bootstrap 95% interval). A speed-up target needs its median at the target against
both compiles of the OpenVINO peer. "Not slower" (the 2:4 hand-offs, which run the model on OpenVINO
itself) is a non-inferiority check whose margin is the run's own control: the largest gap this run timed
between an OpenVINO peer and the same peer compiled a second time from the same export. Why a margin:
held to "the interval not below 1", OpenVINO failed against its own second compile in about a quarter of
its pairs (the compiles of one model differ by a few percent for as long as they live), so that rule
cannot tell a slower engine from another compile; with the margin, OpenVINO's pairs, each judged by the
others' gaps, fail it about as rarely as a 95% interval should (:func:`control_verdicts` counts both).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from _report import markdown_table
from _roofline import slowed
from nmrestore.metrics.paired import paired_delta

COARSE = " coarse"  # an N:M label with this suffix: masks shared by blocks of output channels
F32, BF16, FP16 = "engine f32", "engine bf16", "engine fp16"
RUNTIMES = ("onnxruntime", "openvino f32", "openvino default")
OPENVINO = ("openvino f32", "openvino default")
#: The control: OpenVINO's two peers compiled a second time from the same export and timed as two more
#: contenders. Against the first compile they are the same runtime on the same model, so their ratio is
#: this protocol's own spread for a hand-off (an engine that runs the model on OpenVINO) against its peer.
AGAIN = " (compiled again)"
#: a run whose control margin is wider than this cannot resolve the few percent its checks are about: its
#: timings are marked unreliable (six compiles of one model timed 1-5% apart; over the first 55 runs with
#: a control the margins were 1.014-1.048x in 43 and 1.057-1.110x in the other 12)
MARGIN_LIMIT = 1.05
#: runs shown side by side in the section (the JSON keeps every earlier run's summary)
HISTORY_SHOWN = 8
#: (engine, runtime it is held against, N:M, wanted speed-up); "best" = the fastest runtime row
#: (at f32 only for the f32 engine); a wanted speed-up of 1.0 means "not slower"
TARGETS = (
    (BF16, "best", "2:4", 1.0),
    (F32, "best f32", "2:4", 1.0),
    (F32, "openvino f32", "4:32", 2.0),
    (F32, "openvino f32", "2:32", 3.0),
    (BF16, "openvino default", "4:32", 1.3),
    (BF16, "openvino default", "2:32", 2.0),
    (F32, "openvino f32", "4:32" + COARSE, 2.0),
    (F32, "openvino f32", "2:32" + COARSE, 3.0),
    (BF16, "openvino default", "4:32" + COARSE, 1.3),
    (BF16, "openvino default", "2:32" + COARSE, 2.0),
    (FP16, "best", "2:4", 1.0),
    (FP16, "openvino default", "4:32", 1.3),
    (FP16, "openvino default", "2:32", 2.0),
    (FP16, "openvino default", "4:32" + COARSE, 1.3),
    (FP16, "openvino default", "2:32" + COARSE, 2.0),
)
#: Checks measured and shown but not counted among the targets: the 16-bit engines against OpenVINO's AMX
#: on masks no AMX tile can use (per-channel masks: every output channel keeps other input channels,
#: section `mask_union`; the fp16 engine: this CPU has no AMX for fp16). On the bf16 engine the
#: block-shared masks of the same N:M are what meets these speed-ups (section `coarse` for their PSNR).
REPORTED = frozenset({
    (BF16, "openvino default", "4:32"), (BF16, "openvino default", "2:32"),
    (FP16, "openvino default", "4:32"), (FP16, "openvino default", "2:32"),
    (FP16, "openvino default", "4:32" + COARSE), (FP16, "openvino default", "2:32" + COARSE),
})  # fmt: skip


def compare(row: dict[str, Any], engine: str, against: str) -> tuple[str, float, tuple[float, float, float]]:
    """(runtime compared, median speed-up of the engine over it, geometric mean speed-up and its 95% interval)."""
    runs = row["runs_ms"]
    if against.startswith("best"):
        pool = [r for r in RUNTIMES if r in runs and (against == "best" or r != "openvino default")]
        against = min(pool, key=lambda r: statistics.median(runs[r]))
    log_ratio = paired_delta([math.log(t) for t in runs[against]], [math.log(t) for t in runs[engine]])
    speedup = statistics.median([a / b for a, b in zip(runs[against], runs[engine], strict=True)])
    return against, speedup, (math.exp(log_ratio.mean), math.exp(log_ratio.low), math.exp(log_ratio.high))


def _control_pairs(rows: dict[str, dict[str, Any]]) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(N:M, peer, its second compile's speed-up over the first: geometric mean, low, high) per control pair."""
    return [
        (nm, peer, compare(row, peer + AGAIN, peer)[2])
        for nm, row in rows.items()
        for peer in OPENVINO
        if peer in row["runs_ms"] and peer + AGAIN in row["runs_ms"]
    ]


def margin_of(pairs: list[tuple[str, str, tuple[float, float, float]]]) -> float:
    """The largest gap between two compiles of one OpenVINO peer, either way (geometric means; 1.0: none)."""
    return max((max(geo, 1 / geo) for _, _, (geo, _, _) in pairs), default=1.0)


def control_margin(rows: dict[str, dict[str, Any]]) -> float:
    """The run's margin for "not slower": :func:`margin_of` its control pairs."""
    return margin_of(_control_pairs(rows))


def consistency(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Where an engine handed the model to OpenVINO, its time against the OpenVINO peer of the same
    precision: the same runtime on the same model, so far from 1 means this run's timings are unreliable;
    likewise a control margin wider than MARGIN_LIMIT."""
    margin = control_margin(rows)
    notes = (
        [f"OpenVINO timed up to {margin:.3f}x apart from its own second compile (more than {MARGIN_LIMIT:g}x)"]
        if margin > MARGIN_LIMIT
        else []
    )
    for nm, row in rows.items():
        for engine, peer in ((F32, "openvino f32"), (BF16, "openvino default"), (FP16, "openvino default")):
            if engine not in row["engines"]:
                continue
            runs_on = row["engines"][engine]["runs_on"]
            if runs_on.startswith(peer) and peer in row["runs_ms"]:
                ratio = statistics.median(row["runs_ms"][peer]) / statistics.median(row["runs_ms"][engine])
                if not 0.8 <= ratio <= 1.25:
                    notes.append(
                        f"at {nm} the {peer} peer took {ratio:.2f}x the time of {engine}, which ran the same "
                        f"model on {runs_on}"
                    )
    return notes


def control(rows: dict[str, dict[str, Any]]) -> list[str]:
    """Each OpenVINO peer against itself compiled again (see AGAIN): geometric mean and 95% interval."""
    lines: dict[str, list[str]] = {}
    for nm, peer, (geo, low, high) in _control_pairs(rows):
        lines.setdefault(nm, []).append(f"{peer} {geo:.3f}x [{low:.3f}, {high:.3f}]")
    return [f"{nm}: " + ", ".join(parts) for nm, parts in lines.items()]


def control_verdicts(rows: dict[str, dict[str, Any]]) -> dict[str, int]:
    """Each OpenVINO peer against its own second compile, held to both "not slower" rules in both
    directions: how many pairs this run compared; in how many one compile was shown slower by "the interval
    not below 1" (``differ``); and by the margin rule, each pair judged by the margin of the run's other
    pairs (``differ_margin``, as a hand-off is judged by the margin of pairs it is not one of). Identical
    runtimes fail a rule as often as the protocol does: the rate a hand-off held to that rule should fail at."""
    pairs = _control_pairs(rows)
    differ = differ_margin = 0
    for i, (_, _, (_, low, high)) in enumerate(pairs):
        differ += high < 1.0 or low > 1.0
        margin = margin_of(pairs[:i] + pairs[i + 1 :])
        differ_margin += high < 1 / margin or low > margin
    return {"compared": len(pairs), "differ": differ, "differ_margin": differ_margin}


def check_results(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every check of TARGETS this run measured: the speed-ups against the runtime (and against its second
    compile, where the run has one), whether it is met against both (``ok``; "not slower" by the control's
    margin, and by the interval alone in ``ok_strict``) and whether it is a target or only reported."""
    margin = control_margin(rows)
    results = []
    for engine, target, nm, wanted in TARGETS:
        if nm not in rows or engine not in rows[nm]["runs_ms"]:
            continue
        name, speedup, (geo, low, high) = compare(rows[nm], engine, target)
        highs, speedups, again = [high], [speedup], None
        if name + AGAIN in rows[nm]["runs_ms"]:
            # the same runtime compiled again can run faster (see control()): held against both compiles
            _, speedup2, (geo2, low2, high2) = compare(rows[nm], engine, name + AGAIN)
            again = {"speedup": speedup2, "geo": geo2, "low": low2, "high": high2}
            highs.append(high2)
            speedups.append(speedup2)
        if wanted == 1.0:
            ok, ok_strict = all(h >= 1 / margin for h in highs), all(h >= 1.0 for h in highs)
        else:
            ok = ok_strict = all(s >= wanted for s in speedups)
        role = "reported" if (engine, target, nm) in REPORTED else "target"
        results.append({"engine": engine, "target": target, "against": name, "nm": nm, "wanted": wanted,
                        "speedup": speedup, "geo": geo, "low": low, "high": high, "again": again, "ok": ok,
                        "ok_strict": ok_strict, "margin": margin, "role": role})  # fmt: skip
    return results


def run_summary(payload: dict[str, Any], source: str) -> dict[str, Any]:
    """What the section's history keeps of a run: its date, kernel, machine and every check's verdict."""
    rows = {r["nm"]: r for r in payload["rows"]}
    kernel = re.search(r"nm_kernels-([0-9a-f]{8})", payload.get("kernel", ""))
    before, after = payload.get("machine_before"), payload.get("machine_after")
    checks = [
        {"engine": c["engine"], "target": c["target"], "nm": c["nm"], "speedup": c["speedup"],
         "speedup_again": c["again"]["speedup"] if c["again"] else None, "ok": c["ok"], "ok_strict": c["ok_strict"],
         "role": c["role"], "handed_off": rows[c["nm"]]["engines"][c["engine"]]["runs_on"] != "the engine"}
        for c in check_results(rows)
    ]  # fmt: skip
    return {
        "date": payload["date"], "source": source, "kernel": kernel[1] if kernel else "-",
        "order": payload.get("order", "rotated"),
        "machine_before": before, "machine_after": after,
        "slowed": bool(slowed(before, after, payload.get("quiet_ceilings"))) if before else None, "checks": checks,
        "control": control_verdicts(rows), "margin": control_margin(rows), "consistent": not consistency(rows),
    }  # fmt: skip


def targets_met(run: dict[str, Any]) -> bool:
    """Whether every target (not the reported checks) of a run's summary was met."""
    return all(c["ok"] for c in run["checks"] if c.get("role", "target") == "target")


def with_history(data: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, Any]:
    """``data`` with the history of earlier runs: the previous run's, with this one's summary added."""
    if previous is None:
        return {**data, "history": []}
    return {**data, "history": [*previous.get("history", []), run_summary(previous, "the run before")]}


def history_table(payload: dict[str, Any], last: int = HISTORY_SHOWN) -> str:
    """The checks of the last runs side by side: one row per check, one column per run, this run last."""
    runs = [*payload.get("history", []), run_summary(payload, "this run")][-last:]
    columns = ["check"]
    for run in runs:
        mark = {True: " (slowed)", False: "", None: " (not probed)"}[run["slowed"]]
        mark += "" if run.get("consistent", True) else " (unreliable)"
        order = " shuffled" if run.get("order") == "shuffled" else ""
        columns.append(f"{run['date'][5:16]} {run['kernel'][:6]}{order}{mark}")
    table: list[dict[str, object]] = []

    def add(check: str, cell: Any) -> None:
        table.append({"check": check, **{col: cell(run) for run, col in zip(runs, columns[1:], strict=True)}})

    def gemm(run: dict[str, Any]) -> str:
        b, a = run["machine_before"], run["machine_after"]
        return f"{b['gemm_f32_gmacs']:.0f} / {a['gemm_f32_gmacs']:.0f}" if b else "-"

    add("f32 GEMM before / after, GMAC/s", gemm)
    for engine, target, nm, wanted in TARGETS:
        need = "not slower" if wanted == 1.0 else f">= {wanted:g}x"
        reported = ", reported" if (engine, target, nm) in REPORTED else ""

        def verdict(run: dict[str, Any], key: tuple[str, str, str] = (engine, target, nm)) -> str:
            found = next((c for c in run["checks"] if (c["engine"], c["target"], c["nm"]) == key), None)
            if found is None:
                return "-"
            again = f" / {found['speedup_again']:.2f}" if found["speedup_again"] is not None else ""
            return f"{found['speedup']:.2f}{again} {'PASS' if found['ok'] else 'FAIL'}"

        add(f"{engine} vs {target} at {nm} ({need}{reported})", verdict)
    add(
        "margin for not slower (OpenVINO against itself)",
        lambda r: f"{r['margin']:.3f}x" if "margin" in r else "-",
    )

    def own(run: dict[str, Any]) -> str:
        found = run.get("control") or {}
        if not found.get("compared"):
            return "-"
        by_margin = found.get("differ_margin", "-")
        return f"{found['differ']} / {by_margin} of {found['compared']} FAIL"

    add(
        "openvino vs its own second compile, not slower either way (by the interval alone / by the margin)",
        own,
    )
    add("every target met", lambda r: "yes" if targets_met(r) else "no")
    return markdown_table(table, columns)


def _wanted(check: dict[str, Any]) -> float:
    return next(w for e, t, nm, w in TARGETS if (e, t, nm) == (check["engine"], check["target"], check["nm"]))


def not_slower_rates(payload: dict[str, Any], order: str | None = None) -> dict[str, int]:
    """Over every run that timed the control (this one and its history; only those of ``order``, if given):
    how often the "not slower" checks of engines that handed the model to OpenVINO failed, and how often
    OpenVINO failed the same rule against its own second compile; by the interval alone and by the margin."""
    runs = [r for r in [*payload.get("history", []), run_summary(payload, "this run")] if r.get("control")]
    runs = [r for r in runs if r["control"]["compared"] and order in (None, r.get("order", "rotated"))]
    checks = [c for r in runs for c in r["checks"] if c.get("handed_off") and c["speedup_again"] is not None
              and _wanted(c) == 1.0]  # fmt: skip
    margin = [r for r in runs if "differ_margin" in r["control"]]
    return {
        "runs": len(runs), "checks": len(checks), "checks_failed": sum(not c.get("ok_strict", c["ok"]) for c in checks),
        "compared": sum(r["control"]["compared"] for r in runs), "differ": sum(r["control"]["differ"] for r in runs),
        "margin_runs": len(margin),
        "margin_checks": sum(1 for r in margin for c in r["checks"] if c in checks),
        "margin_checks_failed": sum(not c["ok"] for r in margin for c in r["checks"] if c in checks),
        "margin_compared": sum(r["control"]["compared"] for r in margin),
        "margin_differ": sum(r["control"]["differ_margin"] for r in margin),
    }  # fmt: skip


def _share(k: int, n: int) -> str:
    return f"{k} of {n} ({k / n:.0%})"


def rates_note(payload: dict[str, Any]) -> list[str]:
    """The section's paragraph on :func:`not_slower_rates`: over all runs and per order of the rounds, then
    by the margin."""
    if not payload.get("history"):
        return []
    rates = not_slower_rates(payload)
    if not (rates["checks"] and rates["compared"]):
        return []

    def counts(r: dict[str, int]) -> str:
        return (
            f'the "not slower" checks of engines that handed the model to OpenVINO failed '
            f"{_share(r['checks_failed'], r['checks'])}; OpenVINO against its own second compile, either way, "
            f"{_share(r['differ'], r['compared'])}"
        )

    parts = []
    for order in ("rotated", "shuffled"):
        r = not_slower_rates(payload, order)
        if r["checks"] and r["compared"] and r["runs"] < rates["runs"]:
            parts.append(f"in the {r['runs']} with {order} rounds {counts(r)}")
    split = f" By order of the rounds: {'; '.join(parts)}." if parts else ""
    by_margin = (
        f" By the margin rule, over the {rates['margin_runs']} runs whose timings are kept: the hand-offs' checks "
        f"failed {_share(rates['margin_checks_failed'], rates['margin_checks'])}, OpenVINO's pairs, each judged "
        f"by the margin of the run's other pairs, {_share(rates['margin_differ'], rates['margin_compared'])}."
        if rates["margin_checks"] and rates["margin_compared"]
        else ""
    )
    return [
        f'Held to "the interval not below 1" against both compiles, over the {rates["runs"]} runs that timed the '
        f"control, {counts(rates)}.{split} A hand-off runs the peer's runtime on the peer's model: where the two "
        "rates agree, that rule's failures are the compile-to-compile spread, not a slower engine, which is "
        f'why "not slower" is judged by the margin.{by_margin}',
        "",
    ]
