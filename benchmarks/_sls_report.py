"""The ``sls`` section's tables and reading, pure functions of the saved parts.

Split from ``bench_sls.py`` (which trains and measures) so each file stays short.
"""

from __future__ import annotations

import itertools
import re
import statistics
from typing import Any

from _report import markdown_table
from nmrestore.bench.config import Row
from nmrestore.bench.sls import SLS_EPOCHS, SLS_RATIO_GROWTH
from nmrestore.sparsity.api import parse_nm

BUDGETS = ("8:32", "4:32", "2:32")
METHODS = ("oneshot", "srste", "sls", "sls_srste")
#: sls_settings anneals every second epoch of the search (this name was lost when the harness's
#: SLS schedule moved to epochs).
SLS_ANNEAL_INTERVALS = SLS_EPOCHS // 2


def _find(rows: list[Row], method: str, budget: str) -> Row | None:
    return next((r for r in rows if r["method"] == method and r["budget"] == budget), None)


def _fmt_db(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def comparison_table(rows: list[Row], budgets: tuple[str, ...], methods: tuple[str, ...]) -> str:
    table = []
    for budget in budgets:
        for method in methods:
            row = _find(rows, method, budget)
            if row is None:
                continue
            table.append(
                {
                    "budget": budget,
                    "method": method,
                    "PSNR": f"{row['psnr']:.3f}",
                    "SSIM": f"{row['ssim']:.4f}",
                    "GMACs": f"{row['macs_g']:.3f}",
                    "prunable MACs %": f"{100 * row['prunable_macs_fraction']:.2f}",
                    "params (nz)": f"{row['params_nonzero']:,}",
                    "steps": row.get("finetune_steps") or "",
                    "search": _search_note(row),
                }
            )
    columns = [
        "budget",
        "method",
        "PSNR",
        "SSIM",
        "GMACs",
        "prunable MACs %",
        "params (nz)",
        "steps",
        "search",
    ]
    return markdown_table(table, columns)


def _search_note(row: Row) -> str:
    if row["method"] not in ("sls", "sls_srste", "sls_old_anneal"):
        return "reused from sr run" if "reused" in str(row.get("note", "")) else ""
    if row.get("sls_projected"):
        above = re.search(r"above budget \(([\d.]+) >", str(row.get("sls_message", "")))
        return f"projected (search ended at {above.group(1) if above else '?'})"
    return f"met at step {row.get('sls_frozen_at')}"


def delta_table(rows: list[Row], budgets: tuple[str, ...], pairs: list[tuple[str, str]]) -> str:
    table = []
    for a, b in pairs:
        entry: dict[str, Any] = {"comparison": f"{a} - {b}"}
        for budget in budgets:
            ra, rb = _find(rows, a, budget), _find(rows, b, budget)
            entry[budget] = "-" if ra is None or rb is None else _fmt_db(ra["psnr"] - rb["psnr"])
        table.append(entry)
    return markdown_table(table, ["comparison", *budgets])


def layer_n_table(rows: list[Row], budget: str, costs: list[dict[str, Any]]) -> str:
    per_weight = {c["name"]: c["macs_per_weight"] for c in costs}
    sls_row, srste_row = _find(rows, "sls", budget), _find(rows, "sls_srste", budget)
    if sls_row is None or srste_row is None:
        return "(missing rows)"
    n_srste = {layer["name"]: layer["n"] for layer in srste_row["layers"]}
    table = []
    for layer in sls_row["layers"]:
        n_a, n_b = layer["n"], n_srste.get(layer["name"])
        table.append(
            {
                "layer": layer["name"],
                "shape": "x".join(str(s) for s in layer["shape"]),
                "MACs share %": f"{100 * layer['share_of_macs']:.1f}",
                "MACs/weight": f"{per_weight.get(layer['name'], float('nan')):,.0f}",
                "uniform": "dense" if n_a is None else budget,
                "sls N": "dense" if n_a is None else f"{n_a}:{layer['m']}",
                "sls_srste N": "dense" if n_b is None else f"{n_b}:{layer['m']}",
            }
        )
    columns = ["layer", "shape", "MACs share %", "MACs/weight", "uniform", "sls N", "sls_srste N"]
    return markdown_table(table, columns)


def search_table(search: dict[str, Any]) -> str:
    table = []
    for run in search["runs"]:
        table.append(
            {
                "settings": run["settings"],
                "budget": run["budget"],
                "anneal interval / threshold": f"{run['sparsity']['anneal_interval']} / "
                f"{run['sparsity'].get('anneal_threshold', 0.2):.2f}",
                "budget met at step": run["met_at"] if run["met_at"] is not None else "no",
                "cost at deadline": "-"
                if run["fraction_at_deadline"] is None
                else f"{run['fraction_at_deadline']:.4f}",
                "final cost": f"{run['final_fraction']:.4f}",
                "coef": f"{run['coef']:.1f}",
                "N per layer": " ".join(str(n) for n in run["ns"]),
            }
        )
    columns = [
        "settings",
        "budget",
        "anneal interval / threshold",
        "budget met at step",
        "cost at deadline",
        "final cost",
        "coef",
        "N per layer",
    ]
    return markdown_table(table, columns)


def costs_table(costs: dict[str, Any]) -> str:
    table = [
        {
            "net": net["model"],
            "prunable layers (M=32)": net["layers"],
            "MACs share min..max %": f"{100 * net['share_min']:.1f}..{100 * net['share_max']:.1f}",
            "distinct MACs per weight": ", ".join(f"{v:,}" for v in net["macs_per_weight"]),
            "largest": net["top"],
        }
        for net in costs["nets"]
    ]
    return markdown_table(
        table,
        ["net", "prunable layers (M=32)", "MACs share min..max %", "distinct MACs per weight", "largest"],
    )


def _allocation(row: Row) -> dict[str, float]:
    """Mean N of the residual-block convs, and N of the trunk's last conv and of the upsampler."""
    layers = [layer for layer in row["layers"] if layer["n"] is not None]
    blocks = [
        layer["n"] for layer in layers if layer["name"].startswith("body.") and ".body." in layer["name"]
    ]
    named = {layer["name"]: layer["n"] for layer in layers}
    return {
        "blocks": statistics.mean(blocks) if blocks else float("nan"),
        "body.4": float(named.get("body.4", float("nan"))),
        "tail.0.0": float(named.get("tail.0.0", float("nan"))),
    }


def analysis(parts: dict[str, Any], old_rows: list[Row]) -> str:
    """Plain-text reading of the measured rows (every number comes from the rows above)."""
    x2 = parts["x2"]["rows"]
    lines: list[str] = []

    def d(a: str, b: str, budget: str, rows: list[Row]) -> float | None:
        ra, rb = _find(rows, a, budget), _find(rows, b, budget)
        return None if ra is None or rb is None else ra["psnr"] - rb["psnr"]

    def listing(values: dict[str, float | None]) -> str:
        return ", ".join(f"{_fmt_db(values[b])} dB at {b}" for b in BUDGETS)

    vs_srste = {b: d("sls_srste", "srste", b, x2) for b in BUDGETS}
    vs_oneshot = {b: d("sls", "oneshot", b, x2) for b in BUDGETS}
    mode = {b: d("srste", "oneshot", b, x2) for b in BUDGETS}
    paper_vs_srste = {b: d("sls", "srste", b, x2) for b in BUDGETS}
    wins_o = [b for b, v in vs_oneshot.items() if v is not None and v > 0]
    wins_s = [b for b, v in vs_srste.items() if v is not None and v > 0]

    def grows(values: dict[str, float | None]) -> bool:  # gain larger at every smaller budget
        seq = [values[b] for b in BUDGETS]
        return all(v is not None for v in seq) and all(a < b for a, b in itertools.pairwise(seq))  # type: ignore[operator]

    if grows(vs_oneshot) and grows(vs_srste):
        trend = (
            "In both pairs the gain grows as the budget shrinks, the paper's direction; it is a win only where "
            "listed, and a loss at the other budgets."
        )
    else:
        trend = (
            "Does the difference rise at every step to a smaller budget? One-shot pair: "
            f"{'yes' if grows(vs_oneshot) else 'no'}; SR-STE pair: {'yes' if grows(vs_srste) else 'no'}."
        )
    lines.append(
        "Does SLS win (edsr_small x2, 300 steps)? Compared with the uniform method that trains the weights the "
        f"same way: SLS (paper training) minus one-shot = {listing(vs_oneshot)} (wins at "
        f"{', '.join(wins_o) or 'no budget'}); sls_srste minus SR-STE = {listing(vs_srste)} (wins at "
        f"{', '.join(wins_s) or 'no budget'}). "
        + trend
        + f" Against SR-STE, the uniform row the paper compares with: SLS minus SR-STE = {listing(paper_vs_srste)}."
    )
    lines.append(
        "Why the paper's SLS trailed SR-STE in the sr table: weight-training mode, not N. SR-STE minus one-shot "
        f"(both uniform N) = {listing(mode)}. At uniform N the paper's SLS fine-tunes exactly like one-shot "
        "(hard gradients, masks fixed after freezing), so it starts that much behind SR-STE; giving SLS SR-STE's "
        "training (`sls_srste`, refresh every step also after N is frozen) removes that handicap."
    )
    alloc = {b: _allocation(r) for b in BUDGETS if (r := _find(x2, "sls_srste", b)) is not None}
    if alloc:
        lines.append(
            "What the search learns (sls_srste, N per layer): "
            + "; ".join(
                f"{b}: residual-block convs mean {a['blocks']:.1f}, trunk's last conv body.4 {a['body.4']:.0f}, "
                f"upsampler tail.0.0 {a['tail.0.0']:.0f}"
                for b, a in alloc.items()
            )
            + ". Read with the per-layer table: ranks move from the residual-block convs (whose output is added "
            "to a skip path, so a sparse block degrades towards identity) to the trunk's last conv and the "
            "upsampler (on the main path, no skip). At 2:32 uniform N leaves the upsampler 2 of every 32 weights; "
            "our reading is that keeping more there is what SLS gains at the small budget. Since every x2 layer "
            "has the same MACs per weight (table above), this is an importance-driven reallocation only; a "
            "MAC-driven one has nothing to trade on these nets."
        )
    under = {
        b: r["prunable_macs_fraction"] / (parse_nm(b)[0] / parse_nm(b)[1])
        for b in BUDGETS
        if (r := _find(x2, "sls_srste", b)) is not None
    }
    frozen = {b: r.get("sls_frozen_at") for b in BUDGETS if (r := _find(x2, "sls_srste", b)) is not None}
    lines.append(
        "Why SLS loses at the milder budgets: (1) the search uses part of the fine-tune -- N froze at steps "
        + ", ".join(f"{frozen[b]} ({b})" for b in frozen)
        + " of 300, steps in which the weights are trained for a denser net than the one that is kept; "
        "(2) the search stops as soon as the hard-N cost is under budget, and one step of a large coef drops "
        "several ranks at once, so it ends below budget: sls_srste used "
        + ", ".join(f"{100 * v:.1f}% ({b})" for b, v in under.items())
        + " of its allowed MACs; (3) without cost heterogeneity the reallocation can only pay where uniform N "
        "starves a sensitive layer, i.e. at the smallest budgets. These are explanations consistent with the "
        "rows, not separately measured (a fine-tune at the searched N without the search would separate 1 from 3)."
    )
    old = {b: r for r in old_rows if (b := r["budget"])}
    if old:
        lines.append(
            "Search length/annealing: with the harness's previous SLS schedule (paper constants: 12 anneal "
            "intervals in a 150-step search) 4:32 and 2:32 never reached the budget on the training run and were "
            "projected; their PSNR was "
            + ", ".join(f"{old[b]['psnr']:.3f} ({b})" for b in BUDGETS if b in old)
            + " against "
            + ", ".join(f"{r['psnr']:.3f} ({b})" for b in BUDGETS if (r := _find(x2, "sls", b)) is not None)
            + " now. The schedule was changed a priori (the paper's total annealing over the search) and checked "
            "only on whether the search meets its budget on training batches (table above); the 8:32 change "
            "(budget met at step 36 instead of 99) is a side effect of the faster anneal, kept rather than tuned "
            "per budget on test PSNR."
        )
    if "long" in parts:
        rows = parts["long"]["rows"]
        dl = {b: d("sls_srste", "srste", b, rows) for b in ("4:32", "2:32")}
        gain = {
            (m, b): None
            if (r6 := _find(rows, m, b)) is None or (r3 := _find(x2, m, b)) is None
            else r6["psnr"] - r3["psnr"]
            for m in ("srste", "sls_srste")
            for b in dl
        }

        def verdict(b: str) -> str:
            short, long_ = vs_srste[b], dl[b]
            if short is None or long_ is None:
                return "-"
            if (short > 0) != (long_ > 0):
                return "changes sign"
            return "narrows" if abs(long_) < abs(short) else "widens"

        frozen_long = ", ".join(
            f"{r.get('sls_frozen_at')} ({b})" for b in dl if (r := _find(rows, "sls_srste", b)) is not None
        )
        tail = (
            ": a difference measured after 300 steps partly reflects how far each method is from convergence"
        )
        if all(v is not None and v <= 0 for v in dl.values()):
            tail += (
                f", and the longer search (N froze at step {frozen_long} of 600, budget met exactly) does not make "
                "SLS win at these budgets."
            )
        else:
            tail += f" (N froze at step {frozen_long} of 600)."
        lines.append(
            "Search and fine-tune length (600 steps, search 300, SR-STE also 600 steps): sls_srste minus SR-STE = "
            + ", ".join(
                f"{_fmt_db(dl[b])} dB at {b} (300 steps: {_fmt_db(vs_srste[b])}; {verdict(b)})" for b in dl
            )
            + ". From 300 to 600 steps SR-STE gains "
            + ", ".join(f"{_fmt_db(gain[('srste', b)])} dB ({b})" for b in dl)
            + " and sls_srste "
            + ", ".join(f"{_fmt_db(gain[('sls_srste', b)])} dB ({b})" for b in dl)
            + tail
        )
    if "x4" in parts:
        rows = parts["x4"]["rows"]
        d4 = d("sls_srste", "srste", "2:32", rows)
        row = _find(rows, "sls_srste", "2:32")
        uniform = _find(rows, "srste", "2:32")
        dense4 = next(r for r in rows if r["method"] == "dense")
        bicubic4 = next(r for r in rows if r["method"] == "bicubic")
        text = (
            "Heterogeneous costs (edsr_small x4: tail.0.2 runs at twice the LR resolution, 4x the MACs per weight "
            f"of every other prunable layer): sls_srste minus SR-STE at 2:32 = {_fmt_db(d4)} dB (300 steps)."
        )
        if row is not None and uniform is not None:
            hr = next((layer["n"] for layer in row["layers"] if layer["name"] == "tail.0.2"), None)
            alloc4 = _allocation(row)
            more = row["params_nonzero"] - uniform["params_nonzero"]
            text += (
                f" It keeps {row['params_nonzero']:,} non-zero parameters against {uniform['params_nonzero']:,} for "
                f"uniform 2:32 and gives the expensive HR conv tail.0.2 N = {hr} (uniform: 2). "
            )
            if more > 0:
                text += "It did trade the expensive layer for more weights elsewhere, as in the paper."
            else:
                text += (
                    "So the paper's mechanism -- prune the layers that are expensive in MACs and keep more "
                    "parameters -- did not happen; the search made the same importance-driven move as at x2 "
                    f"(residual-block convs mean N {alloc4['blocks']:.1f}, LR upsampler conv tail.0.0 "
                    f"{alloc4['tail.0.0']:.0f}, uniform 2). A plausible reason, consistent with the "
                    "SLSConfig docstring: Adam normalises each score's step, so a 4x larger cost gradient on one "
                    "layer shifts its balance against that layer's task gradient but does not make it move 4x "
                    "faster, and the annealed coef soon dominates every layer alike."
                )
        text += (
            f" Caveat: this x4 dense model had only 600 steps ({dense4['psnr']:.3f} dB, bicubic "
            f"{bicubic4['psnr']:.3f} dB), both 2:32 models are within "
            f"{max(abs(r['psnr'] - bicubic4['psnr']) for r in (row, uniform) if r is not None):.2f} dB of bicubic, "
            + (
                "and the x2 2:32 result shows a 300-step lead can vanish with 600 steps; "
                if "long" in parts
                and (vs_srste["2:32"] or 0)
                > 0
                >= (d("sls_srste", "srste", "2:32", parts["long"]["rows"]) or 0)
                else ""
            )
            + "treat it as one data point."
        )
        lines.append(text)
    verdict = (
        "Verdict: the paper's relation (learned layer-wise N beats uniform N:M at equal MACs, more so at smaller "
        "budgets) "
    )
    if all(v is not None and v > 0 for v in vs_srste.values()):
        verdict += "holds here against SR-STE at every budget."
    else:
        verdict += (
            "does not hold in general at CPU size. "
            + (
                "Its direction shows (SLS minus uniform is larger at 2:32 than at 8:32 in both pairs)"
                if (vs_oneshot["2:32"] or 0) > (vs_oneshot["8:32"] or 0)
                and (vs_srste["2:32"] or 0) > (vs_srste["8:32"] or 0)
                else "Even its direction is not consistent"
            )
            + f"; x2 after 300 steps: {_fmt_db(vs_srste['2:32'])} dB vs SR-STE at 2:32, "
            f"{_fmt_db(vs_oneshot['2:32'])} dB vs one-shot with the paper's training; sls_srste loses to SR-STE at "
            + (", ".join(b for b in BUDGETS if (vs_srste[b] or 0) <= 0) or "no budget")
            + (
                f", and with 600 steps SR-STE catches up at 2:32 ({_fmt_db(d('sls_srste', 'srste', '2:32', parts['long']['rows']))} dB)"
                if "long" in parts
                else ""
            )
            + ". The gap of the published-style SLS to SR-STE in the sr table is mostly weight-training mode; "
            "what is left is (a) no cost heterogeneity to exploit at x2 and (b) the search's own cost in a short run."
        )
    lines.insert(0, verdict)
    return "\n\n".join(lines)


def report(parts: dict[str, Any], wall: dict[str, float], old_rows: list[Row]) -> str:
    x2 = parts["x2"]
    costs = parts["costs"]
    first = x2["rows"]
    dense = next(r for r in first if r["method"] == "dense")
    bicubic = next(r for r in first if r["method"] == "bicubic")
    out = [
        "Protocol: the benchmark harness (docs/ARCHITECTURE.md, section 6): one cached dense model per net, every method fine-tuned "
        "from it for the same steps at lr 1e-4 (batch 16, LR patch 32, L1, lr halved at 2/3), scored on all "
        "built-in test photos (Y PSNR/SSIM, crop = scale); the last checkpoint is scored, nothing is selected "
        "on the test images. SLS settings: `nmrestore.bench.sls.sls_settings` (M = 32, search in the first "
        f"half, lam 0.01, score_lr 0.01, {SLS_ANNEAL_INTERVALS} anneal intervals per search with threshold "
        f"{SLS_RATIO_GROWTH:g}/intervals, refresh every 1/12 of the run). `sls` = the paper's training (hard "
        "gradients; masks refreshed periodically, fixed once N is frozen); `sls_srste` = the same search with "
        "SR-STE gradients and ranks refreshed every step, also after N is frozen (`refresh_after_freeze`), i.e. "
        "SR-STE's training at the learned N. 'prunable MACs %' is the SLS budget (<= N/M); MACs at a 1280x720 "
        "output.",
        "",
        f"### edsr_small x2, 300 fine-tune steps (dense {dense['psnr']:.3f} dB, bicubic {bicubic['psnr']:.3f} dB)",
        "",
        comparison_table(first + old_rows, BUDGETS, (*METHODS, "sls_old_anneal")),
        "",
        "`sls_old_anneal`: the sr benchmark's SLS rows (runs/bench_sr_x2.json), the harness's SLS schedule "
        "before this issue (anneal every 1/24 of the run, threshold 0.2); everything else identical.",
        "",
        "PSNR differences (dB):",
        "",
        delta_table(
            first,
            BUDGETS,
            [("sls", "oneshot"), ("sls_srste", "srste"), ("sls", "srste"), ("srste", "oneshot")],
        ),
        "",
    ]
    if "long" in parts:
        out += [
            "### Longer search: edsr_small x2, 600 fine-tune steps (search 300)",
            "",
            comparison_table(parts["long"]["rows"], ("4:32", "2:32"), ("srste", "sls_srste")),
            "",
        ]
    if "x4" in parts:
        rows4 = parts["x4"]["rows"]
        dense4 = next(r for r in rows4 if r["method"] == "dense")
        out += [
            f"### Heterogeneous MACs per weight: edsr_small x4, 300 fine-tune steps (dense 600 steps, "
            f"{dense4['psnr']:.3f} dB)",
            "",
            comparison_table(rows4, ("2:32",), ("srste", "sls_srste")),
            "",
        ]
        n4 = _find(rows4, "sls_srste", "2:32")
        if n4 is not None:
            per_weight = {c["name"]: c["macs_per_weight"] for c in costs["x4"]}
            out += [
                "N chosen by sls_srste at 2:32 on x4: "
                + ", ".join(
                    f"{layer['name']} {layer['n']}:{layer['m']} ({per_weight.get(layer['name'], 0):,.0f} MACs/weight)"
                    for layer in n4["layers"]
                    if layer["n"] is not None
                ),
                "",
            ]
    out += [
        "### Where a MAC-aware allocation can gain: cost per weight",
        "",
        "Under a MAC budget a layer's N trades MACs for weights at its MACs-per-weight rate (its output "
        "resolution). Every prunable layer of the x2 nets runs at LR resolution, so the MAC budget *is* a "
        "parameter budget there: the MAC share differences (a 1x1 vs a 3x3 conv, the 4x-wide upsampler) change "
        "how much a layer costs, not the price per kept weight. Only x4's second upsampler conv differs.",
        "",
        costs_table(costs),
        "",
        "### Per-layer N at 4:32 (edsr_small x2)",
        "",
        layer_n_table(first, "4:32", costs["x2"]),
        "",
        "### The search on the training batches (edsr_small x2; no test image involved)",
        "",
        "Why the harness's SLS anneal schedule changed: with the paper's constants (threshold 0.2 per interval) "
        "on a 150-step search the anneal rule ran only ~12 times, so it forced a compression-ratio growth of "
        "~2.4 and coef <= 1.2^12; the paper's 100 intervals force 20. Scaled (same total growth over "
        f"{SLS_ANNEAL_INTERVALS} intervals):",
        "",
        search_table(parts["search"]),
        "",
        "### Analysis",
        "",
        analysis(parts, old_rows),
        "",
        "Wall time (this machine, 1 thread, shared with another job): "
        + ", ".join(f"{k} {v / 60:.1f} min" for k, v in wall.items())
        + ". Fine-tune rows are cached by recipe hash; a cached row costs nothing in a rerun.",
    ]
    return "\n".join(out)
