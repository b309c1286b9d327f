"""Trained coarse and per-channel N:M checkpoints on the f32, bf16 and fp16 engines, against the deployment runtimes.

Section `coarse` trains the photo study's x4 model with masks shared by blocks of 16 output channels
(SR-STE, ``out_block: 16``) and scores it against the study's per-channel SR-STE checkpoints at the
same N:M. This section times those same checkpoints: the f32 engine (whose kernel runs block-shared
layers 4 output channels at a time), the bf16 engine (``precision="bf16"``: where the CPU has AMX,
block-shared layers run on AMX tiles and each residual block as one call), the fp16 engine
(``precision="fp16"``, where the kernel has its AVX512-FP16 form; no whole-model fallback, so its
own forward is timed), PyTorch's dense conv, and
OpenVINO f32 and at its default
precision on the dense-with-zeros ONNX export, interleaved in one process (50 ms untimed pause
before every call, as in section `speed`), 320x180 LR input (1280x720 output), 2 threads. So speed
and PSNR come from one set of trained weights.

    .venv/bin/python benchmarks/bench_coarse_engine.py --study-dir /root/.cache/nmrestore/photos-study
    .venv/bin/python benchmarks/bench_coarse_engine.py --render
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _dense_runtime_checks import compare  # noqa: E402
from _report import load_results, markdown_table, results_path, section_main  # noqa: E402
from _roofline import machine_line, machine_state, quiet_ceilings, slowed  # noqa: E402
from nmrestore import __version__  # noqa: E402
from nmrestore.engine.runner import model_from_checkpoint  # noqa: E402
from nmrestore.export.peers import available_peers, open_peers, parse_peers  # noqa: E402
from nmrestore.runtime import EngineConfig, compile_sparse, kernel_status, load_kernel  # noqa: E402
from nmrestore.runtime.speed import Peer, measure_speed, torch_threads  # noqa: E402

SECTION = "coarse_engine"
TITLE = "Coarse N:M on the engine: the photo study's trained checkpoints against the deployment runtimes"
BUDGETS = ("4:32", "2:32")
#: (label, the study's run folder for an N:M budget, the method name of its PSNR row in section `coarse`)
KINDS = (
    ("per-channel", "srste-{n}of{m}", "per-channel SR-STE"),
    ("coarse (blocks of 16)", "coarse16-srste-{n}of{m}", "coarse SR-STE"),
)
ENGINE = "engine f32"
BF16 = "engine bf16"  # block-shared layers on AMX tiles, residual blocks as one call, bf16 hand-offs
FP16 = "engine fp16"
RUNTIMES = ("openvino f32", "openvino default")


def checkpoint(study_dir: Path, scale: int, run: str) -> Path:
    path = study_dir / f"x{scale}" / run / "checkpoints" / "last.safetensors"
    if not path.exists():
        raise SystemExit(f"{path} is missing: run benchmarks/bench_coarse.py with this --study-dir first")
    return path


def measure(args: argparse.Namespace) -> dict[str, Any]:
    names, notes = available_peers(*parse_peers("openvino"))
    if "openvino" not in names:
        raise SystemExit("OpenVINO is not installed: pip install 'nmrestore[openvino]'")
    shape = (1, 3, 180, 320)
    rows = []
    with torch_threads(args.threads):
        before = machine_state()
        for budget in BUDGETS:
            n, m = (int(v) for v in budget.split(":"))
            for label, run, _ in KINDS:
                path = checkpoint(args.study_dir, args.scale, run.format(n=n, m=m))
                model = model_from_checkpoint(path)[0].eval()
                engine = compile_sparse(model, EngineConfig(timing_repeats=3))
                with contextlib.ExitStack() as stack:
                    peers = stack.enter_context(open_peers(model, names, args.threads, shape))
                    lib = load_kernel()
                    if lib is not None and lib.has_f16:
                        fp16 = compile_sparse(model, EngineConfig(timing_repeats=3, precision="fp16"))
                        peers = [Peer(FP16, "fp16", __version__, lambda x, e=fp16: e(x)), *peers]
                    if lib is not None and lib.has_bf16:
                        bf16 = compile_sparse(model, EngineConfig(timing_repeats=3, precision="bf16"))
                        peers = [Peer(BF16, "bf16", __version__, lambda x, e=bf16: e(x)), *peers]
                    report = measure_speed(model, shape, None, args.rounds, name=f"{label} {budget}",
                                           warmup=1, peers=peers, engine=engine)  # fmt: skip
                samples = {ENGINE: report.sparse_runs_ms, "PyTorch dense": report.dense_runs_ms}
                samples.update({p.name: p.runs_ms for p in report.peers})
                diffs = {ENGINE: report.max_abs_diff, **{p.name: p.max_abs_diff for p in report.peers}}
                rows.append({"nm": budget, "masks": label, "checkpoint": str(path), "runs_ms": samples,
                             "max_abs_diff": diffs})  # fmt: skip
                print(budget, label, {k: round(statistics.median(v), 1) for k, v in samples.items()}, flush=True)
        after = machine_state()
    return {
        "machine_before": before, "machine_after": after, "quiet_ceilings": quiet_ceilings(),
        "scale": args.scale, "input": list(shape), "threads": args.threads, "rounds": args.rounds,
        "kernel": kernel_status().summary(), "notes": notes, "rows": rows,
    }  # fmt: skip


def psnr_of() -> dict[tuple[str, str], float]:
    """(method, budget) -> mean PSNR of section `coarse`'s rows, if that section is committed."""
    if not results_path("coarse").exists():
        return {}
    return {(r["method"], r["budget"]): r["psnr"] for r in load_results("coarse")["rows"] if r.get("budget")}


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    psnr = psnr_of()
    method = {label: row_method for label, _, row_method in KINDS}
    table = []
    for row in payload["rows"]:
        ms = {k: statistics.median(v) for k, v in row["runs_ms"].items()}
        entry: dict[str, object] = {"N:M": row["nm"], "masks": row["masks"]}
        value = psnr.get((method.get(row["masks"], ""), row["nm"]))
        entry["PSNR (section coarse)"] = f"{value:.3f}" if value is not None else "-"
        entry.update({f"{k} ms": f"{v:.1f}" for k, v in ms.items()})
        for engine in (ENGINE, BF16, FP16):
            for runtime in RUNTIMES:
                if runtime in row["runs_ms"] and engine in row["runs_ms"]:
                    _, speedup, (geo, low, high) = compare(row, engine, runtime)
                    entry[f"{engine} vs {runtime}"] = f"{speedup:.2f}x ({geo:.2f}x [{low:.2f}, {high:.2f}])"
        diffs = row["max_abs_diff"]
        shown = [k for k in (ENGINE, BF16, FP16, "openvino default") if k in diffs]
        label = ", ".join(k.removeprefix("engine ") if k.startswith("engine") else k for k in shown)
        entry[f"max abs diff ({label})"] = ", ".join(f"{diffs[k]:.1e}" for k in shown)
        table.append(entry)
    columns = list(dict.fromkeys(k for r in table for k in r))
    args = (payload["machine_before"], payload["machine_after"], payload.get("quiet_ceilings"))
    notes = slowed(*args)
    lines = [
        f"The photo study's x{payload['scale']} checkpoints trained with SR-STE (300 steps from the dense model; "
        "section `coarse`), per-channel masks and masks shared by blocks of 16 output channels, input "
        f"{'x'.join(str(s) for s in payload['input'])} (a 1280x720 output), {payload['threads']} threads, "
        f"{payload['rounds']} interleaved rounds after a warm-up, 50 ms untimed pause before every call; ms = "
        "medians; speed-up = median over rounds of t_runtime / t_engine, then the geometric mean of the "
        "per-round ratios with its paired 95% interval (bootstrap of their logs). The runtimes run each "
        f"checkpoint's dense-with-zeros ONNX export. Kernel: {payload['kernel']}.",
        "",
        markdown_table(table, columns),
        "",
        machine_line(*args),
    ]
    if notes:
        lines += ["", f"**This run's timings are not reliable**: the machine was slowed ({'; '.join(notes)})."]
    return TITLE, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--study-dir", type=Path, default=Path("runs/photos-study"), help="bench_photos --work-dir"
    )
    parser.add_argument("--scale", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    return section_main(SECTION, render, measure, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
