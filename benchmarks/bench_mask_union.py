"""Why per-channel N:M masks do not run on AMX tiles: how many input rows 16 output channels keep together.

An AMX tile product multiplies 16 output channels by one shared K axis. Masks shared by blocks of 16
output channels (``out_block: 16``) give every block exactly N of every M inputs, so its K axis is
N/M of the dense one (section `coarse`, the engine's AMX path). Per-channel masks, what nmrestore
trains by default, give each channel its own N; a block of 16 channels would have to run the union
of their kept positions, with zeros where a channel does not keep a row. This section measures that
union on the photo study's trained checkpoints, per group of M inputs at each kernel position:

* natural order: the blocks are channels 0-15, 16-31, ... as trained;
* greedy: each block grows from the first channel left by the channel whose mask adds the fewest
  new rows, the best a reordering of output channels (which costs nothing at run time) could
  plausibly do;
* independent: what masks drawn at random would give, M (1 - (1 - N/M)^16).

A union of u rows per group makes the block's tile products as long as a block-shared u:M mask's,
so u / N is how much more K the per-channel masks would cost on AMX than block-shared ones. No
timing: the section reads weights only.

    .venv/bin/python benchmarks/bench_mask_union.py --study-dir /root/.cache/nmrestore/photos-study
    .venv/bin/python benchmarks/bench_mask_union.py --render
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import fmean
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import markdown_table, section_main  # noqa: E402
from nmrestore.engine.runner import model_from_checkpoint  # noqa: E402
from nmrestore.sparsity import nm, nm_layers  # noqa: E402

SECTION = "mask_union"
BLOCK = 16  # output channels per AMX tile product
#: (scale, the study's run folder) of every trained checkpoint measured
RUNS = (
    (4, "srste-4of32"), (4, "srste-2of32"), (4, "sls-4of32"), (2, "srste-4of32"), (2, "sls-2of32"),
    (4, "coarse16-srste-4of32"), (4, "coarse16-srste-2of32"),
)  # fmt: skip


def block_union(groups: torch.Tensor, block: int, greedy: bool) -> float:
    """Mean kept rows per group of M over the blocks of ``block`` output channels.

    ``groups``: a boolean mask as ``(O, G, M)`` (every group of M inputs at every kernel position).
    With ``greedy`` the blocks are formed by adding, to each block, the channel that adds the fewest
    new kept rows; otherwise channels are taken in order. O must be a multiple of ``block``.
    """
    channels = groups.shape[0]
    if channels % block:
        raise ValueError(f"{channels} output channels are not a multiple of {block}")
    flat = groups.reshape(channels, -1)
    if not greedy:
        unions = flat.reshape(channels // block, block, -1).any(dim=1)
        return float(unions.sum(dim=1).float().mean()) / groups.shape[1]
    left = list(range(channels))
    total = 0
    while left:
        union = flat[left.pop(0)].clone()
        for _ in range(block - 1):
            grown = (union | flat[left]).sum(dim=1)  # the union with each candidate
            pick = left.pop(int(grown.argmin()))
            union |= flat[pick]
        total += int(union.sum())
    return total / (channels // block) / groups.shape[1]


def independent_union(n: int, m: int, block: int) -> float:
    """The expected union per group of ``block`` channels whose N:M masks are drawn independently."""
    return m * (1 - (1 - n / m) ** block)


def layer_rows(checkpoint: Path) -> list[dict[str, Any]]:
    """One row per N:M layer whose output channels fill blocks of 16: its N, M and both unions."""
    model = model_from_checkpoint(checkpoint)[0]
    rows = []
    for name, _, mask in nm_layers(model):
        keep = mask.mask().bool()
        if keep.shape[0] % BLOCK:
            continue
        groups = nm.to_groups(keep, mask.m, mask.in_axis)
        groups = groups.reshape(keep.shape[0], -1, mask.m)
        rows.append({"layer": name, "n": mask.n, "m": mask.m, "out_block": mask.out_block,
                     "natural": block_union(groups, BLOCK, greedy=False),
                     "greedy": block_union(groups, BLOCK, greedy=True)})  # fmt: skip
    return rows


def measure(args: argparse.Namespace) -> dict[str, Any]:
    checkpoints = []
    for scale, run in RUNS:
        path = args.study_dir / f"x{scale}" / run / "checkpoints" / "last.safetensors"
        if not path.is_file():
            raise SystemExit(f"{path} is missing: run benchmarks/bench_photos.py and bench_coarse.py first")
        print(f"x{scale} {run}", file=sys.stderr, flush=True)
        checkpoints.append({"scale": scale, "run": run, "layers": layer_rows(path)})
    return {"block": BLOCK, "checkpoints": checkpoints}


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """(title, body) of the section, from the JSON alone."""
    block = payload["block"]
    stats = []
    for ckpt in payload["checkpoints"]:
        layers = ckpt["layers"]
        m = layers[0]["m"]
        stats.append({
            "name": f"x{ckpt['scale']} {ckpt['run']}",
            "shared": layers[0]["out_block"] > 1,
            "layers": len(layers),
            "m": m,
            "kept": fmean([float(r["n"]) for r in layers]),
            "natural": fmean([r["natural"] for r in layers]),
            "greedy": fmean([r["greedy"] for r in layers]),
            "independent": fmean([independent_union(r["n"], r["m"], block) for r in layers]),
            "over_n": fmean([r["greedy"] / r["n"] for r in layers]),  # per layer: SLS's N differs
        })  # fmt: skip
    table = [
        {
            "checkpoint": s["name"],
            "masks": "block-shared" if s["shared"] else "per-channel",
            "layers": s["layers"],
            "kept N per M (mean)": f"{s['kept']:.2f} of {s['m']}",
            "union, natural order": f"{s['natural']:.2f}",
            "union, greedy order": f"{s['greedy']:.2f}",
            "union, independent masks": f"{s['independent']:.2f}",
            "greedy union / N": f"{s['over_n']:.2f}x",
            "greedy union / M": f"{s['greedy'] / s['m']:.0%}",
        }
        for s in stats
    ]
    per_channel = [s for s in stats if not s["shared"]]
    least = min(per_channel, key=lambda s: s["over_n"])
    densest = max(per_channel, key=lambda s: s["greedy"] / s["m"])
    lines = [
        f"Every N:M layer of each trained checkpoint whose output channels fill blocks of {block}; the "
        f"kept input rows per group of M that a block of {block} output channels needs together (the "
        "union of their masks), averaged over the layers' groups and blocks, then over the layers. "
        "Natural order: channels as trained; greedy: blocks grown channel by channel, each time by the "
        "channel adding the fewest new rows; independent: the expectation for random masks.",
        "",
        markdown_table(table, list(table[0])),
        "",
        f"Even reordered, a block of {block} channels with per-channel masks needs {least['over_n']:.2f}x "
        f"the K rows of its own kept weights at best ({least['name']}), and up to "
        f"{densest['greedy'] / densest['m']:.0%} of the dense K axis ({densest['name']}): "
        "the trained masks overlap only a little more than random ones. On AMX such a layer would "
        "run the tile products of a block-shared mask that many times denser, so per-channel masks "
        "stay on the vector kernels and the bf16 engine's AMX path takes block-shared masks only "
        "(docs/ARCHITECTURE.md). The block-shared checkpoints are the control: their union is N.",
    ]
    return "Why per-channel masks stay off AMX: the rows 16 output channels keep together", "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--study-dir", type=Path, default=Path("runs/photos-study"), help="bench_photos --work-dir"
    )
    return section_main(SECTION, render, measure, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
