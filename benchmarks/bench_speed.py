"""Speed benchmark: N:M sparse inference on the CPU kernel against PyTorch's dense conv (oneDNN).

Every figure comes from interleaved runs in this one process (dense and sparse alternate, the order
rotating each round, after warm-up forwards of both), on a random 320x180 LR input, 2 intra-op
threads by default. Each speed-up is the median of the per-round ratios dense/sparse (each pair ran
back to back, so a slow phase of the machine hits both); the ms columns are the medians of each.

1. **Uniform N:M.** EDSR-baseline x2 and x4 and CARN x4 with magnitude one-shot masks on a freshly built
   model (speed does not depend on training) at 2:4, 8:32, 4:32 and 2:32. The dense reference is
   the same model squashed to dense-with-zeros weights (plain ``F.conv2d``); the sparse model is
   ``compile_sparse`` with per-layer tactic choice (each layer timed sparse vs dense on first use).
2. **SLS (layer-wise N).** A real SLS search on EDSR-baseline x2 with the project's own training
   (method ``sls``, M = 32, budget 12.5% of the prunable MACs, the harness's short-run settings,
   built-in training photos, 1 thread), trained once and cached under
   ``~/.cache/nmrestore/bench/speed-sls-<recipe hash>/``; its checkpoint is timed exactly as
   ``nmrestore speed edsr_baseline --scale 2 --checkpoint C`` does.
3. **ClassPruning.** EDSR-baseline x2 with routes 8/16/32 of 32 and an untrained classifier whose
   cost shift is calibrated to send the image's patches to a mix of routes; whole-image wall time of
   the patch pipeline (32-pixel patches, stride 28) with PyTorch vs with the sparse engine, and
   the dense model on the whole image.
   With ``--vs onnxruntime,openvino`` (or ``all``: the installed ones) each uniform row also times
   the runtimes a user would deploy with, in the same interleaved rounds (``nmrestore speed --vs``:
   ONNX Runtime f32, OpenVINO f32 and OpenVINO at its default precision, on the dense-with-zeros
   ONNX export), each with its max abs diff to PyTorch f32; a second table lists them.
4. **Profile.** Where the time goes in EDSR-baseline x2 (dense, 4:32 and 2:32 engines): per-module
   medians grouped into the first/last dense convs, the body convs, the upsampler conv, pixel
   shuffle, ReLU and the rest (residual sums, mean shifts, Python).
5. **Precision.** ``--precision bf16`` / ``fp16`` (or ``auto``) runs the engine with
   ``EngineConfig(precision=...)`` (the 16-bit sparse kernel, and PyTorch's bf16 conv, join each conv's
   timed tactic choice); ``--precision both`` keeps the f32 engine and times a bf16 engine next to it
   in the same rounds, ``all`` a bf16 and an fp16 engine, then prints the ratio table of the engines
   against PyTorch dense and the ``--vs`` peers.
6. **Roofline** (``--roofline``): measured copy bandwidth and dense GEMM rates (f32, bf16), and per
   part of EDSR-baseline x2 the measured ms of dense f32, dense bf16 and the f32/bf16 engines at
   4:32 and 2:32 next to ``max(MACs / GEMM rate, bytes / copy bandwidth)`` (``benchmarks/_roofline.py``).

Run from the repository root::

    .venv/bin/python benchmarks/bench_speed.py            # docs/bench/speed.json + section "speed"
    .venv/bin/python benchmarks/bench_speed.py --profile-only --repeats 3   # section "speed_profile"
    .venv/bin/python benchmarks/bench_speed.py --render   # redraw "speed" from the JSON (no timing)
    .venv/bin/python benchmarks/bench_speed.py --quick --no-write
    .venv/bin/python benchmarks/bench_speed.py --quick --no-write --vs all
    .venv/bin/python benchmarks/bench_speed.py --models edsr_baseline --uniform-only --precision both --vs openvino
    .venv/bin/python benchmarks/bench_speed.py --roofline --no-write

The first run trains the SLS checkpoint (150 steps of EDSR-baseline x2 on 1 thread, a few minutes);
later runs reuse it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import markdown_table, publish  # noqa: E402
from _roofline import machine_state, quiet_ceilings  # noqa: E402
from _speed_parts import (  # noqa: E402
    finish,
    profile_models,
    profile_only,
    profile_parts,
    roofline_only,
    uniform_model,
)
from _speed_report import ratio_text, render  # noqa: E402
from nmrestore import __version__  # noqa: E402
from nmrestore.errors import NMRestoreError  # noqa: E402
from nmrestore.export.peers import available_peers, open_peers, parse_peers, peer_rows  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.runtime import (  # noqa: E402
    EngineConfig,
    LayerDecision,
    compile_sparse,
    engine_state,
    format_decisions,
    kernel_status,
)
from nmrestore.runtime.speed import (  # noqa: E402
    Peer,
    SpeedReport,
    measure_speed,
    torch_threads,
)
from nmrestore.runtime.timing import PEER_SETTLE_S, interleaved, paired_median  # noqa: E402
from nmrestore.sparsity import nm_layers, sparsify_, squash_  # noqa: E402

SECTION = "speed"
UNIFORM = ("2:4", "8:32", "4:32", "2:32")
SLS_STEPS = 150  # search in the first half, then fine-tune with N frozen (nmrestore.bench.sls.sls_settings)
SLS_BUDGET = 0.125  # of the prunable MACs: the average of uniform 4:32
WARMUP = 2  # untimed forwards of each model before the interleaved rounds


def sls_recipe(steps: int = SLS_STEPS, budget: float = SLS_BUDGET, quick: bool = False) -> object:
    """The SLS search the speed row times: EDSR-baseline x2 from scratch on the built-in photos.

    Speed depends only on the learned per-layer N, so there is no dense pre-training; the search
    itself (scores, cost penalty, annealing, projection onto the budget) is the real method's.
    """
    from nmrestore.bench.sls import sls_settings
    from nmrestore.recipes.schema import recipe_from_dict

    model: dict[str, object] = {"name": "edsr_baseline", "scale": 2}
    if quick:
        model["kwargs"] = {"n_blocks": 2}
    return recipe_from_dict(
        {
            "name": "bench-speed-sls-edsr_baseline-x2" + ("-quick" if quick else ""),
            "seed": 0,
            "model": model,
            "data": {
                "train": {"source": "builtin", "patch_size": 32, "batch_size": 8, "samples_per_epoch": 800},
                "val": {"source": "builtin", "split": "test", "max_images": 1, "test_data": True},
            },
            "train": {
                "steps": steps,
                "lr": 2e-4,
                "schedule": {"kind": "multistep", "milestones": [0.67], "gamma": 0.5},
                "val_every": steps,
                "ckpt_every": max(1, steps // 3),
                "log_every": max(1, min(25, steps)),
                "device": "cpu",
            },
            "sparsity": sls_settings(steps, budget),
        },
        "speed benchmark SLS recipe",
    )


def ensure_sls(quick: bool = False) -> Path:
    """The cached SLS checkpoint (trained here on 1 thread on first use, resumable)."""
    from nmrestore.bench.config import default_cache_dir, recipe_digest
    from nmrestore.engine.runner import train

    steps = 6 if quick else SLS_STEPS
    recipe = sls_recipe(steps, quick=quick)
    run_dir = default_cache_dir() / f"speed-sls-{recipe_digest(recipe)}"  # type: ignore[arg-type]
    path = run_dir / "checkpoints" / "last.safetensors"
    done = run_dir / "done.json"
    if done.is_file() and path.is_file():
        return path
    print(f"training the SLS checkpoint ({steps} steps, 1 thread) into {run_dir}", flush=True)
    started = time.perf_counter()
    with torch_threads(1):
        train(recipe, run_dir, resume=True, show_progress=False)  # type: ignore[arg-type]
    done.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    return path


def sls_summary(model: nn.Module) -> tuple[float, str]:
    """Learned prunable-MAC fraction and a per-layer N summary ("body N 2/4/8 x 12/16/4, ...")."""
    from nmrestore.cost import count_cost

    summary = count_cost(model.eval()).summary()
    fraction = float(summary["prunable_macs"]) / float(summary["prunable_dense_macs"])
    body: list[int] = []
    other: list[str] = []
    for name, _, mask in nm_layers(model):
        if name.startswith("body"):
            body.append(mask.n)
        else:
            other.append(f"{name} {mask.n}:{mask.m}")
    counts = sorted(defaultdict(int, {n: body.count(n) for n in set(body)}).items())
    text = "body convs N (of 32): " + ", ".join(f"{n} x{c}" for n, c in counts)
    text += f" (in order {'/'.join(str(n) for n in body)})"
    return fraction, text + ("; " + ", ".join(other) if other else "")


def paired(report: SpeedReport) -> tuple[float, float, float]:
    """(dense ms, sparse ms, speed-up) from one report: medians of the runs and the median of the
    per-round dense/sparse ratios (robust to the machine's slow phases; nmrestore.runtime.timing)."""
    return report.dense_ms, report.sparse_ms, report.speedup


def _row(label: str, model_name: str, nm: str, report: SpeedReport) -> dict[str, object]:
    decisions = report.decisions  # type: ignore[attr-defined]
    sparse = sum(1 for d in decisions if d.choice == "sparse")
    dense_ms, sparse_ms, speedup = paired(report)  # type: ignore[arg-type]
    return {
        "model": model_name,
        "N:M": nm,
        "dense ms": dense_ms,
        "sparse ms": sparse_ms,
        "speed-up": speedup,
        "layers on kernel": f"{sparse}/{len(decisions)}",
        "max abs diff": f"{report.max_abs_diff:.1e}",  # type: ignore[attr-defined]
        "_label": label,
    }


def _fmt_row(row: dict[str, object]) -> str:
    return (
        f"dense {row['dense ms']:.1f} ms, sparse {row['sparse ms']:.1f} ms, "
        f"{row['speed-up']:.2f}x (median of paired ratios)"
    )


def _sls_row(
    args: argparse.Namespace, size: tuple[int, int], config: EngineConfig
) -> tuple[SpeedReport, float, str]:
    """Time an SLS checkpoint the way ``nmrestore speed --checkpoint C [--vs ...]`` does: ``--sls-checkpoint``
    (e.g. the photo study's), or one trained here (cached)."""
    from nmrestore.cli.speed import run_speed, speed_model

    checkpoint = args.sls_checkpoint or ensure_sls(quick=args.quick)
    model, _ = speed_model(None, 2, None, checkpoint)
    fraction, text = sls_summary(model)
    h, w = size
    report = run_speed(
        None,
        2,
        None,
        checkpoint,
        (h, w),
        torch.get_num_threads(),
        args.repeats,
        None,
        config,
        WARMUP,
        vs=args.vs,
    )
    return report, fraction, text


ENGINE_PEERS = {"bf16": "nmrestore bf16 engine", "fp16": "nmrestore fp16 engine"}
#: The 16-bit engines timed beside the f32 one, per --precision.
EXTRA_ENGINES = {"both": ("bf16",), "all": ("bf16", "fp16")}
_DECISIONS: dict[str, list[LayerDecision]] = {}  # each 16-bit engine's last per-layer choices (printed)
_PLANS: dict[str, list[str]] = {}  # and the whole-model plans it kept


def _engine_peer(model: nn.Module, precision: str) -> Peer:
    """The engine at a 16-bit precision, as a contender in measure_speed's rounds (its first run,
    the output check, chooses its tactics)."""
    engine = compile_sparse(model, EngineConfig(tactic="auto", timing_repeats=3, precision=precision))  # type: ignore[arg-type]

    def run(x: torch.Tensor) -> torch.Tensor:
        out = engine(x)
        state = engine_state(engine)
        if state is not None:
            _DECISIONS[precision] = state.table()
            _PLANS[precision] = state.plans
        return out

    return Peer(ENGINE_PEERS[precision], precision, __version__, run)


def _ratio_row(model: str, nm: str, report: SpeedReport) -> dict[str, object]:
    """ms of every contender and the engines' speed-ups against each (medians of per-round ratios)."""
    runs = {"PyTorch dense": report.dense_runs_ms, "engine f32": report.sparse_runs_ms}
    names = {v: f"engine {k}" for k, v in ENGINE_PEERS.items()}
    runs |= {names.get(p.name, p.name): p.runs_ms for p in report.peers}
    row: dict[str, object] = {"model": model, "N:M": nm}
    row |= {f"{k} ms": statistics.median(v) for k, v in runs.items()}
    for engine in ("engine f32", "engine bf16", "engine fp16"):
        if engine not in runs:
            continue
        for other, samples in runs.items():
            if other != engine:
                row[f"{engine} vs {other}"] = paired_median(samples, runs[engine])
    return row


def _classpruning(size: tuple[int, int], repeats: int, kwargs: dict[str, object]) -> dict[str, object]:
    from nmrestore.methods.classpruning import ClassPruningConfig
    from nmrestore.methods.classpruning.classifier import calibrate_shift, classifier_logits, route_classifier
    from nmrestore.methods.classpruning.patches import extract_patches, grid_positions
    from nmrestore.methods.classpruning.pipeline import AdaptivePipeline

    torch.manual_seed(0)
    model = create_model("edsr_baseline", scale=2, **kwargs)
    sparsify_(model, ClassPruningConfig(m=32, routes=(8, 16, 32), patch_size=32, stride=28))
    clf = route_classifier(model)
    with torch.no_grad():
        clf.head.weight.normal_(0, 5.0)  # an untrained classifier that still separates patches
    model.eval()
    h, w = size
    lq = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0))
    lq = lq * torch.linspace(0.05, 1.0, w).view(1, 1, 1, w)  # patches of differing contrast
    with torch.no_grad():
        logits = classifier_logits(model, extract_patches(lq, grid_positions(h, w, 32, 28), (32, 32)))
    target = 0.55  # the benchmark harness's ClassPruning MAC target
    clf.cost_shift.fill_(calibrate_shift(logits, clf.route_cost, target)[0])
    engine = compile_sparse(model)
    plain = AdaptivePipeline(model, 32, 28)
    fast = AdaptivePipeline(model, 32, 28, engine=engine)
    whole = _whole_dense(model)
    with torch.no_grad():
        reference = plain(lq)
        result = fast(lq)  # first call: the route layers choose their tactics here
        diff = float((reference.output - result.output).abs().max())
        timings = interleaved(
            {"whole": lambda: whole(lq), "plain": lambda: plain(lq), "engine": lambda: fast(lq)},
            repeats,
            warmup=0,
        )
    med = {k: timings.median(k) * 1e3 for k in timings.samples}
    state = engine_state(engine)
    assert state is not None
    by_route: dict[int, list[str]] = defaultdict(list)
    for d in state.table():
        by_route[d.route].append(d.choice)
    return {
        "histogram": "/".join(str(n) for n in result.histogram),
        "macs_fraction": result.macs_fraction,
        "whole_ms": med["whole"],
        "plain_ms": med["plain"],
        "engine_ms": med["engine"],
        "diff": diff,
        "route_layers": {r: f"{c.count('sparse')}/{len(c)}" for r, c in sorted(by_route.items())},
    }


def _whole_dense(model: nn.Module) -> nn.Module:
    """The dense network (full route, squashed) run on the whole image: the unpruned baseline."""
    from nmrestore.sparsity import use_route

    copy_ = copy.deepcopy(model)
    with use_route(copy_, 2):
        return squash_(copy_).eval()


#: The scale of a uniform row given by name alone (``--models edsr_baseline``).
DEFAULT_SCALE = {"edsr_baseline": 2, "carn": 4}


def model_specs(text: str, known: set[str]) -> list[tuple[str, int]]:
    """``"edsr_baseline:2,carn"`` -> [("edsr_baseline", 2), ("carn", 4)]; ValueError names a bad item."""
    specs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        name, _, scale = item.partition(":")
        if name not in known:
            raise ValueError(f"unknown model {name!r} (one of {', '.join(sorted(known))})")
        if scale and scale not in ("2", "3", "4"):
            raise ValueError(f"{item!r}: the scale must be 2, 3 or 4")
        specs.append((name, int(scale) if scale else DEFAULT_SCALE[name]))
    if not specs:
        raise ValueError("no model given")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", default="320x180", help="LR input WIDTHxHEIGHT")
    parser.add_argument("--repeats", type=int, default=9, help="interleaved timed rounds per model")
    parser.add_argument("--quick", action="store_true", help="tiny models and input (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/BENCHMARKS.md alone")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the per-module profile (section speed_profile)"
    )
    parser.add_argument(
        "--vs",
        default=None,
        help="peer runtimes for the uniform rows: onnxruntime,openvino or all (installed ones)",
    )
    parser.add_argument(
        "--precision",
        choices=("f32", "bf16", "fp16", "auto", "both", "all"),
        default="f32",
        help="the engine's precision; both: the f32 engine and a bf16 engine timed in the same rounds; "
        "all: and an fp16 engine",
    )
    parser.add_argument(
        "--models",
        default="edsr_baseline:2,edsr_baseline:4,carn:4",
        help="uniform rows for these models, each NAME or NAME:SCALE (edsr_baseline, carn)",
    )
    parser.add_argument(
        "--sls-checkpoint",
        type=Path,
        default=None,
        help="time this SLS checkpoint (default: train a small one)",
    )
    parser.add_argument("--sls-label", default="", help="what --sls-checkpoint is, for the tables")
    parser.add_argument(
        "--uniform-only",
        action="store_true",
        help="only the uniform rows (no SLS, profile, ClassPruning); print only",
    )
    parser.add_argument(
        "--roofline", action="store_true", help="only the roofline table (section speed_roofline)"
    )
    parser.add_argument(
        "--quality",
        default=None,
        help="only the PSNR of the f32, bf16 and fp16 engines: comma-separated checkpoints, scored on --photos "
        "(section speed_quality)",
    )
    parser.add_argument(
        "--photos", default="data/photos", help="photo set folder for --quality (nmrestore data photos)"
    )
    parser.add_argument(
        "--coarse",
        action="store_true",
        help="only the coarse (16-channel-block) N:M AMX prototype, one body conv; print",
    )
    parser.add_argument(
        "--render",
        action="store_true",
        help="only redraw the section (speed, or with --profile-only / --roofline / --quality its own) from its JSON",
    )
    args = parser.parse_args()
    if args.render:
        publish(
            "speed_profile" if args.profile_only
            else "speed_roofline" if args.roofline
            else "speed_quality" if args.quality
            else SECTION,
            render,
        )  # fmt: skip
        return
    try:
        peer_names, peer_notes = available_peers(*parse_peers(args.vs))  # a missing named peer: stop now
    except NMRestoreError as exc:
        parser.exit(2, f"error: {exc}\n")
    for note in peer_notes:
        print(f"note: {note}", flush=True)
    width, height = (int(v) for v in args.input.lower().split("x"))
    size = (height, width)
    kwargs: dict[str, object] = {}
    carn_kwargs: dict[str, object] = {}
    if args.quick:
        size, kwargs, carn_kwargs = (24, 32), {"n_blocks": 2}, {"n_blocks": 1, "n_units": 1}
    started = time.perf_counter()
    status = kernel_status()
    print(status.summary(), flush=True)
    precision = "f32" if args.precision in EXTRA_ENGINES else args.precision
    config = EngineConfig(tactic="auto", timing_repeats=3, precision=precision)
    if args.roofline:
        roofline_only(args, size, kwargs, status.summary(), started)
        return
    if args.quality:
        from _quality import run_quality

        with torch_threads(args.threads):
            quality_rows = run_quality([Path(p) for p in args.quality.split(",")], Path(args.photos))
            threads = torch.get_num_threads()
        data = {
            "photos": args.photos,
            "split": "test",
            "threads": threads,
            "kernel": status.summary(),
            "wall_s": time.perf_counter() - started,
            "settled": True,  # each image's second forward is scored (benchmarks/_quality.py)
            "rows": quality_rows,
        }
        finish(args, "speed_quality", data, render)
        return
    if args.coarse:
        from _coarse import run_coarse

        with torch_threads(args.threads):
            coarse_rows = run_coarse(size, args.repeats, UNIFORM)
        if coarse_rows:
            print(markdown_table(coarse_rows, list(dict.fromkeys(k for r in coarse_rows for k in r))))
        return
    if args.profile_only:
        profile_only(args, size, kwargs, config, status.summary(), started)
        return
    rows: list[dict[str, object]] = []
    peer_table_rows: list[dict[str, object]] = []
    ratio_rows: list[dict[str, object]] = []
    uniform = {"edsr_baseline": kwargs, "carn": carn_kwargs}
    try:
        specs = model_specs(args.models, set(uniform))
    except ValueError as exc:
        parser.exit(2, f"error: --models: {exc}\n")
    with torch_threads(args.threads):
        before = None if args.quick else machine_state()
        for name, scale in specs:
            kw = uniform[name]
            for nm in UNIFORM:
                model = uniform_model(name, scale, nm, kw)
                with contextlib.ExitStack() as stack:
                    peers = stack.enter_context(
                        open_peers(model, peer_names, torch.get_num_threads(), (1, 3, *size))
                    )
                    # the 16-bit engines join the same rounds as peers
                    extra = [_engine_peer(model, p) for p in EXTRA_ENGINES.get(args.precision, ())]
                    peers = [*extra, *peers]
                    report = measure_speed(
                        model,
                        (1, 3, *size),
                        None,
                        args.repeats,
                        config,
                        f"{name} x{scale} {nm}",
                        warmup=WARMUP,
                        peers=peers,
                    )
                rows.append(_row(report.model, f"{name} x{scale}", nm, report))
                peer_table_rows += peer_rows(report, f"{name} x{scale}", nm)
                ratio_rows.append(_ratio_row(f"{name} x{scale}", nm, report))
                print(f"{report.model}: {_fmt_row(rows[-1])}", flush=True)
                for peer in report.peers:
                    print(
                        f"  {peer.name} ({peer.precision}): {peer.ms:.1f} ms, {peer.speedup:.2f}x vs PyTorch, "
                        f"sparse engine {peer.sparse_speedup:.2f}x vs it, max abs diff {peer.max_abs_diff:.1e}",
                        flush=True,
                    )
                for p in EXTRA_ENGINES.get(args.precision, ()):
                    print(format_decisions(_DECISIONS.pop(p, report.decisions)))
                    print(f"whole-model plan of the {p} engine: {', '.join(_PLANS.get(p, [])) or '-'}", flush=True)
                if args.precision not in EXTRA_ENGINES and args.precision != "f32":
                    print(format_decisions(report.decisions))
        if args.uniform_only:
            print(ratio_text(ratio_rows))
            return
        sls_report, fraction, sls_text = _sls_row(args, size, config)
        sls_label = "SLS model" + (f" ({args.sls_label})" if args.sls_label else "")
        rows.append(
            _row(sls_report.model, sls_label, f"SLS, learned ({fraction:.1%} prunable MACs)", sls_report)
        )
        peer_table_rows += peer_rows(sls_report, sls_label, f"SLS {fraction:.1%}")
        print(f"{sls_report.model}: {_fmt_row(rows[-1])}", flush=True)

        x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
        profile = profile_parts(profile_models(kwargs, config), x, args.repeats)

        cp = _classpruning(size, args.repeats, kwargs)
        print(f"classpruning: {cp}", flush=True)
        threads = torch.get_num_threads()
        after = None if args.quick else machine_state()
    wall = time.perf_counter() - started

    features = None
    if peer_table_rows:
        from nmrestore.runtime.cpu_features import cpu_features, describe_features

        features = describe_features(cpu_features())
    data = {
        "size": list(size),
        "threads": threads,
        "warmup": WARMUP,
        "repeats": args.repeats,
        "settle_s": PEER_SETTLE_S if peer_table_rows else 0.0,
        "kernel": status.summary(),
        "wall_s": wall,
        "rows": rows,
        "peer_rows": peer_table_rows,
        "peer_notes": peer_notes,
        "cpu_features": features,
        "precision": args.precision,
        "ratio_rows": ratio_rows,
        "sls": {
            "given": args.sls_label if args.sls_checkpoint else None,
            "budget": SLS_BUDGET,
            "steps": SLS_STEPS,
            "checkpoint": sls_report.model,
            "fraction": fraction,
            "layers": sls_text,
        },
        "profile": profile,
        "classpruning": cp,
        "machine_before": before,
        "machine_after": after,
        "quiet_ceilings": quiet_ceilings(),
    }
    finish(args, SECTION, data, render)


if __name__ == "__main__":
    main()
