"""What a benchmark table may claim: paired confidence intervals and the papers' relations.

Rows carry ``tiles`` (the PSNR of fixed HR tiles of the test images, the same tiles for every row)
and ``per_image`` PSNRs. :func:`attach_deltas` adds each row's paired difference from the dense model
(``vs_dense``); :func:`evidence_checks` states the relations the papers report -- SR-STE above
one-shot, SLS above the best uniform N:M at no more MACs, N:M above filter pruning -- as PASS only
where the 95% interval of the paired difference excludes 0, and checks that every network is at
least as good as bicubic on every test image.
"""

from __future__ import annotations

from typing import Any

from nmrestore.metrics.paired import PairedDelta, paired_delta

__all__ = ["ablation_lines", "attach_deltas", "compare", "evidence_checks", "format_delta"]

Row = dict[str, Any]

#: Rows that are not networks (no per-image check against bicubic).
_BASELINES = ("bicubic", "input")


def _find(rows: list[Row], method: str, budget: Any = None) -> Row | None:
    return next(
        (r for r in rows if r["method"] == method and (budget is None or r.get("budget") == budget)), None
    )


def compare(a: Row, b: Row) -> PairedDelta | None:
    """The paired tile-PSNR difference ``a - b``, or None when either row has no tiles."""
    if not a.get("tiles") or not b.get("tiles") or len(a["tiles"]) != len(b["tiles"]):
        return None
    return paired_delta(a["tiles"], b["tiles"])


def attach_deltas(rows: list[Row], reference: str = "dense") -> None:
    """Give every row with tiles its paired difference from the ``reference`` row of its own task and
    scale (``vs_<reference>``): a multi-task table (PNG's x2/x3/x4) compares each task with its own."""
    for row in rows:
        ref = next(
            (
                r
                for r in rows
                if r["method"] == reference
                and r.get("task") == row.get("task")
                and r.get("scale") == row.get("scale")
            ),
            None,
        )
        if ref is None or row is ref:
            continue
        delta = compare(row, ref)
        if delta is not None:
            row[f"vs_{reference}"] = delta.to_dict()


def format_delta(value: Any) -> str:
    """``+0.123 [+0.101, +0.145]`` from a ``PairedDelta.to_dict()``; ``-`` when absent."""
    if not isinstance(value, dict):
        return "-"
    return f"{value['mean']:+.3f} [{value['low']:+.3f}, {value['high']:+.3f}]"


def _label(row: Row) -> str:
    budget = row.get("budget")
    return row["method"] if budget in (None, 1.0) else f"{row['method']} {budget}"


def _relation(a: Row, b: Row, what: str) -> tuple[str, bool] | None:
    delta = compare(a, b)
    if delta is None:
        return None
    if delta.low > 0:
        verdict = f"{_label(a)} beats {_label(b)}"
    elif delta.high < 0:
        verdict = f"reversed: {_label(b)} beats {_label(a)}"
    else:
        verdict = "not shown (the interval includes 0)"
    return f"{what}: {_label(a)} - {_label(b)} = {delta} -> {verdict}", delta.low > 0


def _no_worse_than_bicubic(rows: list[Row]) -> list[tuple[str, bool]]:
    bicubic = _find(rows, "bicubic")
    if bicubic is None or not bicubic.get("per_image"):
        return []
    reference = {str(r["name"]): float(r["psnr"]) for r in bicubic["per_image"]}
    failures = []
    for row in rows:
        if row["method"] in _BASELINES or not row.get("per_image"):
            continue
        for image in row["per_image"]:
            gap = float(image["psnr"]) - reference.get(str(image["name"]), float("-inf"))
            if gap < 0:
                failures.append(f"{_label(row)} on {image['name']} ({gap:+.2f} dB)")
    networks = sum(1 for r in rows if r["method"] not in _BASELINES and r.get("per_image"))
    text = f"every network ({networks}) at least as good as bicubic on every test image"
    if failures:
        shown = ", ".join(failures[:6]) + (f" and {len(failures) - 6} more" if len(failures) > 6 else "")
        text += f"; below bicubic: {shown}"
    return [(text, not failures)]


def evidence_checks(rows: list[Row]) -> list[tuple[str, bool]]:
    """The papers' relations with paired 95% CIs, per budget, and the per-image bicubic floor."""
    checks = _no_worse_than_bicubic(rows)
    budgets = list(dict.fromkeys(r["budget"] for r in rows if isinstance(r.get("budget"), str)))
    for budget in budgets:
        oneshot, srste = _find(rows, "oneshot", budget), _find(rows, "srste", budget)
        sls, filt = _find(rows, "sls", budget), _find(rows, "filter", budget)
        found: list[tuple[str, bool] | None] = []
        if oneshot and srste:
            found.append(_relation(srste, oneshot, "SR-STE vs one-shot"))
        ste = _find(rows, "uniform_ste", budget)
        uniform = [r for r in (oneshot, srste, ste) if r is not None]
        if sls and uniform:
            best = max(uniform, key=lambda r: r["psnr"])
            check = _relation(sls, best, "SLS vs the best uniform N:M")
            if check is not None:
                fewer = sls["macs_g"] <= best["macs_g"] * (1 + 1e-9)
                macs = f" (MACs {sls['macs_g']:.3g} vs {best['macs_g']:.3g} G{'' if fewer else ': MORE'})"
                found.append((check[0] + macs, check[1] and fewer))
        if filt and uniform:
            best = max((r for r in uniform if r is not ste), key=lambda r: r["psnr"])
            found.append(_relation(best, filt, "N:M vs filter pruning"))
        checks += [c for c in found if c is not None]
    return checks


def _difference(a: Row, b: Row, what: str) -> str | None:
    delta = compare(a, b)
    if delta is None:
        return None
    verdict = "0 inside the interval" if delta.low <= 0 <= delta.high else "interval excludes 0"
    return f"{what}: {_label(a)} - {_label(b)} = {delta} ({verdict})"


def ablation_lines(rows: list[Row]) -> list[str]:
    """What separates SLS from SR-STE, where the ablation row ``uniform_ste`` was run.

    ``uniform_ste`` trains like SLS after its search (hard STE, ranks re-selected every step) at uniform
    N from step 0: SLS - uniform_ste measures the search (its gradual start and layer-wise N),
    uniform_ste - SR-STE the gradient (plain STE against SR-STE's decay of pruned weights). These are
    findings, not claims, so they carry no PASS/FAIL.
    """
    lines: list[str] = []
    for budget in dict.fromkeys(r["budget"] for r in rows if isinstance(r.get("budget"), str)):
        ste = _find(rows, "uniform_ste", budget)
        if ste is None:
            continue
        sls, srste = _find(rows, "sls", budget), _find(rows, "srste", budget)
        found = [
            _difference(sls, ste, "the search (gradual start, layer-wise N)") if sls else None,
            _difference(ste, srste, "the gradient (plain STE vs SR-STE)") if srste else None,
        ]
        lines += [line for line in found if line is not None]
    return lines
