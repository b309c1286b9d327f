"""PNG benchmark (Jiang et al., CVPRW 2021; docs/ARCHITECTURE.md): one multi-task network for SR x2/x3/x4 against separate models.

The rows come from the benchmark harness (method ``png``, :mod:`nmrestore.bench.png`); this
script adds the storage report, the paper-scale storage bounds and the checks.

Protocol, on the built-in photos (train split for training, test split for scoring, Y PSNR/SSIM,
crop = scale; nothing is selected on the test images):

* **PNG**: ``edsr_small_multiscale`` (edsr_small's trunk shared by x2/x3/x4, one upsampler per
  task), M = 8, N_t = 4 for every task, ``max_grow`` = 1. Task x2: ``dense`` steps dense, prune to
  4:8, ``finetune`` steps; x3 and x4: ``grow`` steps with the earlier tasks' positions frozen, prune,
  ``finetune`` steps.
* **dense**: per task, the same network trained on that task alone from the *same start* as PNG
  (PNG's x2 model after its dense phase) for the *same steps* PNG spends on the task after that
  point (x2: its fine-tune; x3, x4: grow + fine-tune), cached like the harness's dense models.

``--photos DIR`` runs it on the photo set (``nmrestore data photos``) with the photo study's model
(EDSR-baseline family, 8 blocks, global bicubic skip), validated on the valid split and scored on
the test split with paired 95% intervals.

Printed, saved to ``docs/bench/png.json`` and rendered from it into the ``png`` section of
``docs/BENCHMARKS.md`` (``--render`` redraws the section from the JSON): per task PSNR/SSIM against
the dense model (target: within 0.1 dB), MACs at 720p and the prunable fraction (= N_t/M); the
storage of the multi-task model measured on its packed form against T dense and T N:M models;
the guaranteed worst-case storage of the same PNG setting at paper scale; and checks (earlier tasks
bit-identical after later tasks trained, N:M pattern, storage adds up).

Run from the repository root (each part is cached/resumable, so the dense baselines and the PNG run
can go in two processes first, then a last call assembles the report)::

    .venv/bin/python benchmarks/bench_png.py --quick --no-write     # smoke test, ~3 minutes
    .venv/bin/python benchmarks/bench_png.py --only png              # the PNG schedule alone
    .venv/bin/python benchmarks/bench_png.py                         # baselines and report
    .venv/bin/python benchmarks/bench_png.py --render                # redraw the section from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, markdown_table, publish, results_path, save_results  # noqa: E402
from nmrestore.bench.config import BenchConfig, Row, test_source  # noqa: E402
from nmrestore.bench.evidence import format_delta  # noqa: E402
from nmrestore.bench.harness import run_benchmark  # noqa: E402
from nmrestore.bench.png import (  # noqa: E402
    TASKS,
    PNGBenchSettings,
    png_recipe,
    prepare,
    register_bench_rows,
    run_png,
    task_steps,
)
from nmrestore.engine.evaluate import bicubic_restorer, evaluate_fn  # noqa: E402
from nmrestore.engine.runner import build_eval_dataset, model_from_checkpoint  # noqa: E402
from nmrestore.methods.png import PNGConfig  # noqa: E402
from nmrestore.methods.png.program import png_schedule  # noqa: E402
from nmrestore.methods.png.storage import png_storage, storage_bound  # noqa: E402
from nmrestore.methods.png.tasks import use_png_task  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.models.multitask import MultiScaleRCAN  # noqa: E402
from nmrestore.recipes.schema import Recipe, TaskSpec  # noqa: E402
from nmrestore.sparsity import check_nm  # noqa: E402

SECTION = "png"
TITLE = "PNG: one network for SR x2/x3/x4 (multi-task N:M prune-and-grow)"
TOLERANCE_DB = 0.1
STORAGE_TARGET = 1.2

FULL = PNGBenchSettings()
QUICK = PNGBenchSettings(dense=40, grow=20, finetune=10)


def section_key(args: argparse.Namespace) -> str:
    return SECTION + ("-photos" if args.photos is not None else "") + ("-quick" if args.quick else "")


def bench_config(args: argparse.Namespace, settings: PNGBenchSettings) -> BenchConfig:
    """The harness run: its dense model is the x2 baseline (same steps as PNG spends on x2)."""
    per_task = task_steps(png_recipe(BenchConfig(), settings))
    photos: dict[str, object] = {}
    if args.photos is not None:
        # The photo study's model, data and dense recipe: the harness's own dense model (unused by the
        # PNG rows) is then the study's cached x2 model, not a second training.
        photos = {
            "model": "edsr_baseline",
            "model_kwargs": {"n_blocks": 8, "global_skip": True},
            "patch_size": 24,
            **({} if args.quick else {"dense_steps": 2500}),
            "data_root": args.photos,
            "cache_dir": args.cache_dir,
        }
    return BenchConfig(
        **{
            "model": "edsr_small",
            "scale": 2,
            "dense_steps": per_task["x2"],
            "methods": ("png",),
            "max_test_images": 1 if args.quick else None,
            "threads": args.threads,
            "timing_rounds": args.timing_rounds,
            "device": "cpu",
            **photos,
        }
    )


#: Displayed columns: header -> (row key, scale factor or None).
DISPLAY: dict[str, tuple[str, float | None]] = {
    "task": ("task", None),
    "method": ("method", None),
    "budget": ("budget", None),
    "steps": ("finetune_steps", None),
    "PSNR": ("psnr", None),
    "SSIM": ("ssim", None),
    "GMACs": ("macs_g", None),
    "MACs %": ("macs_fraction", 100.0),
    "prunable %": ("prunable_macs_fraction", 100.0),
    "params (nz)": ("params_nonzero", None),
    "packed B": ("packed_bytes", None),
    "step x": ("step_time_ratio", None),
    "PSNR - dense": ("psnr_minus_dense", None),
    "vs dense [95% CI]": ("vs_dense", None),
}


def display_row(row: Row) -> dict[str, object]:
    """A row as the Markdown table shows it (percentages, short names)."""
    out: dict[str, object] = {}
    for header, (key, factor) in DISPLAY.items():
        value = row.get(key)
        if value is None:
            out[header] = ""
        elif factor is not None and isinstance(value, float):
            out[header] = value * factor
        elif key == "psnr" and isinstance(value, float):
            out[header] = f"{value:.3f}"
        elif key == "psnr_minus_dense" and isinstance(value, float):
            out[header] = f"{value:+.3f}"
        elif key == "vs_dense":
            out[header] = format_delta(value)
        else:
            out[header] = value
    return out


def earlier_tasks_unchanged(run_dir: Path, recipe: Recipe, final: nn.Module) -> list[tuple[str, bool]]:
    """Task r's output at the end of its own fine-tuning equals the final model's (bit for bit)."""
    checks = []
    schedule = png_schedule(recipe, [name for name, _ in TASKS], [scale for _, scale in TASKS])
    x = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    for spec in schedule:
        if spec.phase != "finetune" or spec.task == 2:
            continue
        model, _ = model_from_checkpoint(run_dir / "phases" / spec.name / "checkpoints" / "last.safetensors")
        model.eval()
        final.eval()
        with torch.no_grad(), use_png_task(model, spec.task), use_png_task(final, spec.task):
            same = torch.equal(model(x), final(x))
        checks.append(
            (f"{spec.task_name} computes bit-identical outputs after every later task trained", same)
        )
    return checks


def no_worse_than_bicubic(rows: list[Row], config: BenchConfig) -> tuple[str, bool]:
    """Every dense and PNG model at least as good as bicubic on every test image, at its task's scale."""
    worst: tuple[float, str] | None = None
    for scale in sorted({int(r["scale"]) for r in rows}):
        dataset = build_eval_dataset(test_source(config), scale, TaskSpec())
        bicubic = {r["name"]: r["psnr"] for r in evaluate_fn(bicubic_restorer(scale), dataset, scale).per_image}
        for row in (r for r in rows if int(r["scale"]) == scale):
            for image in row["per_image"]:
                margin = image["psnr"] - bicubic[image["name"]]
                if worst is None or margin < worst[0]:
                    worst = (margin, f"{row['task']} {row['method']} on {image['name']}")
    assert worst is not None
    text = f"every model ({len(rows)}) at least as good as bicubic on every test image (closest: {worst[1]}, {worst[0]:+.3f} dB)"
    return text, worst[0] >= 0


def paper_scale_bounds(config: PNGConfig) -> list[dict[str, object]]:
    """Worst-case PNG storage at paper scale (any training), from shapes on the meta device."""
    rows = []
    builders = {
        "edsr_baseline_multiscale": lambda: create_model("edsr_baseline_multiscale", scale=2),
        "msrresnet_multiscale": lambda: create_model("msrresnet_multiscale", scale=2),
        "rcan (10x20, 64 ch) multiscale": lambda: MultiScaleRCAN(),
        "edsr_small_multiscale": lambda: create_model("edsr_small_multiscale", scale=2),
    }
    for name, build in builders.items():
        with torch.device("meta"):
            model = build()
        bound = storage_bound(model, config)
        rows.append(
            {
                "model": name,
                "one dense (MB)": bound["one_dense_bytes"] / 1e6,
                "PNG worst case (MB)": bound["png_bytes_bound"] / 1e6,
                "x one dense (mean)": bound["png_vs_one_dense_bound"],
                "x smallest dense": bound["png_vs_smallest_dense_bound"],
                "3 dense (x)": 3.0,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny step counts (smoke test)")
    parser.add_argument("--only", choices=["png"], default=None, help="train the PNG run and stop")
    parser.add_argument("--photos", type=Path, default=None, help="the photo set (nmrestore data photos)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache/nmrestore/photos-study/dense",
        help="with --photos: where the runs are cached (default: beside the photo study's dense models)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--timing-rounds", type=int, default=7)
    parser.add_argument("--json", type=Path, default=None, help="write rows, checks and storage as JSON")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from docs/bench/png.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        publish(section_key(args), render)
        return 0
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    config = bench_config(args, settings)
    started = time.perf_counter()
    if args.only is not None:
        run_png(png_recipe(config, settings), cache_dir=config.cache_dir)
        print(f"done in {time.perf_counter() - started:.0f} s")
        return 0

    register_bench_rows(settings)
    harness_rows = run_benchmark(config, echo=lambda line: print(line, file=sys.stderr, flush=True))
    rows = [r for r in harness_rows if str(r["task"]).startswith("sr_x")]
    recipe, run_dir, _ = prepare(config, settings)  # cached by now: nothing trains here
    model, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.safetensors")
    model.eval()
    storage = png_storage(model)
    png_config = recipe.sparsity
    assert isinstance(png_config, PNGConfig)
    checks: list[tuple[str, bool]] = []
    for row in rows:
        if row["method"] == "png":
            gap = -row["psnr_minus_dense"]
            delta = row.get("vs_dense")
            # within the tolerance means the whole interval of PNG - dense lies above -TOLERANCE_DB
            ok = gap <= TOLERANCE_DB if delta is None else delta["low"] >= -TOLERANCE_DB
            interval = "" if delta is None else f"; PNG - dense = {format_delta(delta)}"
            checks.append(
                (f"{row['task']}: PNG within {TOLERANCE_DB} dB of dense (gap {gap:+.3f} dB{interval})", ok)
            )
            n, m = (int(v) for v in str(row["budget"]).split(":"))
            exact = abs(row["prunable_macs_fraction"] - n / m) < 1e-9
            checks.append(
                (f"{row['task']}: prunable MACs {row['prunable_macs_fraction']:.6f} = {n}/{m}", exact)
            )
    summary = storage.summary()
    checks.append(
        (
            f"storage {summary['png_vs_one_dense']:.3f}x one dense model (mean of the 3) <= {STORAGE_TARGET}",
            summary["png_vs_one_dense"] <= STORAGE_TARGET,
        )
    )
    checks.append(
        (
            f"storage {summary['png_vs_smallest_dense']:.3f}x the smallest dense model (x2) <= {STORAGE_TARGET}",
            summary["png_vs_smallest_dense"] <= STORAGE_TARGET,
        )
    )
    checks += earlier_tasks_unchanged(run_dir, recipe, model)
    if recipe.task.kind == "sr":
        checks.append(no_worse_than_bicubic(rows, config))
    check_nm(model)  # raises on any task's mask that breaks N:M
    checks.append(("every task's mask obeys N:M (check_nm over all routes)", True))
    x3 = {row["method"]: row for row in rows if row["task"] == "sr_x3"}
    timing = {"dense_ms": x3["dense"]["step_ms"], "png_ms": x3["png"]["step_ms"]}
    timing["ratio"] = timing["png_ms"] / timing["dense_ms"]

    parts = [
        ("PNG (measured, packed)", storage.total_bytes),
        ("  shared values (union of kept positions)", storage.shared_values_bytes),
        ("  per-task masks on shared layers", storage.shared_mask_bytes),
        ("  shared dense (first/last conv, biases)", storage.shared_dense_bytes),
        ("  task layers (3 upsamplers, 4:8 packed)", storage.task_bytes),
        ("3 separate dense models", storage.separate_dense_bytes),
        ("3 separate 4:8 models (packed)", storage.separate_nm_bytes),
    ]
    data = {
        "quick": args.quick,
        "settings": settings.model_dump(mode="json"),
        "png": {
            "m": png_config.m,
            "ns": list(png_config.ns),
            "max_grow": png_config.max_grow,
            "union_bound": png_config.union_bound(),
        },
        "test_images": config.max_test_images,
        "protocol": {
            "model": config.model,
            "model_kwargs": config.model_kwargs,
            "patch_size": config.patch_size,
            "batch_size": config.batch_size,
            "lr": config.dense_lr,
            "photos": config.data_root is not None,
            "ci_tile": config.ci_tile,
        },
        "rows": rows,
        "storage": {
            "summary": summary,
            "one_dense_bytes": storage.one_dense_bytes,
            "union_fraction": storage.union_fraction,
            "smallest_dense_bytes": min(t.dense_model_bytes for t in storage.tasks),
            "task_bytes": storage.task_bytes,
            "parts": [
                {"what": what, "bytes": size, "x one dense": size / storage.one_dense_bytes}
                for what, size in parts
            ],
        },
        "bounds": paper_scale_bounds(png_config),
        "timing": {**timing, "rounds": args.timing_rounds},
        "checks": [{"check": c, "ok": ok} for c, ok in checks],
    }
    key = section_key(args)
    payload = in_memory(data) if args.no_write else save_results(key, data)
    print(render(key, payload)[1])
    print(storage.table())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if not args.no_write:
        publish(key, render)
        print(f"{results_path(key).relative_to(ROOT)} and section {key!r} of docs/BENCHMARKS.md written")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved rows and storage report (``docs/bench/png.json``)."""
    settings, png, storage, timing = (
        payload["settings"],
        payload["png"],
        payload["storage"],
        payload["timing"],
    )
    summary = storage["summary"]
    table = markdown_table([display_row(r) for r in payload["rows"]], list(DISPLAY))
    storage_table = markdown_table(storage["parts"], ["what", "bytes", "x one dense"])
    bound_table = markdown_table(
        payload["bounds"],
        ["model", "one dense (MB)", "PNG worst case (MB)", "x one dense (mean)", "x smallest dense"],
    )
    check_lines = "\n".join(f"- {'PASS' if c['ok'] else 'FAIL'}: {c['check']}" for c in payload["checks"])
    test_images = "all" if payload["test_images"] is None else payload["test_images"]
    proto = payload["protocol"]
    model = proto["model"]
    blocks = proto["model_kwargs"].get("n_blocks")
    trunk = f"{model}'s trunk" + (f" with {blocks} blocks" if blocks else "")
    if proto["model_kwargs"].get("global_skip"):
        trunk += ", global bicubic skip"
    data = (
        f"Trained on the photo set's train split, validated on its valid split (logs only), scored on {test_images} test photographs"
        if proto["photos"]
        else f"Trained on the built-in training photos (validated on held-out strips, logs only), scored on {test_images} built-in test images"
    )
    small_note = (
        " At this CPU size the three upsamplers dominate: edsr_small's trunk is 9 convs of 32x32x3x3, the "
        "x2+x3+x4 upsamplers weigh as much as 21 of them. With EDSR-baseline's 16-block trunk (33 such convs) the "
        "same setting is bounded by 1.055x the x2 model whatever training does (below)."
        if model == "edsr_small"
        else ""
    )
    body = f"""
Setup: PNG on `{model}_multiscale` ({trunk}, shared by x2/x3/x4;
one upsampler per task), M = {png["m"]}, N = {"/".join(map(str, png["ns"]))} (x2/x3/x4), max_grow = {png["max_grow"]}
(a later task claims at most {png["max_grow"]} free position per group of {png["m"]}, so the union of kept shared
positions is at most {png["union_bound"]}/{png["m"]} of the shared weights whatever training does). Steps: x2
{settings["dense"]} dense + {settings["finetune"]} fine-tune after the prune; x3 and x4 {settings["grow"]} grow + {settings["finetune"]}
fine-tune; lr {proto["lr"]:g} (fine-tune x0.2), batch {proto["batch_size"]}, LR patch {proto["patch_size"]}, L1. Dense baselines: the same
network trained on each task alone from *PNG's own start* (its weights after the x2 dense phase) for the steps PNG
spends on that task after it (x2: {settings["finetune"]}; x3, x4: {settings["grow"]} + {settings["finetune"]}, with PNG's lr drops), so
sharing and sparsity are the only differences. {data}; Y PSNR/SSIM, crop = scale; the last checkpoints are used
(nothing selected on test images). "vs dense" is the paired difference with its 95% bootstrap interval over
fixed {proto["ci_tile"]}x{proto["ci_tile"]} HR tiles. MACs for a 1280x720 output; "prunable %" = effective / dense MACs of
the layers the task runs under N:M.

{table}

Storage (fp32 values; masks as bitmaps or packed in-group indices, whichever is smaller; measured on the packed
form that `unpack_png_` restores bit-exactly; "one dense model" = the mean of the three single-task dense models,
{storage["one_dense_bytes"]:,.0f} B; union of kept shared positions: {storage["union_fraction"]:.1%}):

{storage_table}

Against the *smallest* single-task model (x2, {storage["smallest_dense_bytes"]:,} B) PNG is
{summary["png_vs_smallest_dense"]:.3f}x; the task layers alone (4:8 packed) are
{storage["task_bytes"] / storage["one_dense_bytes"]:.2f}x one dense model.{small_note}

Worst case of the same setting (M = {png["m"]}, N = 4/4/4, max_grow = {png["max_grow"]}) at paper scale, from shapes
alone (holds for any training; "smallest" = the x2 model):

{bound_table}

Training-step time, task x3 with the earlier tasks' positions frozen (hook + restore after each step) vs the dense
x3 model, same batch, interleaved (median of {timing["rounds"]}): dense {timing["dense_ms"]:.0f} ms, PNG
{timing["png_ms"]:.0f} ms ({timing["ratio"]:.2f}x).

Checks:

{check_lines}
"""
    return TITLE + (" (quick)" if payload["quick"] else ""), body


if __name__ == "__main__":
    sys.exit(main())
