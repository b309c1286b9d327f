"""What the speed targets against the deployment runtimes ask of the sparse kernel, in MACs per second.

Derived, not measured: it reads the committed JSON of two measured sections, `speed` (the engines
and the runtimes on EDSR-baseline x2, interleaved in one run) and `speed_roofline` (each part's dense
MACs and the machine's GEMM ceilings), and writes its own JSON with the figures it used and the
dates they were measured. For each target it gives the engine time the target allows and the rate
at which the engine would then have to run its kept multiply-adds (N/M of the pruned convs' MACs
plus the dense first and last convs), against the rate it runs them at now and against the ceilings:
per-channel N:M masks run on the vector units (f32 FMA, or bf16 `vdpbf16ps`, which is no faster per
MAC on this CPU), whose ceiling is the f32 GEMM rate, or, for the fp16 kernel, AVX512-FP16's
`vfmadd231ph` (32 MACs per instruction where f32 FMA does 16, at the same rate: twice that ceiling,
derived from the instruction's width, not measured); only dense tiles reach the AMX (bf16 GEMM) rate.
It also gives each target's roofline: the time one forward needs at those ceilings when every conv
reads its input and writes its output once (the bytes `speed_roofline` counts, at 4 bytes per
value for the f32 engine and 2 for the bf16 and fp16 ones), so 'roofline / allowed' is the share of its
roofline the engine must reach as a whole. For the bf16 targets it gives the same with the pruned
convs on AMX (masks shared by blocks of output channels, section `coarse`), and how close
OpenVINO's default comes to the dense model's own bf16 roofline.

    .venv/bin/python benchmarks/bench_speed_targets.py            # derive from the two sections, write
    .venv/bin/python benchmarks/bench_speed_targets.py --render   # the section from its JSON
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import load_results, markdown_table, results_path, section_main  # noqa: E402
from _roofline import quiet_ceilings, slowed  # noqa: E402

SECTION = "speed_targets"
TITLE = "Speed targets against the deployment runtimes: the kept-MAC rate each one asks for"
MODEL = "edsr_baseline x2"
#: (engine, runtime, N:M, wanted speed-up of the engine over the runtime); "best dense" is the
#: fastest runtime row of the same N:M (dense: it runs the dense-with-zeros export)
TARGETS = (
    ("engine f32", "openvino f32", "4:32", 2.0),
    ("engine f32", "openvino f32", "2:32", 3.0),
    ("engine bf16", "openvino default", "4:32", 1.3),
    ("engine bf16", "openvino default", "2:32", 2.0),
    ("engine f32", "best dense", "2:4", 1.0),
    ("engine bf16", "best dense", "2:4", 1.0),
    ("engine fp16", "openvino default", "4:32", 1.3),
    ("engine fp16", "openvino default", "2:32", 2.0),
    ("engine fp16", "best dense", "2:4", 1.0),
)
#: The 16-bit engines (activations 2 bytes a value; dense convs on AMX).
HALF = ("engine bf16", "engine fp16")


def vector_ceiling(engine: str, f32_gemm: float) -> float:
    """The kernel's vector ceiling: the f32 GEMM rate, doubled for the fp16 kernel (32 lanes an FMA)."""
    return 2 * f32_gemm if engine == "engine fp16" else f32_gemm
RUNTIMES = ("onnxruntime", "openvino f32", "openvino default")
#: parts of the roofline table whose convs are pruned (the rest, the first and last conv, stay dense)
PRUNED_PARTS = ("16 residual blocks", "body.16", "tail.0.0")
DENSE_PARTS = ("head.0", "tail.1")
COLUMNS = [
    "target", "speed-up now", "runtime ms", "engine ms now", "engine ms allowed", "kept GMAC",
    "kept GMAC/s now", "kept GMAC/s needed", "needed / vector ceiling", "needed / AMX ceiling",
    "roofline ms", "roofline / allowed", "roofline / now", "coarse (AMX) roofline ms", "coarse roofline / allowed",
]  # fmt: skip


def kept_gmac(parts: dict[str, float], nm: str) -> float:
    """MACs (G) one forward runs at ``nm``: N/M of the pruned parts' MACs plus the dense parts'."""
    n, m = (int(v) for v in nm.split(":"))
    pruned = sum(v for k, v in parts.items() if k.startswith(PRUNED_PARTS))
    dense = sum(v for k, v in parts.items() if k.startswith(DENSE_PARTS))
    return pruned * n / m + dense


def roofline_ms(
    parts: dict[str, tuple[float, float]],
    nm: str,
    bf16: bool,
    ceilings: dict[str, float],
    coarse: bool = False,
    vector_scale: float = 1.0,
) -> float:
    """One forward's roofline at ``nm``: per part, compute or memory, whichever is slower, summed.

    ``parts``: per part (dense GMAC, MB moved at f32). Pruned convs run N/M of their MACs on the
    vector units, at ``vector_scale`` times the f32 GEMM rate (2 for fp16; ``coarse``, 16-bit only:
    on AMX, as block-shared masks would); the dense first and last convs run on AMX in 16 bits
    (``bf16``), on the vector units in f32; activations cost 2 bytes a value in 16 bits, 4 in f32."""
    n, m = (int(v) for v in nm.split(":"))
    total = 0.0
    for name, (gmac, mb) in parts.items():
        pruned = name.startswith(PRUNED_PARTS)
        if not pruned and not name.startswith(DENSE_PARTS):
            continue
        on_amx = bf16 and (coarse or not pruned)
        rate = ceilings["gemm_bf16_gmacs"] if on_amx else ceilings["gemm_f32_gmacs"] * vector_scale
        macs = gmac * n / m if pruned else gmac
        total += max(macs / rate, mb * (0.5 if bf16 else 1.0) / ceilings["copy_gbs"] / 1e3) * 1e3
    return total


def prototype_rows() -> dict[str, Any]:
    """Section `coarse`'s whole-model rows (the AMX prototype with block-shared masks against
    OpenVINO's default, interleaved), with the run's date and whether it ran slowed; {} without them."""
    if not results_path("coarse").is_file():
        return {}
    coarse = load_results("coarse")
    rows = {r["N:M"]: {"ms": r["coarse model ms"], "runtime_ms": r["openvino default ms"],
                       "speedup": r["coarse vs openvino default"]} for r in coarse.get("model_speed") or []}  # fmt: skip
    if not rows:
        return {}
    state = (coarse.get("machine_before"), coarse.get("machine_after"), coarse.get("quiet_ceilings"))
    notes = slowed(*state) if state[0] and state[1] else []  # type: ignore[arg-type]
    return {"date": coarse["date"], "slowed": notes, "rows": rows}


def derive() -> dict[str, Any]:
    speed, roof = load_results("speed"), load_results("speed_roofline")
    # what the machine can do, not what a slowed roofline run measured
    ceilings = quiet_ceilings() or roof["ceilings"]
    parts = {r["part"]: float(r["dense GMAC"]) for r in roof["rows"] if r.get("dense GMAC") is not None}
    moved = {r["part"]: (float(r["dense GMAC"]), float(r["MB moved (f32)"])) for r in roof["rows"]
             if r.get("dense GMAC") is not None}  # fmt: skip
    rows = []
    for engine, runtime, nm, wanted in TARGETS:
        ratio_row = next(r for r in speed["ratio_rows"] if r["model"] == MODEL and r["N:M"] == nm)
        if f"{engine} ms" not in ratio_row:
            continue  # a speed run without that engine
        if runtime == "best dense":
            runtime = min(RUNTIMES, key=lambda name: ratio_row[f"{name} ms"])
        rows.append(
            {
                "engine": engine,
                "runtime": runtime,
                "nm": nm,
                "wanted": wanted,
                "runtime_ms": ratio_row[f"{runtime} ms"],
                "engine_ms": ratio_row[f"{engine} ms"],
                "speedup_now": ratio_row[f"{engine} vs {runtime}"],
                "kept_gmac": kept_gmac(parts, nm),
                "roofline_ms": roofline_ms(
                    moved, nm, engine in HALF, ceilings, vector_scale=vector_ceiling(engine, 1.0)
                ),
                # the runtime's own roofline: the dense model, on AMX at its default precision
                "runtime_roofline_ms": roofline_ms(
                    moved, "1:1", runtime == "openvino default", ceilings, coarse=True
                ),
                "coarse_roofline_ms": (
                    roofline_ms(moved, nm, True, ceilings, coarse=True) if engine in HALF else None
                ),
            }
        )
    return {
        "model": MODEL,
        "sources": {
            "speed": {"date": speed["date"], "command": speed["command"]},
            "speed_roofline": {"date": roof["date"], "command": roof["command"]},
        },
        "ceilings": ceilings,
        "rows": rows,
        "prototype": prototype_rows(),
    }


def _rates(r: dict[str, Any]) -> tuple[float, float]:
    """(kept GMAC/s the target needs, kept GMAC/s now)."""
    return r["kept_gmac"] / (r["runtime_ms"] / r["wanted"]) * 1e3, r["kept_gmac"] / r["engine_ms"] * 1e3


def _prototype_reading(rows: list[dict[str, Any]], prototype: dict[str, Any]) -> str:
    """What the AMX prototype measured against the bf16 targets (empty without its rows)."""
    wanted = {r["nm"]: r for r in rows if r["engine"] in HALF and r["runtime"] == "openvino default"}
    found = [(nm, p, wanted[nm]) for nm, p in prototype.get("rows", {}).items() if nm in wanted]
    if not found:
        return ""
    text = (
        f" Measured rather than bounded: section `coarse` (run {prototype['date']}) runs the whole model with "
        "block-shared masks on its AMX prototype, bf16 hand-offs and fused epilogues included, against "
        "OpenVINO's default in the same rounds: "
        + "; ".join(
            f"{p['ms']:.1f} ms at {nm}, {p['speedup']:.2f}x (the target is {r['wanted']:g}x)"
            + (f", {r['coarse_roofline_ms'] / p['ms']:.0%} of its roofline" if r.get("coarse_roofline_ms") else "")
            for nm, p, r in found
        )
        + "."
    )
    if prototype.get("slowed"):
        text += f" That run was timed on a slowed machine ({'; '.join(prototype['slowed'])})."
    return text


def _reading(rows: list[dict[str, Any]], vector: float) -> str:
    """What the table says, in figures drawn from it."""
    f32 = [r for r in rows if r["engine"] == "engine f32" and r["runtime"] == "openvino f32"]
    amx = [r for r in rows if r not in f32]
    text = ""
    if f32:
        shares = [_rates(r)[0] / vector for r in f32]
        gains = [_rates(r)[0] / _rates(r)[1] for r in f32]
        asked = f"The targets against OpenVINO f32 ask for {min(shares):.0%}-{max(shares):.0%} of the vector ceiling, "
        if max(gains) <= 1:
            text += asked + f"{min(gains):.2f}-{max(gains):.2f}x the rate the f32 kernel reaches now, which meets them. "
        else:
            text += asked + (
                f"{min(gains):.2f}-{max(gains):.2f}x the rate the f32 kernel reaches now: a matter of the kernel's "
                "schedule (section `kernel_limits` measures where its time at low density goes). "
            )
    if amx:
        text += (
            "The targets against OpenVINO's default precision, whose dense convs run on AMX, ask for "
            + ", ".join(
                f"{_rates(r)[0] / vector_ceiling(r['engine'], vector):.0%} ({r['engine']}, {r['nm']}; now "
                f"{_rates(r)[1] / vector_ceiling(r['engine'], vector):.0%})"
                for r in amx
            )
            + " of that engine's vector ceiling: past 100% no per-channel N:M kernel can meet them on this CPU, "
            "and near it only one whose scattered loads cost nothing. "
        )
        fp16 = [r for r in amx if r["engine"] == "engine fp16" and r["wanted"] > 1]
        if fp16:
            text += (
                "The fp16 kernel's ceiling is twice the f32 one, so for it the "
                + " and ".join(r["nm"] for r in fp16)
                + " targets ask "
                + " and ".join(f"{_rates(r)[0] / (2 * vector):.0%}" for r in fp16)
                + " of its ceiling, where the fp16 engine runs at "
                + " and ".join(f"{_rates(r)[1] / (2 * vector):.0%}" for r in fp16)
                + " now: the ceilings do not rule them out; the kernel's schedule and its activation traffic "
                "(the roofline shares below) stand between. "
            )
        text += (
            "Otherwise meeting them takes AMX, that is dense tiles: masks shared by blocks of output channels "
            "(section `coarse`; the bf16 engine runs such layers on AMX, section `speed_dense_runtime`'s "
            "coarse rows), or a dense fallback for the whole model that is the fastest dense runtime itself. "
        )
    text += (
        "As a whole forward, each target asks the engine to run at a share of its roofline (compute and "
        "activation traffic at the ceilings): "
        + ", ".join(
            f"{r['roofline_ms'] / (r['runtime_ms'] / r['wanted']):.0%} ({r['engine']}, {r['nm']}; now "
            f"{r['roofline_ms'] / r['engine_ms']:.0%})"
            for r in rows
        )
        + "."
    )
    coarse = [r for r in rows if r.get("coarse_roofline_ms")]
    if coarse:
        text += (
            " With masks shared by blocks of output channels (section `coarse`) the pruned convs run on AMX "
            "too (the bf16 engine's AMX path), and the 16-bit targets ask for "
            + ", ".join(
                f"{r['coarse_roofline_ms'] / (r['runtime_ms'] / r['wanted']):.0%} ({r['nm']})"
                for r in coarse
                if r["engine"] == "engine bf16"
            )
            + " of that roofline, which activation traffic, not multiply-adds, then sets. OpenVINO's default "
            "runs the dense model at "
            + ", ".join(
                f"{r['runtime_roofline_ms'] / r['runtime_ms']:.0%} ({r['nm']})" for r in coarse
                if r.get("runtime_roofline_ms") and r["engine"] == "engine bf16"
            )
            + " of the dense model's bf16 roofline."
        )
    return text


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    vector = payload["ceilings"]["gemm_f32_gmacs"]
    amx = payload["ceilings"]["gemm_bf16_gmacs"]
    table = []
    for r in payload["rows"]:
        allowed_ms = r["runtime_ms"] / r["wanted"]
        need, now = _rates(r)
        table.append(
            {
                "target": f"{r['engine']} >= {r['wanted']:g}x {r['runtime']} at {r['nm']}",
                "speed-up now": f"{r['speedup_now']:.2f}",
                "runtime ms": f"{r['runtime_ms']:.1f}",
                "engine ms now": f"{r['engine_ms']:.1f}",
                "engine ms allowed": f"{allowed_ms:.1f}",
                "kept GMAC": f"{r['kept_gmac']:.2f}",
                "kept GMAC/s now": f"{now:.0f}",
                "kept GMAC/s needed": f"{need:.0f}",
                "needed / vector ceiling": f"{need / vector_ceiling(r['engine'], vector):.0%}",
                "needed / AMX ceiling": f"{need / amx:.0%}",
                "roofline ms": f"{r['roofline_ms']:.1f}",
                "roofline / allowed": f"{r['roofline_ms'] / allowed_ms:.0%}",
                "roofline / now": f"{r['roofline_ms'] / r['engine_ms']:.0%}",
                "coarse (AMX) roofline ms": f"{coarse:.1f}" if (coarse := r.get("coarse_roofline_ms")) else "-",
                "coarse roofline / allowed": f"{coarse / allowed_ms:.0%}" if coarse else "-",
            }
        )
    src = payload["sources"]
    lines = [
        f"{payload['model']}, derived from section `speed` (measured {src['speed']['date']}: the engines and "
        f"the runtimes interleaved in one run, medians) and section `speed_roofline` (measured "
        f"{src['speed_roofline']['date']}: each part's dense MACs, and the quiet machine's ceilings it carries: f32 GEMM "
        f"{vector:.0f} GMAC/s on the vector units, bf16 GEMM {amx:.0f} GMAC/s on AMX). 'Engine ms allowed' is "
        "the runtime's time divided by the wanted speed-up; 'kept GMAC' is what one forward multiplies at that "
        "N:M (N/M of the pruned convs' MACs, all of the dense first and last convs'); the rates are kept GMAC "
        "over the engine's time. 'Best dense' is the fastest runtime row at that N:M (every runtime runs the "
        "dense-with-zeros export).",
        "",
        markdown_table(table, COLUMNS),
        "",
        "Per-channel N:M masks (each output channel keeps its own inputs) run on the vector units: AMX multiplies "
        "dense tiles only, and `vdpbf16ps` does no more MACs per cycle than f32 FMA on this CPU, so the vector "
        "ceiling bounds the f32 and the bf16 kernel alike; AVX512-FP16's `vfmadd231ph` does twice as many, so "
        "the fp16 kernel's rows read against twice that ceiling (derived from the instruction's width, not "
        "measured). (An engine whose layers chose PyTorch's dense bf16 "
        "conv runs on AMX; its rate 'now' counts only the kept MACs and can pass the vector ceiling.) "
        + _reading(payload["rows"], vector)
        + _prototype_reading(payload["rows"], payload.get("prototype") or {}),
    ]
    return TITLE, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    return section_main(SECTION, render, lambda args: derive(), parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
