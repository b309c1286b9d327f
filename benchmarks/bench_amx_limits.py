"""What limits the bf16 kernel's AMX path: what each part of a fused residual block costs.

A chain of 16 EDSR residual blocks (64 channels, 3x3, at 320x180, masks shared by blocks of 16
output channels, N:32), each block one AMX call (``KernelLibrary.block_bf16``) reading the previous
block's bf16 hand-off, as the bf16 engine runs EDSR-baseline x2's body. The same sources are built
again with one part taken out (``-DNMK_AMX_ABLATE=k``, see the top of
``src/nmrestore/runtime/csrc/nm_amx.h``) and every build is timed in the same interleaved rounds:
what a part costs is how much faster the chain runs without it. Ablated builds compute wrong outputs;
they only time.

    .venv/bin/python benchmarks/bench_amx_limits.py            # measure (idle machine), write the section
    .venv/bin/python benchmarks/bench_amx_limits.py --render   # the section from its JSON
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import markdown_table, section_main  # noqa: E402
from _roofline import quiet_ceilings  # noqa: E402
from bench_kernel_limits import BLOCKS, CHANNELS, M, masked_weight  # noqa: E402
from nmrestore.runtime import csr_from_dense, kernel_status, load_kernel  # noqa: E402
from nmrestore.runtime.kernel import load_kernel_variant  # noqa: E402
from nmrestore.runtime.kernel_lib import KernelLibrary  # noqa: E402
from nmrestore.runtime.timing import interleaved  # noqa: E402

SECTION = "amx_limits"
TITLE = "What limits the bf16 kernel's AMX path: what each part of a fused residual block costs"
NS = (2, 4)
BLOCKS_IN_CHAIN = 16
HEIGHT, WIDTH = 180, 320
FULL = "full kernel"
#: ablation number (NMK_AMX_ABLATE) -> what the build leaves out
ABLATIONS = {
    1: "output traffic (the block's output written to a small scratch)",
    2: "the second conv's epilogue (bias, residual, bf16 store)",
    3: "the gather (kept input rows into the B tiles)",
    4: "the tile loads and products (the gather kept)",
    5: "input latency (the first conv reads 4 rows that stay in L2)",
}


def _chain(lib: KernelLibrary, x: torch.Tensor, weights: tuple[Any, ...], threads: int) -> Callable[[], Any]:
    csr, values, bias = weights

    def run() -> torch.Tensor | None:
        h: torch.Tensor | None = x
        for _ in range(BLOCKS_IN_CHAIN):
            h = lib.block_bf16(h, (csr, values, bias, True), (csr, values, bias), threads=threads)
            if h is None:
                raise SystemExit("the fused block did not run on AMX")
        return h

    return run


def measure(rounds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    lib = load_kernel()
    if lib is None or not lib.has_amx:
        raise SystemExit("no AMX path here: this section needs a CPU with AMX-BF16 and the bf16 kernels")
    builds = {FULL: lib, **{ABLATIONS[k]: load_kernel_variant((f"NMK_AMX_ABLATE={k}",)) for k in ABLATIONS}}
    bias = torch.zeros(CHANNELS)
    first = csr_from_dense(masked_weight(M, ""))
    # the chain's input as the engine passes it between blocks: a bf16 hand-off view, read in place
    x = lib.conv2d(
        torch.randn(1, CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)),
        first.rowptr, first.cin, first.kpos, first.values.bfloat16(), bias, CHANNELS, (3, 3), (1, 1), (1, 1),
        (1, 1), threads=threads, half_pad=(1, 1), half_only=True,
    )  # fmt: skip
    runs: dict[str, Callable[[], Any]] = {}
    for n in NS:
        csr = csr_from_dense(masked_weight(n, BLOCKS) * 0.05)  # small weights: 16 blocks stay finite
        weights = (csr, csr.values.bfloat16(), bias)
        for name, build in builds.items():
            runs[f"{n}:{M} | {name}"] = _chain(build, x, weights, threads)
    with torch.no_grad():
        timings = interleaved(runs, rounds, warmup=1)
    rows = []
    for n in NS:
        full = f"{n}:{M} | {FULL}"
        for name in builds:
            key = f"{n}:{M} | {name}"
            rows.append(
                {
                    "nm": f"{n}:{M}",
                    "build": name,
                    "ms": 1e3 * timings.median(key),
                    "speedup": 1.0 if key == full else timings.speedup(key, full),
                }
            )
    return {
        "threads": threads,
        "rounds": rounds,
        "input": [1, CHANNELS, HEIGHT, WIDTH],
        "blocks": BLOCKS_IN_CHAIN,
        "kernel": kernel_status().summary(),
        "rows": rows,
        "quiet_ceilings": quiet_ceilings(),
    }


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    rows = payload["rows"]
    full = {r["nm"]: r["ms"] for r in rows if r["build"] == FULL}
    table = [
        {
            "N:M": r["nm"],
            "build": r["build"],
            "chain ms": f"{r['ms']:.1f}",
            "per block ms": f"{r['ms'] / payload['blocks']:.2f}",
            "time the part takes": "-" if r["build"] == FULL else f"{full[r['nm']] - r['ms']:.1f} ms",
            "share": "-" if r["build"] == FULL else f"{1 - r['ms'] / full[r['nm']]:.0%}",
            "speed-up without it": "-" if r["build"] == FULL else f"{r['speedup']:.2f}x",
        }
        for r in rows
    ]
    _, c, h, w = payload["input"]
    summary = []
    for nm, base in full.items():
        parts = sorted((r for r in rows if r["nm"] == nm and r["build"] != FULL), key=lambda r: r["ms"])
        listed = ", ".join(f"{r['build'].split(' (')[0]} {1 - r['ms'] / base:.0%}" for r in parts)
        summary.append(f"at {nm} ({base:.1f} ms): {listed}")
    top = max(1 - r["ms"] / full[r["nm"]] for r in rows if r["build"] != FULL)
    lines = [
        f"A chain of {payload['blocks']} EDSR residual blocks ({c} channels, 3x3, {w}x{h}, masks shared by blocks of "
        f"16 output channels, magnitude on a seeded random weight), each block one AMX call reading the previous "
        f"block's bf16 hand-off in place, {payload['threads']} threads, medians of {payload['rounds']} "
        "interleaved rounds after a warm-up. Each ablated build is the same sources with one part taken out "
        "(`-DNMK_AMX_ABLATE=k`, listed at the top of `src/nmrestore/runtime/csrc/nm_amx.h`); 'share' is the "
        "part's time over the full kernel's, and the shares overlap (a part taken out also frees what waited "
        f"on it), so they need not add up. Kernel: {payload['kernel']}.",
        "",
        markdown_table(
            table,
            ["N:M", "build", "chain ms", "per block ms", "time the part takes", "share", "speed-up without it"],
        ),
        "",
        "By share of the chain's time, largest first: " + "; ".join(summary) + ". "
        + (
            f"No part takes more than {top:.0%}: the time is spread over the gather, the epilogue, the tile "
            "loads and products and the output traffic, so no one change to the kernel removes most of it."
            if top < 0.5
            else "One part takes at least half of the time."
        ),
    ]
    return TITLE, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    return section_main(SECTION, render, lambda args: measure(args.rounds, args.threads), parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
