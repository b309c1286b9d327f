"""The engines with a whole-model dense fallback on OpenVINO, against the deployment runtimes.

EDSR-baseline x2 at 2:4, 4:32 and 2:32, and at 4:32 and 2:32 with masks shared by blocks of 16 output
channels ("coarse", ``NMConfig(out_block=16)``, which the f32 kernel runs 4 channels at a time)
(magnitude masks on a fresh model, 320x180 LR, 2 threads):
the f32, bf16 and fp16 engines, each built with ``EngineConfig(dense_runtime="openvino")``, so
that after their first forward they run the whole model dense on OpenVINO when that timed faster
(:mod:`nmrestore.runtime.dense_runtime`), against ONNX Runtime, OpenVINO f32 and OpenVINO's default
precision on the dense-with-zeros ONNX export, all interleaved in one process (a 50 ms untimed pause
before every call, as in section `speed`). A control times OpenVINO's two peers compiled a second
time from the same export against the first: the spread this protocol reads for one runtime against
itself. Each row says where each engine runs the model and what its own forward timed at the
decision. Checks, from paired 95% intervals (bootstrap over rounds) of the log time ratio: the engines are
not slower than the best dense runtime at 2:4 (the f32 engine than the best f32 one), by the margin of the
run's control (:mod:`_dense_runtime_checks` says why); the speed-up targets at 4:32 and 2:32 are reported
as measured, the per-channel rows of the 16-bit engines and the fp16 engine's rows against OpenVINO's
default as measured but not as targets. An OpenVINO runtime is held to its first and its second compile
alike (one compile can run several percent faster than another).
Each run carries the checks of every run before it (``history`` in its JSON, from the JSON it replaces)
and the section shows the latest runs side by side, so what one run read is seen against the others.

    .venv/bin/python benchmarks/bench_dense_runtime.py            # measure (idle machine), write the section
    .venv/bin/python benchmarks/bench_dense_runtime.py --render   # the section from its JSON
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _dense_runtime_checks import (  # noqa: E402
    AGAIN,
    BF16,
    COARSE,
    F32,
    FP16,
    HISTORY_SHOWN,
    MARGIN_LIMIT,
    check_results,
    consistency,
    control,
    control_margin,
    history_table,
    rates_note,
    with_history,
)
from _report import load_results, markdown_table, results_path, section_main  # noqa: E402
from _roofline import machine_line, machine_state, quiet_ceilings, slowed  # noqa: E402
from nmrestore import __version__  # noqa: E402
from nmrestore.export.peers import available_peers, open_peers, parse_peers  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.runtime import EngineConfig, compile_sparse, engine_state, kernel_status  # noqa: E402
from nmrestore.runtime.speed import Peer, measure_speed, torch_threads  # noqa: E402
from nmrestore.sparsity import NMConfig, sparsify_  # noqa: E402

SECTION = "speed_dense_runtime"
TITLE = "Speed with a whole-model dense fallback: the engines may hand a shape to OpenVINO"
COARSE_BLOCK = 16  # COARSE rows: masks shared by blocks of this many output channels
NMS = ("2:4", "4:32", "2:32", "4:32" + COARSE, "2:32" + COARSE)
#: The 16-bit engines and their precision (EngineConfig.precision).
HALF_ENGINES = {BF16: "bf16", FP16: "fp16"}
#: each round runs the contenders in an order drawn from this seed: rotated rounds keep the cyclic order, so
#: every contender always follows the same one (each OpenVINO peer followed another OpenVINO call, while
#: the engines' hand-offs did not), and what that one leaves behind favoured it every round
SHUFFLE_SEED = 0


def _model(nm: str) -> torch.nn.Module:
    n, m = (int(v) for v in nm.removesuffix(COARSE).split(":"))
    torch.manual_seed(0)
    model = create_model("edsr_baseline", scale=2)
    sparsify_(model, NMConfig(n=n, m=m, out_block=COARSE_BLOCK if nm.endswith(COARSE) else 1))
    return model.eval()


def _engine_peer(model: torch.nn.Module, name: str) -> tuple[Peer, torch.nn.Module]:
    precision = HALF_ENGINES[name]
    config = EngineConfig(timing_repeats=3, precision=precision, dense_runtime="openvino")  # type: ignore[arg-type]
    engine = compile_sparse(model, config)
    return Peer(name, precision, __version__, lambda x: engine(x)), engine


def _runs_on(engine: torch.nn.Module) -> dict[str, Any]:
    state = engine_state(engine)
    assert state is not None and state.dense_runtime is not None
    choices = state.dense_runtime.choices
    kept = next((c for c in choices if c.kept), None)
    return {
        "runs_on": f"{kept.runtime} ({kept.precision})" if kept else "the engine",
        "choices": [c.to_dict() for c in choices],
        "plans": list(state.plans),
    }


def measure(rounds: int, threads: int, size: tuple[int, int]) -> dict[str, Any]:
    names, notes = available_peers(*parse_peers("all"))
    if "openvino" not in names:
        raise SystemExit("OpenVINO is not installed: pip install 'nmrestore[openvino]'")
    rows = []
    shape = (1, 3, *size)
    with torch_threads(threads):
        before = machine_state()
        for nm in NMS:
            model = _model(nm)
            engine = compile_sparse(model, EngineConfig(timing_repeats=3, dense_runtime="openvino"))
            with contextlib.ExitStack() as stack:
                peers = stack.enter_context(open_peers(model, names, threads, shape))
                again = stack.enter_context(open_peers(model, ["openvino"], threads, shape))
                peers += [dataclasses.replace(p, name=p.name + AGAIN) for p in again]
                halves = {name: _engine_peer(model, name) for name in HALF_ENGINES}
                report = measure_speed(model, shape, None, rounds, name=f"edsr_baseline x2 {nm}", warmup=1,
                                       peers=[*(p for p, _ in halves.values()), *peers], engine=engine,
                                       shuffle_seed=SHUFFLE_SEED)  # fmt: skip
            samples = {F32: report.sparse_runs_ms, "PyTorch dense": report.dense_runs_ms}
            samples.update({p.name: p.runs_ms for p in report.peers})
            diffs = {F32: report.max_abs_diff, **{p.name: p.max_abs_diff for p in report.peers}}
            rows.append({
                "nm": nm, "runs_ms": samples, "max_abs_diff": diffs,
                "engines": {F32: _runs_on(engine), **{name: _runs_on(e) for name, (_, e) in halves.items()}},
            })  # fmt: skip
            print(nm, {k: round(sorted(v)[len(v) // 2], 1) for k, v in samples.items()}, flush=True)
            del engine, halves, report  # the probe after the run (a fresh process) has the cores to itself
        gc.collect()
        after = machine_state()
    quiet = quiet_ceilings()
    return {
        "machine_before": before, "machine_after": after, "quiet_ceilings": quiet,
        "model": "edsr_baseline x2", "input": list(shape), "threads": threads, "rounds": rounds,
        "settle_s": 0.05, "order": "shuffled", "kernel": kernel_status().summary(), "notes": notes, "rows": rows,
    }  # fmt: skip


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    rows = {r["nm"]: r for r in payload["rows"]}
    table = []
    for nm, row in rows.items():
        ms = {k: statistics.median(v) for k, v in row["runs_ms"].items()}
        entry: dict[str, object] = {"N:M": nm}
        entry.update({f"{k} ms": f"{v:.1f}" for k, v in ms.items()})
        for engine in (F32, BF16, FP16):
            if engine not in row["engines"]:
                continue  # a run before the fp16 engine
            info = row["engines"][engine]
            own = next((c["engine_ms"] for c in info["choices"]), float("nan"))
            entry[f"{engine} runs on"] = info["runs_on"]
            entry[f"{engine} own forward ms (at the choice)"] = f"{own:.1f}"
        table.append(entry)
    columns = list(dict.fromkeys(k for r in table for k in r))
    checks: dict[str, list[str]] = {"target": [], "reported": []}
    for c in check_results(rows):
        if c["wanted"] == 1.0:
            need = (
                f"needs the interval's top not below 1 / {c['margin']:.3f} (the control's margin; not slower)"
            )
            need += "" if c["ok_strict"] else ", though not above 1"
        else:
            need = f"needs a median >= {c['wanted']:g}"
        again = ""
        if c["again"] is not None:
            a = c["again"]
            again = f"; against its second compile median {a['speedup']:.2f}x, {a['geo']:.2f}x [{a['low']:.2f}, {a['high']:.2f}]"
            need += ", against both compiles"
        checks[c["role"]].append(
            f"- {'PASS' if c['ok'] else 'FAIL'}: {c['engine']} vs {c['against']} at {c['nm']}: median "
            f"{c['speedup']:.2f}x, geometric mean {c['geo']:.2f}x [{c['low']:.2f}, {c['high']:.2f}]{again}, "
            f"runs on {rows[c['nm']]['engines'][c['engine']]['runs_on']}; {need}"
        )
    reported = (
        [
            "Reported, not targets (the 16-bit engines on per-channel masks, which no AMX tile can use, and "
            "the fp16 engine, which has no AMX on this CPU, against OpenVINO's default on AMX):",
            "",
            *checks["reported"],
            "",
        ]
        if checks["reported"]
        else []
    )
    unreliable = consistency(rows)
    controls = control(rows)
    control_note = (
        [
            "Control: each OpenVINO peer compiled a second time from the same export and timed as one more "
            "contender; its speed-up over the first compile (geometric mean [95% interval]) is what this "
            "protocol reads for the same runtime on the same model, so a hand-off within it runs as fast as "
            "its peer: "
            + "; ".join(controls)
            + f'. The margin for "not slower": {control_margin(rows):.3f}x '
            "(the largest of these gaps, either way).",
            "",
        ]
        if controls
        else []
    )
    history_note = (
        [
            f"Runs so far ({min(HISTORY_SHOWN, len(payload['history']) + 1)} latest, this one last; columns: "
            "date, kernel build, '(slowed)' by the rule below, '(unreliable)' where the run's consistency checks failed): each check's median speed-up against the first "
            "/ the second compile of the OpenVINO peer and its verdict by the rules above.",
            "",
            history_table(payload),
            "",
        ]
        if payload.get("history")
        else []
    )
    machine = []
    if "machine_before" in payload:
        args = (payload["machine_before"], payload["machine_after"], payload.get("quiet_ceilings"))
        machine = [machine_line(*args), ""]
        notes = slowed(*args)
        unreliable += [f"the machine was slowed ({'; '.join(notes)})"] if notes else []
    diffs = "; ".join(
        f"{nm}: " + ", ".join(f"{k} {v:.1e}" for k, v in row["max_abs_diff"].items())
        for nm, row in rows.items()
    )
    coarse_note = (
        [
            f"Rows marked '{COARSE.strip()}' use masks shared by blocks of {COARSE_BLOCK} output channels "
            "(`NMConfig(out_block=16)`), which the f32 kernel runs 4 channels at a time; what they cost in "
            "PSNR against per-channel masks of the same N:M, trained alike, is in section `coarse`.",
            "",
        ]
        if any(nm.endswith(COARSE) for nm in rows)
        else []
    )
    order_text = (
        "the contenders in a random order each round, seeded"
        if payload.get("order") == "shuffled"
        else "the order rotated by one place each round"
    )
    has_fp16 = any(FP16 in r["engines"] for r in rows.values())
    engines_text = "The f32, bf16 and fp16 engines are" if has_fp16 else "Both engines are"
    halves_text = "bf16 and fp16 engines" if has_fp16 else "bf16 engine"
    lines = [
        f"{payload['model']}, input {'x'.join(str(s) for s in payload['input'])}, {payload['threads']} threads, "
        f"{payload['rounds']} interleaved rounds in one process after a warm-up ({order_text}), "
        f"{payload['settle_s'] * 1e3:.0f} ms untimed pause before every call; ms = medians. {engines_text} built with "
        '`EngineConfig(dense_runtime="openvino")`: after the first forward of the shape they time their own '
        "forward against the whole dense model on OpenVINO (at f32 for the f32 engine, at its default "
        f"precision for the {halves_text}), check its output, and keep the faster. 'runs on' is what each kept; "
        "'own forward ms' is what its own forward timed at that choice. The runtimes run the dense-with-zeros "
        f"ONNX export. Kernel: {payload['kernel']}.",
        "",
        *coarse_note,
        markdown_table(table, columns),
        "",
        "Checks (speed-up = median over rounds of t_runtime / t_engine, and the geometric mean of the per-round "
        "ratios with its paired 95% interval from a bootstrap of their logs; 'best' is the fastest runtime row, "
        "'best f32' the fastest at f32):",
        "",
        *checks["target"],
        "",
        *reported,
        *control_note,
        *history_note,
        *rates_note(payload),
        (
            "**This run's timings are not reliable**: "
            + "; ".join(unreliable)
            + ". No check above is a claim; rerun on a quiet machine."
            if unreliable
            else "Consistency: where an engine handed the model to OpenVINO, it timed within 0.8-1.25x of the "
            f"OpenVINO peer of the same precision, and the control's margin was within {MARGIN_LIMIT:g}x."
        ),
        "",
        *machine,
        f"Largest difference to PyTorch f32 over the warm-up runs: {diffs}.",
    ]
    return TITLE, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", default="320x180", help="LR input WIDTHxHEIGHT")

    def run(args: argparse.Namespace) -> dict[str, Any]:
        w, h = (int(v) for v in args.input.split("x"))
        previous = load_results(SECTION) if results_path(SECTION).is_file() else None
        return with_history(measure(args.rounds, args.threads, (h, w)), previous)

    return section_main(SECTION, render, run, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
