"""ClassPruning's wall time on one 2K photo (bench_classpruning_photos.py, step 6), and the record
of earlier timings a re-timing keeps: runs group by the digest of the kernel's code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _classpruning_photos_report import DENSE, INFER, wall_summary
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, adaptive_engine
from nmrestore.runtime import EngineConfig, compile_sparse, engine_state
from nmrestore.runtime.timing import interleaved
from nmrestore.sparsity import use_route

ROOT = Path(__file__).resolve().parent.parent


def wall_time(
    dense: torch.nn.Module, model: torch.nn.Module, image: torch.Tensor, rounds: int, threads: int
) -> dict[str, Any]:
    """Seconds per restore of ``image``, every contender once per round, order rotating (runtime/timing.py)."""
    import time

    torch.set_num_threads(threads)
    x = image if image.dim() == 4 else image.unsqueeze(0)
    engine = adaptive_engine(model)  # what `nmrestore infer --sparse-engine` builds for ClassPruning
    infer = AdaptivePipeline(model, engine=engine)  # the checkpoint's pipeline (spatial), as infer runs it
    pytorch = AdaptivePipeline(model, engine=compile_sparse(model, EngineConfig(tactic="dense")))
    patches = AdaptivePipeline(model, mode="patches", stride=28, engine=engine)
    k = infer.num_routes

    def route(r: int) -> Callable[[], object]:
        def run() -> object:
            with use_route(engine, r):
                return engine(x)

        return run

    runs: dict[str, Callable[[], object]] = {
        DENSE: lambda: dense(x),
        INFER: lambda: infer(x),
        "ClassPruning spatial, PyTorch": lambda: pytorch(x),
        "ClassPruning 32/28 patches, sparse engine": lambda: patches(x),
        **{f"route {r} alone, whole image, sparse engine": route(r) for r in range(k)},
    }
    first: dict[str, float] = {}
    with torch.no_grad():
        for key, run in runs.items():  # first calls: the engine times its tactics per layer and shape
            started = time.perf_counter()
            run()
            first[key] = time.perf_counter() - started
        fast, slow = infer(x), pytorch(x)
        timings = interleaved(runs, rounds, warmup=1)
    state = engine_state(engine)
    assert state is not None
    decisions = state.table()
    reference = DENSE
    return {
        "lr_size": list(x.shape[-2:]),
        "threads": threads,
        "rounds": rounds,
        "median_s": {key: timings.median(key) for key in runs},
        "ratio_to_dense": {key: timings.ratio(key, reference) for key in runs},
        "first_call_s": first,
        "route_histogram": fast.histogram,
        "route_pixels": list(fast.cost.route_pixels),
        "macs_fraction": fast.macs_fraction,
        "max_abs_diff_engine_vs_pytorch": float((fast.output - slow.output).abs().max()),
        "kernel": state.kernel_id if state.kernel is not None else None,
        "tactics": {
            "sparse": sum(d.choice == "sparse" for d in decisions),
            "dense": sum(d.choice == "dense" for d in decisions),
        },
    }


def kernel_code(sources: dict[str, str] | None = None) -> str:
    """SHA-256 (16 hex digits) of the kernel's C++ sources with comments and blank lines dropped: the
    same code gets the same digest whatever its comments say."""
    import hashlib
    import re

    if sources is None:
        folder = ROOT / "src" / "nmrestore" / "runtime" / "csrc"
        sources = {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.suffix in (".cpp", ".h")}
    digest = hashlib.sha256()
    for name in sorted(sources):
        text = re.sub(r"/\*.*?\*/", "", sources[name], flags=re.S)
        lines = [re.sub(r"//.*", "", line).rstrip() for line in text.splitlines()]
        digest.update(name.encode() + b"\0" + "\n".join(line for line in lines if line.strip()).encode())
    return digest.hexdigest()[:16]


def earlier_wall_runs(previous: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every run a ``--retime`` replaces is kept in the new row: a re-timing adds evidence, never
    swaps a failing figure for a passing one (the check reads them all)."""
    if previous is None:
        return []
    return [*previous.get("earlier_runs", []), wall_summary(previous)]
