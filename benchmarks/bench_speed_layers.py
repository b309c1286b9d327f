"""Layer by layer: the engine's choice for each conv against the same conv on ONNX Runtime and OpenVINO.

The whole-model tables (section ``speed``) say the engine loses to OpenVINO's default precision on an
AMX CPU; this says where. Every conv of EDSR-baseline x2 at 4:32 that differs in kind (the dense first
conv, a block's first conv with its ReLU, the body's last conv, the upsampler conv with its pixel
shuffle, the dense last conv) runs alone on the input it sees in a forward (a plain NCHW f32 tensor),
through:

* the f32 engine and the bf16 engine (``compile_sparse``; each layer runs the tactic the engine timed
  and chose in a first forward over the whole model),
* PyTorch's f32 conv (oneDNN, NCHW), and the same conv (with its ReLU / pixel shuffle) exported to
  ONNX and run by ONNX Runtime f32, OpenVINO f32 and OpenVINO at its default precision,

interleaved in one process, medians of per-round ratios. The layers that stay dense (first and last
conv) are where the engine's dense fallback must be no slower than the runtimes.

    .venv/bin/python benchmarks/bench_speed_layers.py            # measure (idle machine), write the section
    .venv/bin/python benchmarks/bench_speed_layers.py --render   # the section from its JSON
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import markdown_table, section_main  # noqa: E402
from _speed_parts import uniform_model  # noqa: E402
from nmrestore.export.peers import available_peers, open_peers  # noqa: E402
from nmrestore.runtime import EngineConfig, compile_sparse, engine_state  # noqa: E402
from nmrestore.runtime.engine import bf16_allowed  # noqa: E402
from nmrestore.runtime.layers import SparseConv2d  # noqa: E402
from nmrestore.runtime.timing import PEER_SETTLE_S, interleaved  # noqa: E402

SECTION = "speed_layers"
TITLE = "Speed layer by layer: the engine's conv against the same conv on the deployment runtimes"
LAYERS = {
    "head.0": "first conv 3->64 (dense)",
    "body.0.body.0": "block conv 64->64 + ReLU",
    "body.16": "body conv 64->64",
    "tail.0.0": "upsampler conv 64->256 + pixel shuffle",
    "tail.1": "last conv 64->3 (dense)",
}
DENSE_LAYERS = ("head.0", "tail.1")
ENGINE_F32, ENGINE_BF16 = "engine f32", "engine bf16"
PYTORCH = "PyTorch f32"


def reference(layer: SparseConv2d) -> nn.Module:
    """The layer as plain PyTorch modules (route 0's weights, its fused ReLU and pixel shuffle)."""
    weight = layer.routes[0].dense
    conv = nn.Conv2d(
        weight.shape[1] * layer.groups, weight.shape[0], layer.kernel_size, layer.stride, layer.padding,  # type: ignore[arg-type]
        layer.dilation, layer.groups, bias=layer._bias is not None,  # type: ignore[arg-type]
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if layer._bias is not None:
            conv.bias.copy_(layer._bias)  # type: ignore[union-attr]
    parts: list[nn.Module] = [conv]
    if layer.shuffle > 1:
        parts.append(nn.PixelShuffle(layer.shuffle))
    if layer.relu:
        parts.append(nn.ReLU())
    return nn.Sequential(*parts).eval()


def layer_inputs(engine: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each timed layer sees in a forward of ``engine``, as a plain NCHW f32 tensor."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(
            lambda m, args: seen.setdefault(m.layer_name, args[0].float().contiguous().clone())
        )
        for module in engine.modules()
        if isinstance(module, SparseConv2d) and module.layer_name in LAYERS
    ]
    with torch.no_grad():
        engine(x)
    for hook in hooks:
        hook.remove()
    return seen


def layers_of(engine: nn.Module) -> dict[str, SparseConv2d]:
    return {m.layer_name: m for m in engine.modules() if isinstance(m, SparseConv2d) and m.layer_name in LAYERS}


def measure(rounds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = uniform_model("edsr_baseline", 2, "4:32", {}).eval()
    x = torch.rand(1, 3, 180, 320)
    engines = {ENGINE_F32: compile_sparse(model, EngineConfig(tactic="auto", timing_repeats=3))}
    if bf16_allowed("auto"):
        engines[ENGINE_BF16] = compile_sparse(model, EngineConfig(tactic="auto", timing_repeats=3, precision="bf16"))
    inputs = layer_inputs(engines[ENGINE_F32], x)
    for engine in engines.values():
        layer_inputs(engine, x)  # the first forward: every layer times and chooses its tactic
    peer_names, _skipped = available_peers(["onnxruntime", "openvino"], explicit=False)
    rows = []
    with torch.no_grad():
        for name, label in LAYERS.items():
            xin = inputs[name]
            ref = reference(layers_of(engines[ENGINE_F32])[name])
            expected = ref(xin)
            runs: dict[str, Callable[[], Any]] = {PYTORCH: lambda ref=ref, xin=xin: ref(xin)}
            choices = {}
            for key, engine in engines.items():
                layer = layers_of(engine)[name]
                runs[key] = lambda layer=layer, xin=xin: layer(xin)
                decision = next(d for d in engine_state(engine).table() if d.layer == name)  # type: ignore[union-attr]
                choices[key] = decision.choice
            with open_peers(ref, peer_names, threads, tuple(xin.shape)) as peers:  # on this conv's own ONNX
                runs.update({f"{p.name} ({p.precision})": (lambda p=p, xin=xin: p.run(xin)) for p in peers})
                diffs = {key: float((run().float() - expected).abs().max()) for key, run in runs.items()}
                timings = interleaved(runs, rounds, warmup=1, settle_s=PEER_SETTLE_S if peers else 0.0, prime=True)
            rows.append(
                {
                    "layer": name,
                    "label": label,
                    "input": list(xin.shape),
                    "choices": choices,
                    "ms": {key: 1e3 * timings.median(key) for key in runs},
                    # t_other / t_engine per round, median: > 1 means the engine is faster
                    "speedup_vs": {
                        engine: {key: timings.speedup(engine, key) for key in runs if key != engine}
                        for engine in engines
                    },
                    "max_abs_diff": diffs,
                }
            )
    return {
        "threads": threads,
        "rounds": rounds,
        "settle_s": PEER_SETTLE_S if peer_names else 0.0,
        "primed": True,
        "model": "edsr_baseline x2, 4:32",
        "lr": [180, 320],
        "rows": rows,
    }


def _fastest_peer(row: dict[str, Any], precision: str) -> str | None:
    keys = [k for k in row["ms"] if k.endswith(f"({precision})") and not k.startswith("engine")]
    return min(keys, key=row["ms"].__getitem__) if keys else None


def checks(payload: dict[str, Any]) -> list[tuple[str, bool]]:
    """Each dense layer's engine tactic against the fastest runtime at the same precision (ratio >= 1)."""
    found = []
    for row in payload["rows"]:
        if row["layer"] not in DENSE_LAYERS:
            continue
        for engine, precision in ((ENGINE_F32, "f32"), (ENGINE_BF16, "bf16")):
            peer = _fastest_peer(row, precision)
            if engine not in row["ms"] or peer is None:
                continue
            ratio = row["speedup_vs"][engine][peer]
            found.append(
                (
                    f"{row['layer']} ({row['label']}): {engine} ({row['choices'][engine]}) {row['ms'][engine]:.2f} ms, "
                    f"{ratio:.2f}x the speed of {peer} ({row['ms'][peer]:.2f} ms); needs >= 1",
                    ratio >= 1.0,
                )
            )
    return found


def _largest(row: dict[str, Any], bf16: bool) -> str:
    values = [v for k, v in row["max_abs_diff"].items() if k != PYTORCH and ("bf16" in k) == bf16]
    return f"{max(values):.1e}" if values else "-"


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    rows = payload["rows"]
    columns = sorted({k for r in rows for k in r["ms"]}, key=lambda k: (not k.startswith("engine"), k))
    table = [
        {
            "layer": f"{r['layer']}: {r['label']}",
            "input": "x".join(map(str, r["input"])),
            **{f"{c} ms": f"{r['ms'][c]:.2f}" if c in r["ms"] else "-" for c in columns},
            "engine tactics (f32 / bf16)": " / ".join(r["choices"].get(e, "-") for e in (ENGINE_F32, ENGINE_BF16)),
            "max diff, f32 runs": _largest(r, bf16=False),
            "max diff, bf16 runs": _largest(r, bf16=True),
        }
        for r in rows
    ]
    lines = [
        f"{payload['model']}, input {payload['lr'][1]}x{payload['lr'][0]} LR, {payload['threads']} threads; each conv "
        f"alone on the input it sees in a forward (plain NCHW f32), {payload['rounds']} interleaved rounds after a "
        "warm-up, medians"
        + (
            f" ({1e3 * payload['settle_s']:.0f} ms untimed pause before every call: ONNX Runtime's threads spin "
            "after a run and slow whatever runs next; "
            + (
                "after the pause each runs its conv once untimed, then the timed call, so its threads are awake "
                "as between the layers of a forward: a call that first woke them took up to 10 ms more)."
                if payload.get("primed")
                else "a call after the pause also wakes its threads, which weighs on the shortest layers)."
            )
            if payload.get("settle_s")
            else "."
        )
        + " The engines run the tactic they chose in a first forward over the whole model; the "
        "runtimes run the same conv (with its fused ReLU / pixel shuffle) from its own ONNX export.",
        "",
        markdown_table(table, ["layer", "input", *[f"{c} ms" for c in columns], "engine tactics (f32 / bf16)",
                               "max diff, f32 runs", "max diff, bf16 runs"]),
        "",
        "A runtime given one layer pays its own layout conversions (NCHW f32 in, NCHW f32 out) on every call, as "
        "it would as the dense fallback for one layer between the engine's sparse convs; over a whole model it "
        "converts once, which is why OpenVINO's default wins the whole-model tables (section `speed`) while "
        "losing every row here. 'max diff': largest difference to PyTorch f32 over the f32 runs and over the "
        "bf16 ones.",
        "",
        "Checks (the layers that stay dense; the engine's dense fallback must be no slower than the "
        "fastest runtime at the same precision):",
        "",
        *[f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks(payload)],
    ]
    return TITLE, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    return section_main(SECTION, render, lambda args: measure(args.rounds, args.threads), parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
