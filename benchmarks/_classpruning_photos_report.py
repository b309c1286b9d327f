"""The ``classpruning-photos`` section: its checks and its rendering, pure functions of the JSON.

Split from ``bench_classpruning_photos.py`` (which measures) so each file stays short; that
script re-exports :func:`render`, which ``_report.render_section`` calls to redraw the section.
"""

from __future__ import annotations

from typing import Any

from _report import markdown_table
from nmrestore.bench.evidence import compare, format_delta

SCALE = 4  # the study's scale (bench_classpruning_photos.SCALE)

MACS_LIMIT = 0.60
PSNR_MARGIN = 0.05
TIME_LIMIT = 0.70
INFER = "ClassPruning spatial, sparse engine (infer --sparse-engine)"
DENSE = "dense PyTorch, whole image"
DENSE = "dense PyTorch, whole image"
TITLE = "ClassPruning on the photo study (x4): whole-image MACs, paired intervals, wall time"


def _find(rows: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method), None)


def _label(row: dict[str, Any]) -> str:
    if row["method"] == "sls":
        return f"SLS at {100 * row['macs_fraction']:.1f}% MACs"
    return f"{row['method']} {row['budget']}" if isinstance(row.get("budget"), str) else row["method"]


def checks(payload: dict[str, Any], psnr_only: bool = False) -> list[tuple[str, bool]]:
    """The issue's claims, each PASS/FAIL from the data (paired 95% intervals over 96x96 HR tiles)."""
    rows = payload["rows"]
    cp, dense = _find(rows, "classpruning"), _find(rows, "dense")
    assert cp is not None and dense is not None
    found: list[tuple[str, bool]] = []
    if not psnr_only:
        found.append(
            (
                f"whole-image MACs {cp['macs_fraction']:.1%} <= {MACS_LIMIT:.0%} of the dense network run once on each "
                f"test photo (tiles on their routes + classifier; per patch, ClassSR's convention: "
                f"{cp['macs_fraction_per_patch']:.1%})",
                cp["macs_fraction"] <= MACS_LIMIT,
            )
        )
    delta = compare(cp, dense)
    found.append(
        (
            f"PSNR within {PSNR_MARGIN} dB of dense: ClassPruning - dense = {format_delta(delta and delta.to_dict())} dB "
            f"(needs the lower end >= -{PSNR_MARGIN}); means {cp['psnr']:.3f} vs {dense['psnr']:.3f}",
            delta is not None and delta.low >= -PSNR_MARGIN,
        )
    )
    for row in rows:
        if row["method"] in ("oneshot", "srste", "sls"):
            d = compare(cp, row)
            found.append(
                (
                    f"above {_label(row)} ({100 * row['macs_fraction']:.1f}% MACs): ClassPruning - it = "
                    f"{format_delta(d and d.to_dict())} dB (needs the interval above 0)",
                    d is not None and d.low > 0,
                )
            )
    if psnr_only:
        return found
    images = cp.get("per_image") or []
    maps = payload.get("class_maps") or []
    found.append(
        (
            f"route histogram and class map of every test photo: {len(images)} histograms, {len(maps)} class maps",
            len(images) == 3 and len(maps) == 3 and all(sum(i["route_histogram"]) > 0 for i in images),
        )
    )
    timed = wall_check(payload.get("wall") or {})
    if timed is not None:
        found.append(timed)
    return found


def wall_check(wall: dict[str, Any]) -> tuple[str, bool] | None:
    """The wall-time claim over every run of the current kernel (None when nothing was timed)."""
    ratio = (wall.get("ratio_to_dense") or {}).get(INFER)
    if ratio is None:
        return None
    h, w = wall["lr_size"]
    ratios = [r["ratio"] for r in same_kernel_runs(wall)] + [ratio]
    runs = f"; every run of this kernel: {', '.join(f'{r:.3f}x' for r in ratios)}" if len(ratios) > 1 else ""
    return (
        f"`infer --sparse-engine` on {wall['photo']} ({w * SCALE}x{h * SCALE} output, {wall['threads']} threads): "
        f"{ratio:.3f}x the wall time of whole-image dense PyTorch (median of {wall['rounds']} interleaved "
        f"per-round ratios{runs}; needs <= {TIME_LIMIT} in every run)",
        max(ratios) <= TIME_LIMIT,
    )


def wall_summary(row: dict[str, Any]) -> dict[str, Any]:
    """One timing run in a line: when, which kernel, dense and ``infer`` seconds, their ratio."""
    return {
        "measured_at": row.get("measured_at"),
        "kernel": row.get("kernel"),
        "kernel_code": row.get("kernel_code"),
        "dense_s": row["median_s"][DENSE],
        "infer_s": row["median_s"][INFER],
        "ratio": row["ratio_to_dense"][INFER],
    }


def same_kernel_runs(wall: dict[str, Any]) -> list[dict[str, Any]]:
    """The earlier timing runs of the kernel code the latest run used (a re-timing adds a run, never
    replaces one). Runs match by the digest of the kernel sources without comments (``kernel_code``),
    so editing a comment does not start a new group; runs recorded without it match by library name."""

    def same(run: dict[str, Any]) -> bool:
        if run.get("kernel_code") and wall.get("kernel_code"):
            return bool(run["kernel_code"] == wall["kernel_code"])
        return bool(run.get("kernel") == wall.get("kernel"))

    return [r for r in wall.get("earlier_runs", []) if same(r)]


def _heldout_macs(row: dict[str, Any]) -> str:
    """MACs % on the held-out training strips the cost shift was calibrated on."""
    heldout = (row.get("training") or {}).get("heldout") or {}
    return _f(100 * heldout["macs_fraction"], ".1f") if "macs_fraction" in heldout else "-"


def _f(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_markdown(payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of the ``classpruning-photos`` section: a pure function of the JSON payload."""
    rows, cp = payload["rows"], _find(payload["rows"], "classpruning")
    assert cp is not None
    settings, static = payload["settings"], payload["static"]
    cost = cp["pipeline_cost"]
    lines = [
        f"**Whole-image MACs: {cp['macs_fraction']:.1%} of the dense network** run once on each test photo "
        f"({cp['macs_g']:.2f} G at a 1280x720 output): every {cp['tile']}x{cp['tile']} LR tile on its route "
        f"({cp['mode']} inference: one whole-image pass, each routed layer computing every tile on its route, "
        f"overlap x{cost['overlap']:.3f}) plus the classifier on every tile "
        f"({100 * cost['classifier_macs'] / cost['whole_image_dense_macs']:.3f}%). Per patch (ClassSR's convention, "
        f"which leaves out overlap and stitching): {cp['macs_fraction_per_patch']:.1%}.",
        "",
        (
            "--quick smoke test (a few steps each, top-left crops of the test photos: the figures say nothing "
            "about the method). A 20-step stand-in for the photo study's dense x4 model "
            if payload.get("quick")
            else "The photo study's dense x4 model "
        )
        + f"(edsr_baseline, 8 blocks, global bicubic skip; cache "
        f"{payload['dense_digest']}), ClassPruning fine-tuned from it on the train split: routes "
        f"{cp['routes']} over one weight tensor, {cp['note']}; labels: least summed error at "
        f"{settings['target_macs_fraction']:.0%} MACs with each patch's error weighted by its own dB "
        f"(`budget_weights: {settings['budget_weights']}`); cost shift calibrated on held-out strips of the "
        f"training photos. Scored on the 3 test photos (Y PSNR, crop 4); 'vs dense' and 'ClassPruning - row' "
        f"are paired 95% bootstrap intervals over the same {payload['config']['ci_tile']}x"
        f"{payload['config']['ci_tile']} HR tiles as docs/bench/photos_x4.json. Static baselines at "
        f"ClassPruning's whole-image MACs: one-shot and SR-STE at {static['n']}:32 (the smallest N:32 with at "
        f"least as many MACs, {static['uniform_fraction']:.1%}), SLS searched at "
        f"{static['sls_prunable_budget']:.4f} of the prunable MACs (= {static['target_fraction']:.1%} of the "
        f"whole network), each fine-tuned {payload['config']['finetune_steps']} steps.",
        "",
    ]
    table = []
    for row in rows:
        d = compare(cp, row) if row is not cp else None
        table.append(
            {
                "method": row["method"],
                "budget": "-" if row["method"] in ("bicubic", "dense") else str(row["budget"]),
                "PSNR": _f(row["psnr"], ".3f"),
                "SSIM": _f(row.get("ssim"), ".4f"),
                "whole-image MACs %": _f(100 * row["macs_fraction"], ".2f")
                if row["method"] != "bicubic"
                else "-",
                "GMACs @720p": _f(row.get("macs_g"), ".2f"),
                "vs dense [95% CI]": format_delta(row.get("vs_dense")),
                "ClassPruning - row [95% CI]": format_delta(d.to_dict()) if d is not None else "-",
            }
        )
    lines += [markdown_table(table, list(table[0])), ""]
    per_image = [
        {
            "photo": e["name"],
            "PSNR": f"{e['psnr']:.3f}",
            "tiles per route": "/".join(map(str, e["route_histogram"])),
            "whole-image MACs %": f"{100 * e['macs_fraction']:.2f}",
            "per patch %": f"{100 * e['macs_fraction_per_patch']:.2f}",
        }
        for e in cp["per_image"]
    ]
    total = sum(cp["route_histogram"]) or 1
    lines += [
        "Route histogram (tiles per route, all test photos): "
        + ", ".join(
            f"route {k} ({n}): {c} ({c / total:.0%}, {f:.1%} MACs each)"
            for k, (n, c, f) in enumerate(
                zip(
                    cp["routes"].split(":")[0].split("/"),
                    cp["route_histogram"],
                    cp["route_fractions"],
                    strict=True,
                )
            )
        )
        + ". Per test photo:",
        "",
        markdown_table(per_image, list(per_image[0])),
        "",
    ]
    for bound in payload.get("bounds", []):
        own = bound["routes"] == "own"
        lines += [
            (
                "Routing bound of ClassPruning's own routes"
                if own
                else "Routing bound of independently trained routes"
            )
            + f" at its whole-image MACs: every route run on the whole photo, each {cp['tile']}-pixel tile taken "
            "from the route a perfect router picks (no classifier), by the error each cheaper route adds to the "
            "full route's output (no ground truth) or by the ground truth (an oracle; it also exploits the "
            "photos' noise)"
            + (
                "."
                if own
                else "; the routes are SR-STE at each route's N (the dense model fine-tuned where N = 32), "
                "each fine-tuned for the same steps."
            ),
            "",
        ]
        bound_rows = []
        for r in bound["rows"]:
            d = compare(r, cp)
            bound_rows.append(
                {
                    "routing": r["routing"],
                    "PSNR": f"{r['psnr']:.3f}",
                    "whole-image MACs %": f"{100 * r['macs_fraction']:.2f}",
                    "tiles per route": "/".join(map(str, r["route_histogram"])),
                    "it - ClassPruning [95% CI]": format_delta(d.to_dict()) if d is not None else "-",
                    "vs dense": format_delta(
                        compare(r, _find(rows, "dense")).to_dict()
                        if compare(r, _find(rows, "dense"))
                        else None
                    ),
                }
            )
        lines += [markdown_table(bound_rows, list(bound_rows[0])), ""]
    earlier = payload.get("earlier") or []
    if earlier:
        lines += [
            "Settings run before these on the same test photos (all reported: the routes above were chosen "
            "after seeing these rows, so the test photos informed that choice):",
            "",
            markdown_table(
                [
                    {
                        "routes": r["routes"],
                        "MAC target": f"{r['settings']['target_macs_fraction']:.0%}",
                        "PSNR": f"{r['psnr']:.3f}",
                        "whole-image MACs %": f"{100 * r['macs_fraction']:.2f}",
                        "tiles per route": "/".join(map(str, r["route_histogram"])),
                        "vs dense [95% CI]": format_delta(r.get("vs_dense")),
                        "held-out strips: MACs %": _heldout_macs(r),
                    }
                    for r in earlier
                ],
                ["routes", "MAC target", "PSNR", "whole-image MACs %", "tiles per route", "vs dense [95% CI]",
                 "held-out strips: MACs %"],
            ),
            "",
        ]
    wall = payload.get("wall")
    if wall:
        h, w = wall["lr_size"]
        pixels = wall.get("route_pixels") or []
        share = [p / sum(pixels) for p in pixels] if pixels and sum(pixels) else []
        alone = [
            wall["ratio_to_dense"].get(f"route {k} alone, whole image, sparse engine")
            for k in range(len(share))
        ]
        mix = sum(s * a for s, a in zip(share, alone, strict=True)) if share and None not in alone else None
        lines += [
            f"Wall time on {wall['photo']} ({w}x{h} LR, {w * SCALE}x{h * SCALE} output), {wall['threads']} threads, "
            f"one process, {wall['rounds']} interleaved rounds after a warm-up (runtime/timing.py); ratio = median "
            f"of the per-round ratios to whole-image dense PyTorch. Tiles per route on this photo: "
            f"{'/'.join(map(str, wall['route_histogram']))}; engine kernel {wall.get('kernel') or 'unavailable'}, "
            f"tactics {wall['tactics']['sparse']} sparse / {wall['tactics']['dense']} dense; largest difference "
            f"between the engine's and PyTorch's output {wall['max_abs_diff_engine_vs_pytorch']:.1e}.",
            "",
            markdown_table(
                [
                    {
                        "run": k,
                        "median s": f"{wall['median_s'][k]:.3f}",
                        "x dense": f"{wall['ratio_to_dense'][k]:.3f}",
                        "first call s": f"{wall['first_call_s'][k]:.1f}",
                    }
                    for k in wall["median_s"]
                ],
                ["run", "median s", "x dense", "first call s"],
            ),
            "",
        ]
        earlier = wall.get("earlier_runs") or []
        if earlier:
            latest = wall_summary(wall)
            lines += [
                "Every timing run of this check (idle machine; the table above is the latest; the check "
                "needs every run of the current kernel code, its sources without comments, at or under the limit):",
                "",
                markdown_table(
                    [
                        {
                            "measured": r.get("measured_at") or "-",
                            "kernel": r.get("kernel") or "-",
                            "kernel code": r.get("kernel_code") or "-",
                            "dense s": f"{r['dense_s']:.3f}",
                            "infer --sparse-engine s": f"{r['infer_s']:.3f}",
                            "x dense": f"{r['ratio']:.3f}",
                            "note": r.get("note") or "",
                        }
                        for r in [*earlier, latest]
                    ],
                    ["measured", "kernel", "kernel code", "dense s", "infer --sparse-engine s", "x dense", "note"],
                ),
                "",
            ]
        if mix is not None:
            lines += [
                f"The routes alone at this photo's route mix would take {mix:.3f}x dense: the rest of the spatial "
                f"pipeline's {wall['ratio_to_dense'][INFER]:.3f}x is its own cost (classifier, tile gathers and "
                "scatters, smaller convolutions). 'first call' includes the engine's one-time tactic timing per "
                "layer and tile shape (kept in memory; `EngineConfig.cache_file` keeps it across processes).",
                "",
            ]
    lines += ["Checks:", "", *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks(payload)], ""]
    if payload.get("notes"):
        lines += ["Notes:", "", *[f"- {n}" for n in payload["notes"]], ""]
    lines += [f"![class map]({name})" for name in payload.get("class_maps", [])]
    return TITLE, "\n".join(lines)


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of section ``key``, from its JSON payload alone."""
    return render_markdown(payload)
