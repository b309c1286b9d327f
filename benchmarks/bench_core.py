"""N:M core benchmark: rank refresh time and the cost of a masked training step.

Measures, on EDSR-baseline (x2 by default) on the CPU:

1. ``refresh_`` (recompute every layer's ranks: a sort inside each group of M input channels) at
   2:4 and 8:32, median over repeated runs;
2. one training step (forward + L1 loss + backward + Adam step) on a fixed batch of LR patches,
   dense and with 2:4 masks in each grad mode (hard / ste / srste, and srste with a ``refresh_``
   after every step, as SR-STE recomputes its masks every step). The configurations run
   round-robin in one process after a warm-up, so drifts in machine load hit all of them alike;
   the table reports medians and the ratio to the dense step of the same run.

The target is a masked step (hard and ste) at most 1.15x the dense one.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py            # full run: docs/bench/core.json + section "core"
    .venv/bin/python benchmarks/bench_core.py --quick    # fewer rounds (smoke test)
    .venv/bin/python benchmarks/bench_core.py --model edsr_baseline --batch 4 --patch 48 --no-write
    .venv/bin/python benchmarks/bench_core.py --render   # redraw the section from the JSON

The timings go to ``docs/bench/core.json`` and section "core" of docs/BENCHMARKS.md is rendered from
it unless ``--no-write`` is given. Run it on an
otherwise idle machine: the CPU time other processes used during the run is printed and recorded,
and the figures are flagged when it (or the spread of the step times) is too high.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, markdown_table, publish, results_path, save_results  # noqa: E402
from nmrestore.sparsity import GradMode, NMConfig, nm_layers, refresh_, sparsify_  # noqa: E402

TARGET = 1.15
SECTION = "core"
TITLE = "N:M core: rank refresh and masked training step"


def build_model(name: str, scale: int) -> tuple[nn.Module, str]:
    """The model and a short description of where it came from (zoo or the tests' TinyEDSR)."""
    try:
        from nmrestore.models import create_model
    except Exception as exc:  # the zoo may be mid-edit; TinyEDSR has EDSR-baseline's conv shapes
        if name != "edsr_baseline":
            raise SystemExit(
                f"nmrestore.models does not import ({exc!r}); only edsr_baseline has a fallback"
            ) from exc
        sys.path.append(str(ROOT))  # for tests/nets.py
        from tests.nets import TinyEDSR

        return TinyEDSR(scale=scale), f"tests/nets.py TinyEDSR(scale={scale}) (zoo import failed: {exc!r})"
    return create_model(name, scale=scale), f'nmrestore.models.create_model("{name}", scale={scale})'


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def spread_pct(samples: list[float]) -> float | None:
    """Half the inter-quartile range as a percentage of the median: how noisy the samples are."""
    if len(samples) < 4:
        return None
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return 50.0 * (q3 - q1) / statistics.median(samples)


def time_refresh(base: nn.Module, n: int, m: int, runs: int) -> dict[str, object]:
    model = copy.deepcopy(base)
    sparsify_(model, NMConfig(n=n, m=m))
    layers = list(nm_layers(model))
    weights = sum(mask.ranks.numel() for _, _, mask in layers)
    refresh_(model)  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        refresh_(model)
        samples.append(time.perf_counter() - start)
    return {
        "pattern": f"{n}:{m}",
        "layers": len(layers),
        "masked weights": f"{weights:,}",
        "refresh_ median (ms)": median_ms(samples),
        "min (ms)": min(samples) * 1e3,
        "per layer (ms)": median_ms(samples) / len(layers),
    }


@dataclass
class StepConfig:
    """One training-step configuration: a model, its optimizer, and what runs after each step."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    after_step: Callable[[], None] | None = None


def make_config(
    base: nn.Module, name: str, grad_mode: GradMode | None, refresh_each_step: bool
) -> StepConfig:
    model = copy.deepcopy(base)
    if grad_mode is not None:
        sparsify_(model, NMConfig(n=2, m=4, grad_mode=grad_mode))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    after = (lambda: refresh_(model)) if refresh_each_step else None
    return StepConfig(name, model, optimizer, after)


def train_step(cfg: StepConfig, lr: Tensor, hr: Tensor) -> float:
    start = time.perf_counter()
    cfg.optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.l1_loss(cfg.model(lr), hr)
    loss.backward()
    cfg.optimizer.step()
    if cfg.after_step is not None:
        cfg.after_step()
    return time.perf_counter() - start


def loadavg() -> str:
    try:
        return "/".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


class OtherCpu:
    """CPU time used by *other* processes while a block runs, in cores (Linux ``/proc/stat``).

    The load average lags by minutes, so it flags a quiet machine that was busy just before; this
    measures the machine's busy time minus this process's own CPU time over the same interval.
    """

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _machine_busy_s() -> float | None:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy time.
        busy = sum(fields[:3]) + sum(fields[5:8])
        return busy / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> OtherCpu:
        self._start = (self._machine_busy_s(), time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy0, own0, wall0 = self._start
        busy1 = self._machine_busy_s()
        if busy0 is None or busy1 is None:
            return
        wall = time.perf_counter() - wall0
        own = time.process_time() - own0
        self.cores = max(0.0, (busy1 - busy0 - own) / wall)


#: Other processes may use this many cores on average before the figures are flagged as noisy.
OTHER_CPU_LIMIT = 0.2
#: Half-IQR of any configuration's step times (percent of the median) above which figures are flagged.
SPREAD_LIMIT = 10.0


def noise_warning(other_cores: float | None, worst_spread: float) -> str:
    """A sentence when the figures are likely disturbed by other work on the machine, else ''."""
    issues = []
    if other_cores is not None and other_cores > OTHER_CPU_LIMIT:
        issues.append(f"other processes used {other_cores:.2f} cores on average during the run")
    if worst_spread > SPREAD_LIMIT:
        issues.append(f"step times spread up to ±{worst_spread:.0f}% (IQR/2)")
    if not issues:
        return ""
    return "; ".join(issues) + " — figures may be noisy; rerun on an idle machine."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="N:M core benchmark: rank refresh and masked training step.")
    parser.add_argument("--model", default="edsr_baseline", help="zoo model name (default: edsr_baseline)")
    parser.add_argument("--scale", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="LR patches per step")
    parser.add_argument("--patch", type=int, default=48, help="LR patch side (HR side = patch * scale)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 12, --quick 3)")
    parser.add_argument(
        "--refresh-runs", type=int, default=None, help="refresh_ repeats (default 20, --quick 5)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from docs/bench/core.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        publish(SECTION, render)
        return 0
    rounds = args.rounds or (3 if args.quick else 12)
    refresh_runs = args.refresh_runs or (5 if args.quick else 20)
    warmup = 1 if args.quick else 2

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, source = build_model(args.model, args.scale)
    load_before = loadavg()
    print(f"model: {source}")
    print(f"threads: {torch.get_num_threads()}, load average before: {load_before}")

    with OtherCpu() as other:
        # 1. rank refresh
        refresh_rows = [time_refresh(base, n, m, refresh_runs) for n, m in ((2, 4), (8, 32))]
        refresh_table = markdown_table(refresh_rows, REFRESH_COLUMNS)
        print(f"\nrank refresh (refresh_ over all layers, median of {refresh_runs})\n{refresh_table}")

        # 2. training step, round-robin
        configs = [
            make_config(base, "dense", None, False),
            make_config(base, "2:4 hard", GradMode.HARD, False),
            make_config(base, "2:4 ste", GradMode.STE, False),
            make_config(base, "2:4 srste", GradMode.SRSTE, False),
            make_config(base, "2:4 srste + refresh_ every step", GradMode.SRSTE, True),
        ]
        lr = torch.rand(args.batch, 3, args.patch, args.patch)
        hr = torch.rand(args.batch, 3, args.patch * args.scale, args.patch * args.scale)
        for cfg in configs:
            for _ in range(warmup):
                train_step(cfg, lr, hr)
        samples: dict[str, list[float]] = {cfg.name: [] for cfg in configs}
        for r in range(rounds):
            gc.collect()
            # Rotate the starting configuration so none always runs first (or right after gc).
            for cfg in configs[r % len(configs) :] + configs[: r % len(configs)]:
                samples[cfg.name].append(train_step(cfg, lr, hr))
    load_after = loadavg()

    dense_ms = median_ms(samples["dense"])
    step_rows: list[dict[str, object]] = []
    spreads: list[float] = []
    for cfg in configs:
        ms = median_ms(samples[cfg.name])
        spread = spread_pct(samples[cfg.name])
        spreads.append(spread or 0.0)
        step_rows.append(
            {
                "configuration": cfg.name,
                "median step (ms)": ms,
                "min (ms)": min(samples[cfg.name]) * 1e3,
                "± IQR/2 (%)": "n/a" if spread is None else spread,
                "ratio to dense": f"{ms / dense_ms:.3f}x",
            }
        )
    ratios = {cfg.name: median_ms(samples[cfg.name]) / dense_ms for cfg in configs}
    setup = (
        f"training step = forward + L1 loss + backward + Adam step; batch {args.batch}x3x{args.patch}x{args.patch} LR "
        f"→ {args.patch * args.scale}x{args.patch * args.scale} HR, {torch.get_num_threads()} threads, "
        f"{rounds} round-robin rounds after {warmup} warm-up step(s) per configuration"
    )
    data = {
        "model": source,
        "quick": args.quick,
        "other_cpu": "n/a" if other.cores is None else f"{other.cores:.2f} cores",
        "load_before": load_before,
        "load_after": load_after,
        "refresh_runs": refresh_runs,
        "refresh_rows": refresh_rows,
        "setup": setup,
        "step_rows": step_rows,
        "ratios": {name: ratios[name] for name in ("2:4 hard", "2:4 ste")},
        "noisy": noise_warning(other.cores, max(spreads)),
    }
    payload = in_memory(data) if args.no_write else save_results(SECTION, data)
    print(render(SECTION, payload)[1])
    if not args.no_write:
        publish(SECTION, render)
        print(
            f"\nwrote {results_path(SECTION).relative_to(ROOT)} and section {SECTION!r} of docs/BENCHMARKS.md"
        )
    return 0


REFRESH_COLUMNS = [
    "pattern",
    "layers",
    "masked weights",
    "refresh_ median (ms)",
    "min (ms)",
    "per layer (ms)",
]
STEP_COLUMNS = ["configuration", "median step (ms)", "min (ms)", "± IQR/2 (%)", "ratio to dense"]


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved timings (``docs/bench/core.json``)."""
    ratios, setup, noisy = payload["ratios"], payload["setup"], payload["noisy"]
    worst = max(ratios["2:4 hard"], ratios["2:4 ste"])
    verdict = (
        f"**Verdict: {'PASS' if worst <= TARGET else 'MISS'}** — masked 2:4 step is "
        f"{ratios['2:4 hard']:.3f}x (hard) and {ratios['2:4 ste']:.3f}x (ste) the dense step "
        f"(target ≤ {TARGET:.2f}x)."
    )
    body = "\n".join(
        [
            f"Model: {payload['model']}, N:M masks on every eligible conv (first/last dense); "
            f"{'quick mode' if payload['quick'] else 'full mode'}. "
            f"CPU used by other processes during the run: {payload['other_cpu']} (load average 1/5/15 min "
            f"before: {payload['load_before']}, after: {payload['load_after']}).",
            "",
            f"### Rank refresh (`refresh_` over all layers, median of {payload['refresh_runs']} runs)",
            "",
            markdown_table(payload["refresh_rows"], REFRESH_COLUMNS),
            "",
            "### Training step, dense vs masked 2:4",
            "",
            f"{setup[0].upper()}{setup[1:]}. Medians per configuration; ratio to the dense median "
            "of the same run. `± IQR/2` is half the inter-quartile range relative to the median.",
            "",
            markdown_table(payload["step_rows"], STEP_COLUMNS),
            "",
            verdict,
            *([f"\n> **Warning:** {noisy}"] if noisy else []),
        ]
    )
    return TITLE, body


if __name__ == "__main__":
    raise SystemExit(main())
