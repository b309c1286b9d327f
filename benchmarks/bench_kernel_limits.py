"""What limits the f32 kernel at low density: a fixed cost per output channel and tile, and L1 misses.

One EDSR body conv (64->64, 3x3, reading a hand-off input in place as between the engine's sparse
convs, no epilogue) on the kernel at N:32 for N = 1, 2, 4,
8, 16, magnitude masks of a seeded random weight, interleaved in one process, medians. The kernel
computes one output channel of one 2-row x 64-column tile at a time (a "channel-tile") from that
channel's kept weights, so its time is ``channel-tiles x (fixed + per weight x kept weights)``:

* the fixed cost and the cost per kept weight come from a least-squares line through the densities
  below 20%, which run one code path (above it, channels run in pairs and by kernel column);
* the same conv with every output channel keeping the *same* input channels (same number of kept
  weights, so the same FMAs and loads, but a working set of a few KB that stays in L1) says how
  much of the time is L1 misses: the 64 channels of a tile each read scattered positions of its input
  window. Below 20% density the kernel splits that window by blocks of 32 input channels (all output
  channels over one block, their partial sums kept aside, then the next block), so each sweep reads
  a 40 KB block that L1 holds only in part. (One weight of every fourth channel is zeroed so that the channels
  do not share *all* positions: those run in blocks, the next point.)
* masks shared by blocks of 16 output channels (``out_block=16``), which the kernel runs 4 channels
  at a time (one input load for four FMAs), get their own line.

    .venv/bin/python benchmarks/bench_kernel_limits.py            # measure (idle machine), write the section
    .venv/bin/python benchmarks/bench_kernel_limits.py --render   # the section from its JSON
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
from nmrestore.runtime import csr_from_dense, kernel_status, load_kernel  # noqa: E402
from nmrestore.runtime.timing import interleaved  # noqa: E402
from nmrestore.sparsity import nm  # noqa: E402

SECTION = "kernel_limits"
TITLE = "What limits the f32 kernel at low density: fixed cost per channel-tile, and L1 misses"
M = 32
NS = (1, 2, 4, 8, 16)
#: densities (N) fitted by the line: below 20%, one code path (no pairs, no kernel-column groups)
FITTED = (1, 2, 4)
#: densities whose masks are also run with every output channel keeping the same input channels
SAME_CHANNELS = (2, 4)
CHANNELS, HEIGHT, WIDTH = 64, 90, 320
SAME, PLAIN, BLOCKS = "same channels", "plain input", "blocks of 16"
BLOCK = 16


def masked_weight(n: int, variant: str) -> torch.Tensor:
    """A seeded 64x64x3x3 weight, N:32 along input channels: by magnitude per channel or per block
    of output channels, or the first N of each group (one weight of every fourth channel zeroed)."""
    w = torch.randn(CHANNELS, CHANNELS, 3, 3, generator=torch.Generator().manual_seed(n))
    if variant == BLOCKS:
        return w * (nm.compute_ranks(nm.block_scores(w.abs(), BLOCK), M) < n)
    if variant != SAME:
        return w * (nm.compute_ranks(w, M) < n)
    mask = torch.zeros_like(w)
    for group in range(0, CHANNELS, M):
        mask[:, group : group + n] = 1
    mask[3::4, 0, 0, 0] = 0  # so no block of 4 channels shares every position (see the docstring)
    return w * mask


def channel_tiles(threads: int, tile: tuple[int, int]) -> float:
    """Channel-tiles per thread in one conv (the work the kernel splits over threads)."""
    rows, cols = tile
    return CHANNELS * -(-HEIGHT // rows) * -(-WIDTH // cols) / threads


def measure(rounds: int, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    lib = load_kernel()
    if lib is None:
        raise SystemExit("the sparse kernel is unavailable on this machine")
    bias = torch.zeros(CHANNELS)
    # the input as the engine passes it between sparse convs: a zero-bordered hand-off view, read in
    # place (no padding pass), written by a conv of the kernel
    first = csr_from_dense(masked_weight(M, False))
    x = lib.conv2d(
        torch.randn(1, CHANNELS, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0)),
        first.rowptr, first.cin, first.kpos, first.values, bias, CHANNELS, (3, 3), (1, 1), (1, 1), (1, 1),
        threads=threads, out_pad=(1, 1),
    )  # fmt: skip
    if not lib.accepts_handoff(x, (3, 3), (1, 1), (1, 1), (1, 1)):
        raise SystemExit("the kernel did not hand off its output: the timed convs would pad their input")
    plain = x.contiguous()  # the same values as an ordinary tensor: the kernel pads it first
    cases = [(n, "") for n in NS] + [(n, SAME) for n in SAME_CHANNELS] + [(n, PLAIN) for n in SAME_CHANNELS]
    cases += [(n, BLOCKS) for n in (*FITTED, 8)]
    runs: dict[str, Callable[[], Any]] = {}
    kept: dict[str, int] = {}
    input_blocks: dict[str, int] = {}
    for n, variant in cases:
        csr = csr_from_dense(masked_weight(n, variant))
        if lib.channel_block(csr) != (1 if variant != BLOCKS else 4):
            raise SystemExit(f"{n}:{M} {variant}: the kernel would not run the path this row is meant to time")
        key = f"{n}:{M}{' ' + variant if variant else ''}"
        kept[key] = int(csr.values.numel()) // CHANNELS
        input_blocks[key] = lib.input_blocks(csr)
        runs[key] = lambda csr=csr, xin=(plain if variant == PLAIN else x): lib.conv2d(
            xin, csr.rowptr, csr.cin, csr.kpos, csr.values, bias, CHANNELS, (3, 3), (1, 1), (1, 1), (1, 1),
            threads=threads,
        )  # fmt: skip
    with torch.no_grad():
        timings = interleaved(runs, rounds, warmup=1)
    rows = [
        {
            "case": key,
            "n": int(key.split(":")[0]),
            "variant": next((v for v in (SAME, PLAIN, BLOCKS) if key.endswith(v)), ""),
            "kept_per_channel": kept[key],
            "input_blocks": input_blocks[key],
            "ms": 1e3 * timings.median(key),
        }
        for key in runs
    ]
    speedups = {f"{n}:{M}": timings.speedup(f"{n}:{M} {SAME}", f"{n}:{M}") for n in SAME_CHANNELS}
    blocks = {f"{n}:{M}": timings.speedup(f"{n}:{M} {BLOCKS}", f"{n}:{M}") for n in (*FITTED, 8)}
    padding = {f"{n}:{M}": timings.ratio(f"{n}:{M} {PLAIN}", f"{n}:{M}") for n in SAME_CHANNELS}
    return {
        "threads": threads,
        "rounds": rounds,
        "input": [1, CHANNELS, HEIGHT, WIDTH],
        "tile": list(lib.tile),
        "kernel": kernel_status().summary(),
        "rows": rows,
        "same_channels_speedup": speedups,
        "plain_input_ratio": padding,
        "blocks_speedup": blocks,
        "quiet_ceilings": quiet_ceilings(),
    }


def fit(payload: dict[str, Any], variant: str = "") -> tuple[float, float]:
    """(fixed ns, ns per kept weight) per channel-tile: least squares over the fitted densities."""
    per_thread = channel_tiles(payload["threads"], tuple(payload["tile"]))
    points = [
        (r["kept_per_channel"], 1e6 * r["ms"] / per_thread)
        for r in payload["rows"]
        if r["variant"] == variant and r["n"] in FITTED
    ]
    xs = torch.tensor([p[0] for p in points], dtype=torch.float64)
    ys = torch.tensor([p[1] for p in points], dtype=torch.float64)
    slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
    return float(ys.mean() - slope * xs.mean()), slope


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    per_thread = channel_tiles(payload["threads"], tuple(payload["tile"]))
    fixed, per_weight = fit(payload)
    rows = payload["rows"]
    lines_by = {"": (fixed, per_weight)}
    if "blocks_speedup" in payload:
        lines_by[BLOCKS] = fit(payload, BLOCKS)
    table = [
        {
            "masks": r["case"],
            "kept weights per channel": r["kept_per_channel"],
            "input blocks": r.get("input_blocks", "?"),
            "ms": f"{r['ms']:.3f}",
            "ns per channel-tile": f"{1e6 * r['ms'] / per_thread:.0f}",
            "fitted line ns": f"{lines_by[r['variant']][0] + lines_by[r['variant']][1] * r['kept_per_channel']:.0f}"
            if r["variant"] in lines_by and r["n"] in FITTED
            else "-",
            "fixed share": f"{lines_by[r['variant']][0] / (1e6 * r['ms'] / per_thread):.0%}"
            if r["variant"] in lines_by and r["n"] in FITTED
            else "-",
        }
        for r in rows
    ]
    h, w = payload["input"][2:]
    tr, tc = payload["tile"]
    same = payload["same_channels_speedup"]
    lines = [
        f"One EDSR body conv, 64->64 3x3 on a {w}x{h} input, read in place from a hand-off view as between the "
        "engine's sparse convs (no padding pass), no epilogue, "
        f"{payload['threads']} threads, medians of {payload['rounds']} interleaved rounds after a warm-up; a "
        f"channel-tile is one output channel of one {tr}x{tc} output tile; ns per channel-tile = wall time x "
        "threads / channel-tiles. 'same channels': every output channel keeps the same input channels (the same "
        f"number of kept weights, a working set that stays in L1); 'plain input': the same values as an ordinary "
        "NCHW tensor; 'input blocks': into how many blocks of 32 input channels the kernel splits the conv (1: "
        f"unsplit; '?': not recorded by this run). Kernel: {payload['kernel']}.",
        "",
        markdown_table(
            table,
            [
                "masks",
                "kept weights per channel",
                "input blocks",
                "ms",
                "ns per channel-tile",
                "fitted line ns",
                "fixed share",
            ],
        ),
        "",
        f"Below 20% density a channel-tile costs about {fixed:.0f} ns fixed plus {per_weight:.1f} ns per kept "
        f"weight (least squares over N = {', '.join(str(n) for n in FITTED)} of {M}). The fixed part (what does "
        "not grow with the kept weights: the accumulators, the store, the loop's ends) is "
        + ", ".join(
            f"{fixed / (1e6 * r['ms'] / per_thread):.0%} at {r['case']}"
            for r in rows
            if not r["variant"] and r["n"] in FITTED
        )
        + ". The same weights with every output channel keeping the same input channels run "
        + ", ".join(f"{v:.2f}x faster at {k} (so {1 - 1 / v:.0%} of the time is L1 misses)" for k, v in same.items())
        + ": the 64 channels of a tile each read a few scattered positions of its input window. Per-channel "
        "N:M masks make these misses. Below 20% density the kernel already runs a tile block by block of 32 "
        "input channels, the partial sums of all its output channels kept aside between blocks (`Split` in "
        "`src/nmrestore/runtime/csrc/nm_weights.h`), so each sweep reads a 40 KB block that L1 holds only in "
        "part; the other ways around the misses tried (smaller tiles, prefetch, aligned copies) are listed, "
        "with what they gave, at the top of `src/nmrestore/runtime/csrc/nm_kernels.cpp`. A plain NCHW input, "
        "which the kernel first copies into its padded layout, takes "
        + ", ".join(f"{v:.2f}x the time at {k}" for k, v in payload["plain_input_ratio"].items())
        + ": the engine hands its sparse convs' outputs over in that layout, so only a conv after a PyTorch op "
        "(the first conv, the upsampler after EDSR's long skip sum) pays it.",
        *_blocks_paragraph(payload, lines_by, per_thread),
    ]
    return TITLE, "\n".join(lines)


def _blocks_paragraph(
    payload: dict[str, Any], lines_by: dict[str, tuple[float, float]], per_thread: float
) -> list[str]:
    if BLOCKS not in lines_by:
        return []
    fixed, per_weight = lines_by[BLOCKS]
    shares = ", ".join(
        f"{fixed / (1e6 * r['ms'] / per_thread):.0%} at {r['n']}:{M}"
        for r in payload["rows"]
        if r["variant"] == BLOCKS and r["n"] in FITTED
    )
    _, c, h, w = payload["input"]
    mb = c * h * w * 4 / 1e6
    fixed_ms = fixed * per_thread / 1e6
    ceilings = payload.get("quiet_ceilings") or {}
    copy_gbs = ceilings.get("copy_gbs")
    return [
        "",
        f"With masks shared by blocks of {BLOCK} output channels (`out_block={BLOCK}`; the kernel runs them 4 "
        f"channels at a time, each input vector loaded once for four FMAs) a channel-tile costs about {fixed:.0f} "
        f"ns fixed plus {per_weight:.1f} ns per kept weight; the fixed part is {shares}. Against per-channel masks "
        "of the same N:M the blocks run "
        + ", ".join(f"{v:.2f}x faster at {k}" for k, v in payload["blocks_speedup"].items())
        + f". At any density the conv reads a {mb:.1f} MB input and writes a {mb:.1f} MB output"
        + (
            f", {1e3 * 2 * mb / 1e3 / copy_gbs:.2f} ms at the {copy_gbs:.1f} GB/s copy bandwidth of section "
            f"`speed_roofline` against {fixed_ms:.2f} ms of fixed cost per conv in this run"
            if copy_gbs
            else ""
        )
        + ".",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=2)
    return section_main(SECTION, render, lambda args: measure(args.rounds, args.threads), parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
