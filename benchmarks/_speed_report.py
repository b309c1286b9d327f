"""The ``speed``, ``speed_profile``, ``speed_roofline`` and ``speed_quality`` sections, pure functions of their JSON.

Split from ``bench_speed.py`` (which measures; it re-exports :func:`render`, which
``_report.render_section`` calls for all four keys) so each file stays short.
"""

from __future__ import annotations

from typing import Any

from _report import markdown_table
from _roofline import machine_note

TITLE = "Speed: N:M sparse inference on the CPU"


def ratio_text(rows: list[dict[str, object]]) -> str:
    """The ratio table: speed-ups > 1 mean the engine is faster."""
    if not rows:
        return ""
    cols = list(dict.fromkeys(k for row in rows for k in row))
    return (
        "\n**Engines against dense PyTorch and the peers** (speed-up = median over rounds of t_other / t_engine):\n\n"
        + (markdown_table(rows, cols) + "\n")
    )


UNIFORM_COLUMNS = ["model", "N:M", "dense ms", "sparse ms", "speed-up", "layers on kernel", "max abs diff"]
PROFILE_COLUMNS = ["part", "dense ms", "4:32 engine ms", "2:32 engine ms"]
FP16_PROFILE_COLUMNS = ["4:32 engine fp16 ms", "2:32 engine fp16 ms"]
PEER_COLUMNS = [
    "model",
    "N:M",
    "runtime",
    "precision",
    "ms",
    "vs PyTorch",
    "sparse engine vs it",
    "max abs diff",
]


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """Section "speed" from the saved timings (``docs/bench/speed.json``)."""
    if key == "speed_profile":
        return render_profile(key, payload)
    if key == "speed_roofline":
        return render_roofline(key, payload)
    if key == "speed_quality":
        return render_quality(key, payload)
    cp, sls = payload["classpruning"], payload["sls"]
    cp_table = markdown_table(
        [
            {"run": "dense model, whole image", "ms": cp["whole_ms"], "vs whole-image dense": 1.0},
            {
                "run": "patch pipeline, PyTorch",
                "ms": cp["plain_ms"],
                "vs whole-image dense": cp["whole_ms"] / cp["plain_ms"],
            },
            {
                "run": "patch pipeline, sparse engine",
                "ms": cp["engine_ms"],
                "vs whole-image dense": cp["whole_ms"] / cp["engine_ms"],
            },
        ],
        ["run", "ms", "vs whole-image dense"],
    )
    peers_text = ratio_text(payload["ratio_rows"]) if payload.get("precision") in ("both", "all") else ""
    if payload["peer_rows"]:
        peers_text += (
            "\n**Against the runtimes a user would deploy with** (same model, input, threads and interleaved\n"
            "rounds; the peers run the dense-with-zeros ONNX export; speed-ups are medians of per-round ratios;\n"
            f"max abs diff against PyTorch f32 on the same input; {payload['cpu_features']}):\n\n"
            + markdown_table(payload["peer_rows"], PEER_COLUMNS)
            + "".join(f"\n\nNote: {note}" for note in payload["peer_notes"])
            + "\n"
        )
    if sls.get("given"):
        sls_text = (
            f"SLS row: {sls['given']} (checkpoint {sls['checkpoint']}), timed as `nmrestore speed --checkpoint C`"
            f"{' --vs ...' if payload['peer_rows'] else ''}. Learned: {sls['fraction']:.1%} of the prunable MACs; "
            f"{sls['layers']}."
        )
    else:
        sls_text = (
            f"SLS row: a real SLS search (method `sls`, M = 32, budget {sls['budget']:g} of the prunable MACs, "
            f"{sls['steps']} steps from scratch on the built-in photos, 1 thread; checkpoint {sls['checkpoint']}), "
            f"timed as `nmrestore speed edsr_baseline --scale 2 --checkpoint C`. Learned: {sls['fraction']:.1%} of "
            f"the prunable MACs; {sls['layers']}."
        )
    route_layers = ", ".join(f"route {route}: {choices}" for route, choices in cp["route_layers"].items())
    h, w = payload["size"]
    settle = payload.get("settle_s")
    settle_text = (
        f" (with the runtimes: {1e3 * settle:.0f} ms untimed pause before every call, because ONNX Runtime's "
        "threads spin after a run and slow whatever runs next)"
        if settle
        else ""
    )
    machine = machine_note(payload)
    machine_text = machine + "\n" if machine else ""
    body = f"""
Input {w}x{h} LR, {payload["threads"]} threads, {payload["warmup"]} warm-up forwards then {payload["repeats"]} interleaved rounds per model
in one process{settle_text}; speed-up = median of the per-round dense/sparse ratios, ms = medians;
{payload["kernel"]}. Wall time of the whole benchmark: {payload["wall_s"]:.0f} s.
{machine_text}The dense reference is PyTorch's own CPU conv (oneDNN) on the squashed model; "layers on kernel" counts
the layer/route/shape choices that went to the sparse kernel (the rest stayed dense because dense timed
faster); "max abs diff" is between the two models' outputs.

{markdown_table(payload["rows"], UNIFORM_COLUMNS)}
{peers_text}
{sls_text}

**Where the time goes** (EDSR-baseline x2, one forward, median per module over {payload["repeats"]} runs;
module hooks add a little overhead, so parts do not add up exactly to the end-to-end figures above):

{markdown_table(payload["profile"], PROFILE_COLUMNS)}

**ClassPruning** (EDSR-baseline x2, routes 8/16/32 of 32, untrained classifier calibrated to
{cp["macs_fraction"]:.0%} of the patches' dense MACs, route histogram {cp["histogram"]}, patches 32/28,
batch 64): route layers on the kernel ({route_layers}; sparse/all choices); max abs diff
between the two pipelines {cp["diff"]:.1e}.

{cp_table}
"""
    return TITLE, body


def render_profile(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """Section "speed_profile" from the saved timings (``docs/bench/speed_profile.json``)."""
    h, w = payload["size"]
    body = f"""
Where the time goes in EDSR-baseline x2 (magnitude masks on a fresh model), input {w}x{h} LR,
{payload["threads"]} threads; median per module over {payload["repeats"]} forwards of each model (run one after the
other, not interleaved; module hooks add a little overhead). Residual blocks are timed whole
(2 convs, ReLU, skip sum), fused by the engine or not. {payload["kernel"]}. Wall time {payload["wall_s"]:.0f} s.

{markdown_table(payload["profile"], PROFILE_COLUMNS + [c for c in FP16_PROFILE_COLUMNS if any(c in r for r in payload["profile"])])}
"""
    return "Speed: where the time goes (EDSR-baseline x2)", body


def below_quiet(payload: dict[str, Any]) -> str:
    """A sentence when this roofline run measured ceilings below the quiet reference it carries."""
    quiet, own = payload.get("quiet_ceilings") or {}, payload["ceilings"]
    low = [k for k in ("gemm_f32_gmacs", "gemm_bf16_gmacs", "copy_gbs") if k in quiet and own[k] < quiet[k]]
    if not low:
        return ""
    return (
        " This run's ceilings are below the highest this machine has reached in the section's runs (f32 GEMM "
        f"{quiet['gemm_f32_gmacs']:.0f}, bf16 GEMM {quiet['gemm_bf16_gmacs']:.0f} GMAC/s, copy "
        f"{quiet['copy_gbs']:.1f} GB/s), which stay the quiet machine's reference that timed sections are "
        "held to; the roof columns use this run's own ceilings."
    )


def render_roofline(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """Section "speed_roofline" from the saved measurements (``docs/bench/speed_roofline.json``)."""
    ceilings, threads, repeats, kernel = (
        payload["ceilings"],
        payload["threads"],
        payload["repeats"],
        payload["kernel"],
    )
    h, w = payload["size"]
    body = f"""
Empirical ceilings ({threads} threads, medians of {repeats} interleaved rounds): copy of a 64 MB f32 tensor
{ceilings["copy_gbs"]:.1f} GB/s (read + write), dense 2048^3 GEMM {ceilings["gemm_f32_gmacs"]:.0f} GMAC/s in f32 and
{ceilings["gemm_bf16_gmacs"]:.0f} GMAC/s in bf16. EDSR-baseline x2, input {w}x{h} LR, magnitude masks on a fresh model;
"ms" = median per part over {repeats} forwards of each model (run one after the other, module hooks add a
little); "roof" = max(MACs / GEMM rate, bytes / copy bandwidth) with MACs x N/M on pruned convs and 4 (f32) or
2 (bf16) bytes per activation value read or written; sparse kernels (f32 or bf16) get the f32 GEMM rate
(benchmarks/_roofline.py). {kernel}.
Wall time {payload["wall_s"]:.0f} s.{below_quiet(payload)}

{markdown_table(payload["rows"], payload["columns"])}
"""
    return "Speed: measured against a roofline (EDSR-baseline x2)", body


QUALITY_MARGIN = 0.02  # dB: a 16-bit engine's PSNR against the f32 engine's, on the photo test set


def quality_checks(payload: dict[str, Any]) -> list[tuple[str, bool]]:
    """Per checkpoint and 16-bit variant: its mean PSNR within QUALITY_MARGIN of the f32 engine's."""
    found = []
    for row in payload["rows"]:
        psnr = row["psnr"]
        base = psnr["f32 engine"]
        for label, values in psnr.items():
            if label == "f32 engine":
                continue
            diffs = [a - b for a, b in zip(values, base, strict=True)]
            mean = sum(values) / len(values) - sum(base) / len(base)
            found.append(
                (
                    f"{row['checkpoint']} (x{row['scale']}), {label}: mean PSNR - f32 engine = {mean:+.4f} dB "
                    f"(worst image {min(diffs):+.4f}; needs |mean| <= {QUALITY_MARGIN})",
                    abs(mean) <= QUALITY_MARGIN,
                )
            )
    return found


def render_quality(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """Section "speed_quality": what the 16-bit engines cost in PSNR (``docs/bench/speed_quality.json``)."""
    table = []
    for row in payload["rows"]:
        means = {label: sum(v) / len(v) for label, v in row["psnr"].items()}
        table.append(
            {
                "checkpoint": row["checkpoint"],
                "x": row["scale"],
                **{f"{label} dB": f"{m:.4f}" for label, m in means.items()},
                **{
                    f"{label} - f32": f"{m - means['f32 engine']:+.4f}"
                    for label, m in means.items()
                    if label != "f32 engine"
                },
            }
        )
    cols = list(dict.fromkeys(k for r in table for k in r))
    checks = quality_checks(payload)
    fp16_text = (
        ", and the fp16 engine with every conv forced onto its fp16 sparse kernel (AVX512-FP16; fp16 sums)"
        if any(FP16_VARIANT in row["psnr"] for row in payload["rows"])
        else ""
    )
    settled = (
        " Each image runs twice and its second output is scored: an engine settles its 16-bit hand-off chains "
        "and fused AMX residual blocks once the first forward of a shape has decided its tactics."
        if payload.get("settled")
        else " Each image's first forward is scored (the one that decides its shape's tactics, before the "
        "16-bit hand-off chains settle)."
    )
    body = f"""
Each checkpoint of the photo study run on the {payload["split"]} photos of `{payload["photos"]}`
({payload["threads"]} thread{"s" if payload["threads"] != 1 else ""}): the f32 engine, the bf16 engine with every conv forced onto its bf16
sparse kernel (first/last convs: PyTorch's bf16 conv), the bf16 engine forced dense (every conv
PyTorch's oneDNN bf16 conv){fp16_text}. Forcing the tactics makes the rows independent of timing noise; an `auto`
16-bit engine mixes them, so its PSNR lies between them.{settled} Y PSNR, crop = scale, mean over the images
(benchmarks/_quality.py). {payload["kernel"]}. Wall time {payload["wall_s"]:.0f} s.

{markdown_table(table, cols)}

Checks:

""" + "\n".join(f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks) + "\n"
    return f"Speed: what bf16{' and fp16' if fp16_text else ''} cost{'' if fp16_text else 's'} in PSNR (photo test set)", body


#: The fp16 row of the quality section (benchmarks/_quality.py).
FP16_VARIANT = "fp16 engine, sparse kernels"
