"""Empirical ceilings and a per-part roofline for ``bench_speed.py --roofline``.

Ceilings are measured on this machine with PyTorch, in interleaved rounds: a STREAM-like copy of
a 64 MB f32 tensor (bytes read + written per second) and a dense 2048^3 matrix product in f32 and
in bf16 (oneDNN; AMX where the CPU has it). The roofline time of a part of the network is
``max(MACs / peak, bytes / bandwidth)``: MACs are the convs' multiply-adds (x N/M for a pruned conv),
bytes the activations a conv must read and write once (input, output, a fused residual), 4 per
value in f32 and 2 per value in bf16 (the ideal a bf16 engine could reach). The compute ceiling of
the sparse kernels, f32 or bf16, is the dense f32 GEMM rate: both run on AVX-512 (no sparse AMX),
and AVX512-BF16's dot product has no higher MAC rate than f32 FMA (measured: one vdpbf16ps of 32
MACs per ~1.9 cycles, two 16-MAC FMAs per cycle). Dense bf16 (oneDNN, AMX) gets the bf16 GEMM rate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nmrestore.runtime.timing import interleaved


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # bytes read + written per second, in GB/s
    gemm_f32_gmacs: float  # multiply-adds per second, in G
    gemm_bf16_gmacs: float


def measure_ceilings(rounds: int = 5) -> Ceilings:
    """Copy bandwidth and dense GEMM rates with the current thread count (medians of interleaved rounds)."""
    a = torch.rand(16 * 2**20)  # 64 MB
    b = torch.empty_like(a)
    n = 2048
    x, y = torch.rand(n, n), torch.rand(n, n)
    xb, yb = x.bfloat16(), y.bfloat16()
    runs: dict[str, Callable[[], object]] = {
        "copy": lambda: b.copy_(a),
        "f32": lambda: torch.mm(x, y),
        "bf16": lambda: torch.mm(xb, yb),
    }
    t = interleaved(runs, rounds, warmup=1)
    return Ceilings(
        copy_gbs=2 * a.numel() * 4 / t.median("copy") / 1e9,
        gemm_f32_gmacs=n**3 / t.median("f32") / 1e9,
        gemm_bf16_gmacs=n**3 / t.median("bf16") / 1e9,
    )


@dataclass
class PartCost:
    """Dense MACs, N:M-effective MACs and activation values moved by one part of the network."""

    macs: float = 0.0
    eff_macs: float = 0.0
    values: float = 0.0  # activation values read + written (x 4 bytes in f32, x 2 in bf16)


def part_costs(
    model: nn.Module, x: torch.Tensor, group: Callable[[str], str], density: Callable[[str], float]
) -> dict[str, PartCost]:
    """Per part (``group(conv name)``): the convs' MACs on input ``x`` and the values they move.

    ``density(conv name)`` is the kept fraction (N/M, 1 for a dense conv). A conv reads its input
    and writes its output once; a conv whose output is added to a skip (EDSR's residual blocks)
    reads one more output-sized tensor.
    """
    costs: dict[str, PartCost] = defaultdict(PartCost)
    handles = []

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Tensor], None]:
        def record(module: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            conv = module
            assert isinstance(conv, nn.Conv2d)
            k = conv.kernel_size[0] * conv.kernel_size[1] * conv.in_channels // conv.groups
            macs = float(out.numel() * k)
            part = costs[group(name)]
            part.macs += macs
            part.eff_macs += macs * density(name)
            residual = name.endswith("body.2")  # the last conv of an EDSR block adds the skip
            part.values += args[0].numel() + out.numel() * (2 if residual else 1)

        return record

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and name:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return dict(costs)


def roof_ms(cost: PartCost, ceilings: Ceilings, sparse: bool, bf16: bool) -> float:
    """The roofline time of a part: compute or memory, whichever is slower."""
    macs = cost.eff_macs if sparse else cost.macs
    rate = ceilings.gemm_bf16_gmacs if bf16 and not sparse else ceilings.gemm_f32_gmacs
    bytes_ = cost.values * (2 if bf16 else 4)
    return max(macs / rate / 1e6, bytes_ / ceilings.copy_gbs / 1e6)


#: a ceiling this far below the quiet machine's, or this far apart before and after a run, marks
#: the run's timings as taken on a slowed machine (the VM's neighbours load the same cores)
SLOW_FACTOR = 0.75


def quiet_ceilings() -> dict[str, float] | None:
    """The quiet machine's ceilings a run is held against: the reference section ``speed_roofline``
    carries (the highest each ceiling has reached in its runs), if committed."""
    from _report import load_results, results_path

    if not results_path("speed_roofline").exists():
        return None
    roof = load_results("speed_roofline")
    return roof.get("quiet_ceilings") or roof["ceilings"]  # type: ignore[no-any-return]


def carried_quiet(previous: dict[str, float] | None, measured: dict[str, float]) -> dict[str, float]:
    """The quiet reference after a roofline run: per ceiling, the higher of the previous reference and
    this run's. A run on a slowed machine must not lower the bar every other run is held to."""
    return {k: max(v, (previous or {}).get(k, v)) for k, v in measured.items()}


#: seconds this process stays idle before a probe: the runtimes it ran keep cores busy for a moment
#: (20 s of OpenVINO calls, then a probe at once: bf16 GEMM 910 GMAC/s; 2 s later: 1085)
PROBE_PAUSE_S = 2.0


def machine_state(rounds: int = 3) -> dict[str, float]:
    """The ceilings right now as a fresh process measures them, with this process's thread count, after
    PROBE_PAUSE_S idle: a JSON-ready dict (copy_gbs, gemm_f32_gmacs, gemm_bf16_gmacs).

    A fresh process, because the probe is for the machine, not for what a benchmark left in its own
    process: taken in-process right after section ``speed_dense_runtime``, bf16 GEMM read 864 / 1088 /
    906 GMAC/s where a fresh process read 1035 / 1059 / 1083 just after, and in 12 of 16 back-to-back
    runs the next run's first (clean) probe read higher than the previous run's in-process one."""
    time.sleep(PROBE_PAUSE_S)
    code = (
        f"import dataclasses, json, sys, torch; torch.set_num_threads({torch.get_num_threads()}); "
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); from _roofline import measure_ceilings; "
        f"print(json.dumps(dataclasses.asdict(measure_ceilings({rounds}))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the machine probe failed: {done.stderr.strip()[-2000:]}")
    state: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return state


_NAMES = {"gemm_f32_gmacs": ("f32 GEMM", "GMAC/s"), "gemm_bf16_gmacs": ("bf16 GEMM", "GMAC/s"),
          "copy_gbs": ("copy", "GB/s")}  # fmt: skip


def machine_line(before: dict[str, float], after: dict[str, float], quiet: dict[str, float] | None) -> str:
    """One sentence: the ceilings measured before and after a run, against the quiet machine's."""
    parts = []
    for key, (name, unit) in _NAMES.items():
        ref = f" (quiet machine {quiet[key]:.0f})" if quiet and key in quiet else ""
        parts.append(f"{name} {before[key]:.0f} / {after[key]:.0f} {unit}{ref}")
    return "Machine during the run (ceilings measured just before / just after it): " + ", ".join(parts) + "."


def slowed(before: dict[str, float], after: dict[str, float], quiet: dict[str, float] | None) -> list[str]:
    """Why this run's machine was slowed, if it was: a ceiling below SLOW_FACTOR of the quiet
    machine's, or one that moved by more than 1 / SLOW_FACTOR between before and after."""
    notes = []
    for key, (name, _unit) in _NAMES.items():
        lo, hi = sorted((before[key], after[key]))
        if lo < SLOW_FACTOR * hi:
            notes.append(f"{name} moved from {before[key]:.0f} to {after[key]:.0f}")
        if quiet and key in quiet and lo < SLOW_FACTOR * quiet[key]:
            notes.append(f"{name} {lo:.0f} against {quiet[key]:.0f} on the quiet machine")
    return notes


def machine_note(payload: dict[str, Any]) -> str:
    """A timed section's sentence on its machine (empty for runs recorded before the probe existed):
    the ceilings before and after, and a warning when it ran slowed."""
    if not payload.get("machine_before"):
        return ""
    args = (payload["machine_before"], payload["machine_after"], payload.get("quiet_ceilings"))
    notes = slowed(*args)
    warning = f" **Timed on a slowed machine** ({'; '.join(notes)}): ratios only, and with care." if notes else ""
    return machine_line(*args) + warning
