"""The parts of ``bench_speed.py`` its modes share: the uniform N:M models, the per-part profile of
EDSR-baseline x2 (``--profile-only``, section ``speed_profile``), its roofline (``--roofline``,
section ``speed_roofline``) and how a measured section is written."""

from __future__ import annotations

import argparse
import copy
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _report import in_memory, publish, results_path, save_results
from _roofline import carried_quiet, measure_ceilings, part_costs, quiet_ceilings, roof_ms
from _speed_report import render, render_roofline
from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig, compile_sparse, load_kernel
from nmrestore.runtime.speed import profile_modules, torch_threads
from nmrestore.sparsity import NMConfig, sparsify_, squash_

ROOT = Path(__file__).resolve().parent.parent


def uniform_model(name: str, scale: int, nm: str, kwargs: dict[str, object]) -> nn.Module:
    n, m = (int(v) for v in nm.split(":"))
    torch.manual_seed(0)
    model = create_model(name, scale=scale, **kwargs)
    sparsify_(model, NMConfig(n=n, m=m))
    return model.eval()


def part_of(name: str, kind: str, model: str) -> str:
    if kind == "ReLU":
        return "ReLU"
    if kind == "PixelShuffle":
        return "pixel shuffle (dense only; fused into the upsampler conv on the engines)"
    if name == "(other)":
        return "rest: long skip sum (dense only; in body.16's epilogue on the engines), Python"
    if model == "edsr":
        if kind == "FusedTail":  # masks shared by 16-channel blocks: both convs may be one AMX call
            return "tail.0.0 upsampler conv and tail.1 last conv (engines: one fused call)"
        if name == "head.0":
            return "head.0 (first conv, dense)"
        if name == "tail.1":
            return "tail.1 (last conv, dense)"
        if name.startswith("tail.0"):
            return "tail.0.0 upsampler conv 64->256 (engines: with the fused pixel shuffle)"
        if kind in ("ResBlock", "FusedResidual"):
            return "16 residual blocks (2 convs 64->64, ReLU, skip sum)"
        if name.startswith("body"):
            return "body.16 conv 64->64 (engines: with the long skip sum)"
    return kind


def profile_parts(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> list[dict[str, object]]:
    grouped: dict[str, dict[str, float]] = defaultdict(dict)
    totals: dict[str, float] = {}
    for label, model in models.items():
        rows, total = profile_modules(model, x, repeats)
        totals[label] = total
        for row in rows:
            key = part_of(row.name, row.kind, "edsr")
            grouped[key][label] = grouped[key].get(label, 0.0) + row.ms
    out = [{"part": part, **{f"{k} ms": v for k, v in values.items()}} for part, values in grouped.items()]
    out.append({"part": "total (one forward)", **{f"{k} ms": v for k, v in totals.items()}})
    return out


def finish(args: argparse.Namespace, key: str, data: dict[str, Any], renderer: Any) -> None:
    """Print the section; save its JSON and publish it unless ``--no-write`` or ``--quick``."""
    write = not args.no_write and not args.quick
    payload = save_results(key, data) if write else in_memory(data)
    print(renderer(key, payload)[1])
    if write:
        publish(key, renderer)
        print(f"{results_path(key).relative_to(ROOT)} and section {key!r} of docs/BENCHMARKS.md written")


def profile_models(kwargs: dict[str, object], config: EngineConfig, fp16: bool = False) -> dict[str, nn.Module]:
    """Dense EDSR-baseline x2 and the engine at 4:32 and 2:32; with ``fp16``, also the fp16 engine
    at both (where the kernel has its fp16 form)."""
    base = uniform_model("edsr_baseline", 2, "4:32", kwargs)
    thin = uniform_model("edsr_baseline", 2, "2:32", kwargs)
    models = {
        "dense": squash_(copy.deepcopy(base)),
        "4:32 engine": compile_sparse(base, config),
        "2:32 engine": compile_sparse(thin, config),
    }
    lib = load_kernel()
    if fp16 and lib is not None and lib.has_f16:
        half = config.model_copy(update={"precision": "fp16"})
        models["4:32 engine fp16"] = compile_sparse(base, half)
        models["2:32 engine fp16"] = compile_sparse(thin, half)
    return models


def profile_only(
    args: argparse.Namespace,
    size: tuple[int, int],
    kwargs: dict[str, object],
    config: EngineConfig,
    kernel: str,
    started: float,
) -> None:
    with torch_threads(args.threads):
        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        profile = profile_parts(profile_models(kwargs, config, fp16=True), x, args.repeats)
        threads = torch.get_num_threads()
    data = {
        "size": list(size),
        "threads": threads,
        "repeats": args.repeats,
        "kernel": kernel,
        "wall_s": time.perf_counter() - started,
        "profile": profile,
    }
    finish(args, "speed_profile", data, render)


def conv_part(name: str) -> str:
    """The profile part (``_group``'s label) a conv of EDSR-baseline belongs to."""
    if name.startswith("body.") and ".body." in name:
        return part_of(name, "ResBlock", "edsr")
    return part_of(name, "Conv2d", "edsr")


def roofline_only(
    args: argparse.Namespace, size: tuple[int, int], kwargs: dict[str, object], kernel: str, started: float
) -> None:
    variants = [("dense f32", None, "f32"), ("dense bf16", None, "bf16")]
    variants += [(f"{nm} engine {p}", nm, p) for nm in ("4:32", "2:32") for p in ("f32", "bf16")]
    with torch_threads(args.threads):
        ceilings = measure_ceilings(args.repeats)
        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        models: dict[str, nn.Module] = {}
        densities: dict[str, float] = {}
        for label, nm, precision in variants:
            base = uniform_model("edsr_baseline", 2, nm or "4:32", kwargs)
            if nm is None:  # PyTorch dense, f32 or bf16 (the bf16 engine forced dense: oneDNN bf16 convs)
                dense = squash_(copy.deepcopy(base)).eval()
                models[label] = (
                    dense
                    if precision == "f32"
                    else compile_sparse(base, EngineConfig(tactic="dense", precision="bf16"))
                )
            else:
                models[label] = compile_sparse(base, EngineConfig(timing_repeats=3, precision=precision))
                n, m = (int(v) for v in nm.split(":"))
                densities[nm] = n / m
        probe = squash_(uniform_model("edsr_baseline", 2, "4:32", kwargs))
        costs = part_costs(probe, x, conv_part, lambda name: 1.0)
        sparse_costs = {
            nm: part_costs(probe, x, conv_part, lambda name, d=d: 1.0 if name in ("head.0", "tail.1") else d)
            for nm, d in densities.items()
        }
        profile = profile_parts(models, x, args.repeats)
        threads = torch.get_num_threads()
    rows = []
    for row in profile:
        part = str(row["part"])
        out: dict[str, object] = {"part": part}
        for label, nm, precision in variants:
            out[f"{label} ms"] = row.get(f"{label} ms", "")
            cost = (sparse_costs[nm] if nm else costs).get(part)
            if cost is not None:
                out[f"{label} roof"] = roof_ms(
                    cost, ceilings, sparse=nm is not None, bf16=precision == "bf16"
                )
        if part in costs:
            out["dense GMAC"] = costs[part].macs / 1e9
            out["MB moved (f32)"] = costs[part].values * 4 / 1e6
        rows.append(out)
    measured = {
        "copy_gbs": ceilings.copy_gbs,
        "gemm_f32_gmacs": ceilings.gemm_f32_gmacs,
        "gemm_bf16_gmacs": ceilings.gemm_bf16_gmacs,
    }
    cols = ["part", "dense GMAC", "MB moved (f32)"]
    cols += [f"{label} {what}" for label, _, _ in variants for what in ("ms", "roof")]
    data = {
        "threads": threads,
        "repeats": args.repeats,
        "size": list(size),
        "kernel": kernel,
        "wall_s": time.perf_counter() - started,
        "ceilings": measured,
        "quiet_ceilings": carried_quiet(quiet_ceilings(), measured),
        "columns": cols,
        "rows": rows,
    }
    finish(args, "speed_roofline", data, render_roofline)
