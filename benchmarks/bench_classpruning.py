"""ClassPruning benchmark (Zhou et al., arXiv 2211.05488; docs/ARCHITECTURE.md): input-adaptive N:M against dense and static N:M of equal MACs.

Protocol, on the built-in photos (nothing is selected on the test images):

1. the harness's cached dense model (``nmrestore.bench``; trained once, reused);
2. ClassPruning fine-tuned from it through the harness (method ``classpruning``): stage A + stage C
   use the harness's ``finetune_steps`` SR-weight steps between them, the classifier its own;
   routing is calibrated on held-out strips of the *training* images;
3. the adaptive model's whole-image MACs on the test images (every patch's route, overlap included,
   + the classifier + the blending, over the dense net run once on each whole image) picks the static
   budget: the smallest uniform N:32 whose MACs are at least as large; one-shot and SR-STE at that N:32 and
   the dense model fine-tuned are trained for the same number of steps;
4. references: the dense model on whole images and on the same 32/28 patches;
5. wall time on the test images, measured in one run, interleaved: whole-image dense inference,
   the batched patch pipeline, ClassSR's patch-at-a-time loop (and dense on patches, batched).

Run from the repository root::

    .venv/bin/python benchmarks/bench_classpruning.py               # docs/bench/classpruning.json + section
    .venv/bin/python benchmarks/bench_classpruning.py --quick --no-write
    .venv/bin/python benchmarks/bench_classpruning.py --render      # redraw the section from the JSON
    .venv/bin/python benchmarks/bench_classpruning.py --set task=denoise --set scale=1   # "classpruning-denoise"
    .venv/bin/python benchmarks/bench_classpruning.py --set finetune_steps=450 --cp target_macs_fraction=0.5

``--set`` changes a harness setting (:class:`~nmrestore.bench.BenchConfig`), ``--cp`` a ClassPruning
setting (:class:`~nmrestore.methods.classpruning.ClassPruningConfig`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, load_results, publish, results_path, save_results  # noqa: E402
from _report import markdown_table as md_table  # noqa: E402
from nmrestore.bench.classpruning import register_bench_rows, uniform_n_for  # noqa: E402
from nmrestore.bench.config import BenchConfig, config_from_overrides, copy_config, test_source  # noqa: E402
from nmrestore.bench.harness import run_benchmark  # noqa: E402
from nmrestore.bench.report import describe, format_table, markdown_table, plot_psnr_macs  # noqa: E402
from nmrestore.bench.routing_bound import RoutedScore, RoutingBound, routing_bound  # noqa: E402
from nmrestore.engine.evaluate import evaluate_fn  # noqa: E402
from nmrestore.engine.runner import model_from_checkpoint  # noqa: E402
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, oracle_routes, patchwise_restore  # noqa: E402
from nmrestore.methods.classpruning.routes import layer_route_ns  # noqa: E402
from nmrestore.runtime.timing import interleaved  # noqa: E402
from nmrestore.sparsity.parametrization import use_route  # noqa: E402

DOCS = ROOT / "docs"
SECTION = "classpruning"
PSNR_MARGIN = 0.05
MACS_LIMIT = 0.60
COLLAPSE_SHARE = 0.9


def _fmt(value: Any, digits: int) -> str:
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def label_rule(settings: dict[str, Any]) -> str:
    """The labelling rule of this run, in words."""
    from nmrestore.bench.classpruning import BENCH_SETTINGS

    cfg = {**BENCH_SETTINGS, **settings}
    if cfg["labels"] == "budget":
        return (
            f"the routes with the least total squared error on the training patches at "
            f"{cfg['target_macs_fraction']:.0%} average MACs"
        )
    if cfg["labels"] == "quantile":
        return "ClassSR's PSNR terciles"
    return f"the cheapest route within {cfg['delta']} dB of the full one"


def shared_route_rows(
    adaptive: torch.nn.Module,
    stage_a: torch.nn.Module,
    eval_set: Any,
    crop: int,
    y_channel: bool,
) -> list[dict[str, Any]]:
    """Each shared route alone on whole images, after stage A and in the final model (what stage C cost)."""
    rows = []
    ns = layer_route_ns(adaptive)
    per_route = list(zip(*ns.values(), strict=True)) if ns else []
    with torch.no_grad():
        for k, route_n in enumerate(per_route):
            label = f"{route_n[0]}:32" if len(set(route_n)) == 1 else f"route {k}"
            scores = []
            for model in (stage_a, adaptive):
                with use_route(model, k):
                    scores.append(evaluate_fn(lambda x, m=model: m(x), eval_set, crop, y_channel))
            rows.append(
                {
                    "method": f"ClassPruning route {k} ({label}) alone, whole image: after stage A / final",
                    "psnr": f"{scores[0].psnr:.3f} / {scores[1].psnr:.3f}",
                    "ssim": f"{scores[0].ssim:.4f} / {scores[1].ssim:.4f}",
                }
            )
    return rows


def ideal_routing_rows(
    config: Any,
    settings: dict[str, Any],
    cp: dict[str, Any],
    static_rows: list[dict[str, Any]],
    pipeline: AdaptivePipeline,
    samples: list[dict[str, Any]],
    crop: int,
    y_channel: bool,
    work_dir: Path,
    notes: list[str],
    echo: Any,
) -> tuple[list[dict[str, Any]], RoutingBound | None]:
    """:func:`routing_bound` over SR-STE models at the routes' N (uniform routes only)."""
    from nmrestore.bench.classpruning import BENCH_SETTINGS

    cfg = {**BENCH_SETTINGS, **settings}
    if cfg.get("route_budgets") or cfg.get("m", 32) != 32:
        notes.append("routing bound skipped: it needs uniform N:32 routes")
        return [], None
    ns = [int(n) for n in cfg["routes"]]
    cheaper = [n for n in ns if n < 32]
    ideal_config = copy_config(
        config,
        methods=("srste",),
        budgets=tuple(f"{n}:32" for n in cheaper),
        finetune_steps=cp["finetune_steps"],
        work_dir=work_dir / "ideal",
    )
    echo(f"routing bound: SR-STE at {', '.join(f'{n}:32' for n in cheaper)} as independent routes")
    run_benchmark(ideal_config, notes, echo=echo)
    paths = [work_dir / "ideal" / f"srste-{n}of32" / "checkpoints" / "last.safetensors" for n in cheaper]
    if ns[-1] == 32:
        paths.append(work_dir / "static" / "dense_ft" / "checkpoints" / "last.safetensors")
    models = [model_from_checkpoint(p)[0].eval() for p in paths]
    costs = pipeline.costs((pipeline.patch_size, pipeline.patch_size)).fractions()
    bound = routing_bound(  # route costs are per patch here, so is the target
        models,
        costs,
        cp["macs_fraction_per_patch"],
        samples,
        config.scale,
        crop,
        y_channel,
        pipeline.patch_size,
        pipeline.stride,
        pipeline.blend,
    )
    names = [f"SR-STE {n}:32" if n < 32 else "dense fine-tuned" for n in ns]

    def row(label: str, score: RoutedScore) -> dict[str, Any]:
        return {
            "routing": label,
            "PSNR": f"{score.psnr:.3f}",
            "SSIM": f"{score.ssim:.4f}",
            "MACs %": f"{100 * score.macs_fraction:.2f}",
            "routes": "/".join(map(str, score.histogram)),
        }

    rows = [row(f"every patch on {name}", s) for name, s in zip(names, bound.single_route, strict=True)]
    rows.append(row("expected error (no ground truth)", bound.expected))
    rows.append(row("ground-truth oracle", bound.oracle))
    for r in static_rows:
        if r["method"] in ("oneshot", "srste"):
            rows.append(
                {
                    "routing": f"static {r['method']} {r['budget']}, whole image",
                    "PSNR": f"{r['psnr']:.3f}",
                    "SSIM": f"{r['ssim']:.4f}",
                    "MACs %": f"{100 * r['macs_fraction']:.2f}",
                    "routes": "-",
                }
            )
    return rows, bound


def wall_times(
    dense: torch.nn.Module, adaptive: torch.nn.Module, samples: list[dict[str, Any]], rounds: int
) -> dict[str, float]:
    """Median seconds to restore every test image, per mode, modes interleaved in rotating order."""
    batched = AdaptivePipeline(adaptive, batch_size=64)
    one_by_one = AdaptivePipeline(adaptive, batch_size=1)
    patch, stride = batched.patch_size, batched.stride
    modes = {
        "dense, whole image": lambda x: dense(x),
        "ClassPruning, batched per route": batched.restore,
        "ClassPruning, patch at a time (ClassSR)": one_by_one.restore,
        "dense, patches batched": lambda x: patchwise_restore(dense, x, patch, stride, blend=batched.blend),
    }
    images = [s["lq"].unsqueeze(0) for s in samples]

    def restore_all(mode: Any) -> None:
        for x in images:
            mode(x)

    with torch.no_grad():
        timings = interleaved({k: partial(restore_all, mode) for k, mode in modes.items()}, rounds, warmup=1)
    return {k: timings.median(k) for k in modes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the harness's smoke-sized preset")
    parser.add_argument(
        "--set", action="append", default=[], help="a BenchConfig field, e.g. finetune_steps=450"
    )
    parser.add_argument("--cp", action="append", default=[], help="a ClassPruning setting, e.g. delta=0.05")
    parser.add_argument("--wall-rounds", type=int, default=5, help="timed rounds of the inference comparison")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-classpruning")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from its docs/bench JSON"
    )
    args = parser.parse_args(argv)

    config = config_from_overrides(args.quick, [*args.set, "methods=[classpruning]"])
    if args.render:
        draw(section_key(config), load_results(section_key(config)))
        publish(section_key(config), render)
        return 0
    settings = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in args.cp)}
    register_bench_rows(settings)
    echo = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    config = copy_config(config, work_dir=args.work_dir)
    notes: list[str] = []
    rows = run_benchmark(config, notes, echo=echo)
    cp = next(r for r in rows if r["method"] == "classpruning")
    dense_row = next(r for r in rows if r["method"] == "dense")

    # static N:M of (at least) the same average MACs, same number of SR-weight steps
    from nmrestore.bench.config import dense_recipe, ensure_dense

    dense_ckpt = ensure_dense(config)  # cached: no training here
    dense_model, _ = model_from_checkpoint(dense_ckpt.path)
    dense_model.eval()
    n_static, static_fraction = uniform_n_for(dense_model, cp["macs_fraction"])
    budget = f"{n_static}:32"
    echo(f"static budget matching {cp['macs_fraction']:.1%}: {budget} ({static_fraction:.1%})")
    static_config = copy_config(
        config,
        methods=("dense_ft", "oneshot", "srste"),
        budgets=(budget,),
        finetune_steps=cp["finetune_steps"],
        work_dir=args.work_dir / "static",
    )
    static_rows = run_benchmark(static_config, notes, echo=echo)
    rows += [r for r in static_rows if r["method"] not in ("bicubic", "input", "dense")]

    # references on patches, and the adaptive model's own routes on whole images
    adaptive, _ = model_from_checkpoint(args.work_dir / "classpruning" / "checkpoints" / "best.safetensors")
    adaptive.eval()
    from nmrestore.engine.runner import build_eval_dataset

    dense_cfg = dense_recipe(config)
    # the images the harness scored the rows on (the dense recipe validates on held-out strips now)
    eval_set = build_eval_dataset(test_source(config), config.scale, dense_cfg.task)
    crop, y_channel = (config.scale, True) if config.task == "sr" else (0, False)
    pipeline = AdaptivePipeline(adaptive)
    with torch.no_grad():
        dense_patches = evaluate_fn(
            lambda x: patchwise_restore(
                dense_model, x, pipeline.patch_size, pipeline.stride, blend=pipeline.blend
            ),
            eval_set,
            crop,
            y_channel,
        )
    stage_a, _ = model_from_checkpoint(
        args.work_dir / "classpruning" / "stage_a" / "checkpoints" / "last.safetensors"
    )
    route_rows = shared_route_rows(adaptive, stage_a.eval(), eval_set, crop, y_channel)
    # the routing bound of these routes: patches routed by the ground truth at the same average MACs
    samples = [eval_set[i] for i in range(len(eval_set))]
    oracle = oracle_routes(pipeline, samples, crop, y_channel, cp["macs_fraction_per_patch"])
    routed = iter(oracle)
    with torch.no_grad():
        oracle_eval = evaluate_fn(lambda x: pipeline(x, next(routed)).output, samples, crop, y_channel)
    oracle_hist = torch.bincount(torch.cat(oracle), minlength=len(cp["route_histogram"])).tolist()
    extra = [
        {
            "method": f"dense on the same {pipeline.patch_size}/{pipeline.stride} patches ({pipeline.blend} blend)",
            "psnr": dense_patches.psnr,
            "ssim": dense_patches.ssim,
        },
        *route_rows,
        {
            "method": f"oracle routing of these routes at the same MACs (ground truth picks the routes; a bound, "
            f"not a method), routes {'/'.join(map(str, oracle_hist))}",
            "psnr": oracle_eval.psnr,
            "ssim": oracle_eval.ssim,
        },
    ]

    # the bound of the idea: independently trained routes, routed by their expected error or the truth
    bound_rows, bound = ideal_routing_rows(
        config, settings, cp, static_rows, pipeline, samples, crop, y_channel, args.work_dir, notes, echo
    )

    walls = wall_times(dense_model, adaptive, [eval_set[i] for i in range(len(eval_set))], args.wall_rounds)
    base = walls["dense, whole image"]
    wall_rows = [
        {"mode": k, "seconds (3 images)": v, "ratio to whole-image dense": v / base} for k, v in walls.items()
    ]

    # claims
    oneshot = next((r for r in rows if r["method"] == "oneshot"), None)
    srste = next((r for r in rows if r["method"] == "srste"), None)
    hist = cp["route_histogram"]
    share = max(hist) / max(sum(hist), 1)
    checks = [
        (
            f"whole-image MACs {cp['macs_fraction']:.1%} <= {MACS_LIMIT:.0%} of dense run once on each image "
            f"(overlap, classifier and blending included; per patch, ClassSR's convention: "
            f"{cp['macs_fraction_per_patch']:.1%})",
            cp["macs_fraction"] <= MACS_LIMIT,
        ),
        (
            f"PSNR {cp['psnr']:.3f} within {PSNR_MARGIN} dB of dense {dense_row['psnr']:.3f} "
            f"(gap {cp['psnr'] - dense_row['psnr']:+.3f} dB)",
            cp["psnr"] >= dense_row["psnr"] - PSNR_MARGIN,
        ),
        (
            f"PSNR within {PSNR_MARGIN} dB of dense on the same patches {dense_patches.psnr:.3f} "
            f"(gap {cp['psnr'] - dense_patches.psnr:+.3f} dB)",
            cp["psnr"] >= dense_patches.psnr - PSNR_MARGIN,
        ),
    ]
    for label, row in (("one-shot", oneshot), ("SR-STE", srste)):
        if row is not None:
            checks.append(
                (
                    f"PSNR above {label} {budget} ({row['psnr']:.3f} dB, {row['macs_fraction']:.1%} MACs): "
                    f"{cp['psnr'] - row['psnr']:+.3f} dB",
                    cp["psnr"] > row["psnr"],
                )
            )
    if bound is not None:
        best = max((r for r in (oneshot, srste) if r is not None), key=lambda r: r["psnr"], default=None)
        if best is not None:
            checks.append(
                (
                    f"bound: independently trained routes with expected-error routing (no classifier, no "
                    f"shared weights) reach {bound.expected.psnr:.3f} dB at {bound.expected.macs_fraction:.1%} "
                    f"MACs, against {best['method']} {budget} {best['psnr']:.3f} dB: "
                    f"{bound.expected.psnr - best['psnr']:+.3f} dB",
                    bound.expected.psnr > best["psnr"],
                )
            )
    checks.append(
        (
            f"no collapse: the largest route holds {share:.0%} of patches ({'/'.join(map(str, hist))})",
            share < COLLAPSE_SHARE,
        )
    )

    print(format_table(rows))
    for row in extra:
        print(f"{row['method']}: PSNR {_fmt(row['psnr'], 3)} SSIM {_fmt(row['ssim'], 4)}")
    for row in bound_rows:
        print("  ".join(f"{k} {v}" for k, v in row.items()))
    for row in wall_rows:
        print(
            f"{row['mode']:<42} {row['seconds (3 images)']:.3f} s  x{row['ratio to whole-image dense']:.2f}"
        )
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}: {text}")
    for note in notes:
        print(f"note: {note}")
    per_image = [
        {
            "image": r["name"],
            "PSNR": r["psnr"],
            "SSIM": r["ssim"],
            "patches": r["patches"],
            "routes": "/".join(map(str, r["route_histogram"])),
            "MACs % (whole image)": 100 * r["macs_fraction"],
            "MACs % (per patch)": 100 * r["macs_fraction_per_patch"],
        }
        for r in cp["per_image"]
    ]
    key = section_key(config)
    copied = []
    if not args.no_write:
        for path in sorted((args.work_dir / "classpruning" / "class_maps").glob("*_classmap.png")):
            target = DOCS / f"bench_{key.replace('-', '_')}_{path.name}"
            shutil.copyfile(path, target)
            copied.append(target.name)
    data = {
        "config": static_config.model_dump(mode="json"),
        "routes": cp["routes"],
        "cp_note": cp["note"],
        "label_rule": label_rule(settings),
        "budget": budget,
        "rows": rows,
        "extra": extra,
        "bound": bound_rows,
        "per_image": per_image,
        "wall": wall_rows,
        "wall_rounds": args.wall_rounds,
        "checks": [{"check": text, "ok": ok} for text, ok in checks],
        "notes": notes,
        "class_maps": copied,
    }
    payload = in_memory(data) if args.no_write else save_results(key, data)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print(render(key, payload)[1])
    if not args.no_write:
        draw(key, payload)
        publish(key, render)
        print(f"{results_path(key).relative_to(ROOT)} and docs/BENCHMARKS.md section {key!r} written")
    return 0


def section_key(config: BenchConfig) -> str:
    return SECTION + ("" if config.task == "sr" else f"-{config.task}") + ("-quick" if config.quick else "")


def _plot_path(key: str) -> Path:
    return DOCS / f"bench_{key.replace('-', '_')}_psnr_macs.png"


def draw(key: str, payload: dict[str, Any]) -> None:
    """The PSNR-against-MACs plot, from the saved rows (the class maps are copied by the run itself)."""
    config = BenchConfig(**payload["config"])
    what = f"x{config.scale}" if config.task == "sr" else config.task
    plot_psnr_macs(
        [r for r in payload["rows"] if r["method"] not in ("bicubic", "input")],
        _plot_path(key),
        f"ClassPruning vs static N:M, {config.model} {what}",
    )


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved rows (``docs/bench/classpruning*.json``)."""
    config = BenchConfig(**payload["config"])
    extra, bound_rows, per_image, wall_rows = (
        payload["extra"],
        payload["bound"],
        payload["per_image"],
        payload["wall"],
    )
    notes, budget = payload["notes"], payload["budget"]
    body = "\n".join(
        [
            describe(config),
            "",
            f"ClassPruning: routes {payload['routes']} over one weight tensor, classifier on 32x32 LR patches "
            f"(stride 28), labels: {payload['label_rule']}; {payload['cp_note']}. "
            f"'MACs %' of ClassPruning is its whole-image figure: everything the patch pipeline computes on "
            f"the test images (overlap, classifier and blending included) against the dense net run once on "
            f"each whole image; the static budget {budget} is the smallest uniform N:32 with at least as many "
            f"MACs.",
            "",
            markdown_table(payload["rows"]),
            "",
            md_table(
                [{k: (f"{v:.3f}" if isinstance(v, float) else v) for k, v in r.items()} for r in extra],
                ["method", "psnr", "ssim"],
            ),
            "",
            *(
                [
                    "The bound of the idea on these images: each route an independently trained model "
                    "(SR-STE at the route's N:32, the dense model fine-tuned as the full route, all with the "
                    "same steps), the test patches routed at ClassPruning's average MACs (route costs as "
                    "ClassPruning's, classifier included) by the error each cheaper route adds to the full "
                    "route's output (what a perfect classifier would predict, no ground truth), or by the "
                    "ground truth itself (which also exploits the test images' noise):",
                    "",
                    md_table(bound_rows, list(bound_rows[0])),
                    "",
                ]
                if bound_rows
                else []
            ),
            "Per test image (ClassPruning):",
            "",
            md_table(per_image, list(per_image[0])),
            "",
            "Inference wall time on the 3 test images (median of "
            f"{payload['wall_rounds']} interleaved rounds, this machine, same run; masked weights run dense, so "
            "wall time shows batching, not sparsity):",
            "",
            md_table(wall_rows, list(wall_rows[0])),
            "",
            "Checks:",
            "",
            *[f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']}" for c in payload["checks"]],
            "",
            *([("Notes:"), "", *[f"- {n}" for n in notes], ""] if notes else []),
            f"![PSNR against MACs]({_plot_path(key).name})",
            "",
            *[f"![class map]({name})" for name in payload["class_maps"]],
        ]
    )
    title = "ClassPruning: input-adaptive N:M against static N:M of the same MACs"
    return title + ("" if config.task == "sr" else f" ({config.task})"), body


if __name__ == "__main__":
    sys.exit(main())
