"""The benchmark harness: the CPU protocol (docs/ARCHITECTURE.md) as one function, :func:`run_benchmark`.

One dense model per (architecture, scale, data, schedule) is trained once on the training photos
(the built-in ones, or the ``train`` split of ``data_root`` such as the 2K photo set) and cached under
a hash of its recipe; every method is then fine-tuned from that checkpoint for the *same* number of
steps and scored on the test photos (Y PSNR/SSIM, crop = scale), next to bicubic and the dense model
itself. Validation never uses the test photos: it runs on ``data_root``'s ``valid`` split, or on the
held-out strips of the training photos, and only at the end (no checkpoint is selected). Each row
keeps its per-image PSNR and the PSNR of every fixed ``ci_tile`` HR tile, from which
:mod:`nmrestore.bench.evidence` computes paired 95% confidence intervals. A killed run continues:
the dense model and each fine-tune resume from their last checkpoints. Each row also carries the cost at a 1280x720 output
(effective MACs, whole-network and prunable-only fractions, non-zero params, packed bytes) and the
training-step time relative to the dense model, measured in the same process, interleaved.
With ``BenchConfig.task`` = ``deblur`` / ``denoise`` the same protocol runs at scale 1 on photos
degraded on the fly (test photos with a fixed seed per image), scored on RGB PSNR/SSIM without crop,
with the degraded input itself (method ``input``) as the no-network baseline instead of bicubic.

Methods produce rows through a registry (:func:`register_row_producer`), so a later method or task
adds its rows here without touching the loop. Nothing in this module writes docs: the CLI and
``benchmarks/bench_sr.py`` decide where the table, the plot and the JSON go.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

# every producer module registers its method's rows on import
from nmrestore.bench import baselines, classpruning, png, sls  # noqa: F401
from nmrestore.bench.config import ROW_KEYS, BenchConfig, Echo, Row, dense_recipe, ensure_dense, test_source
from nmrestore.bench.context import (
    BenchContext,
    evaluate_on_test,
    list_row_producers,
    per_image_columns,
    row_key,
    row_producer,
)
from nmrestore.bench.evidence import attach_deltas, evidence_checks
from nmrestore.bench.rowcache import load_row_cache, store_rows
from nmrestore.bench.steps import measure_step_times, training_batch
from nmrestore.cost import count_cost
from nmrestore.engine.evaluate import bicubic_restorer, evaluate_fn
from nmrestore.engine.runner import (
    build_eval_dataset,
    model_from_checkpoint,
)
from nmrestore.errors import NMRestoreError
from nmrestore.sparsity.api import parse_nm


def run_benchmark(config: BenchConfig, notes: list[str] | None = None, echo: Echo | None = None) -> list[Row]:
    """Run the protocol for ``config``; returns one row per (method, budget) plus bicubic and dense.

    ``notes`` (if given) receives what was skipped and why; ``echo`` gets progress lines.
    """
    unknown = [m for m in config.methods if m not in list_row_producers()]
    if unknown:
        raise NMRestoreError(
            f"no benchmark rows for method(s) {unknown}; known: {', '.join(list_row_producers())}"
        )
    if config.threads:
        torch.set_num_threads(config.threads)
    notes = notes if notes is not None else []
    dense = ensure_dense(config, echo)
    if dense.reused and echo:
        echo(f"reusing the cached dense model {dense.path}")
    dense_model, _ = model_from_checkpoint(dense.path)
    device = torch.device(
        "cuda"
        if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
        else "cpu"
    )
    dense_model.to(device)
    recipe = dense_recipe(config)
    eval_set = build_eval_dataset(test_source(config), config.scale, recipe.task)
    temporary = config.work_dir is None
    work_dir = Path(tempfile.mkdtemp(prefix="nmrestore-bench-")) if temporary else Path(config.work_dir)  # type: ignore[arg-type]
    work_dir.mkdir(parents=True, exist_ok=True)
    context = BenchContext(
        config,
        dense,
        dense_model,
        count_cost(dense_model),
        eval_set,
        work_dir,
        notes,
        echo=echo,
        cached_rows=load_row_cache(config.row_cache),
    )
    try:
        rows: list[Row] = []
        # the no-network baseline: bicubic upscaling for SR, the degraded input itself otherwise
        sr = config.task == "sr"
        baseline = bicubic_restorer(config.scale) if sr else (lambda lq: lq)
        bicubic = evaluate_fn(
            baseline, eval_set, context.crop, context.y_channel, with_ssim=True, tile=config.ci_tile
        )
        rows.append(
            {
                **{key: None for key in ROW_KEYS},
                "task": config.task,
                "model": config.model,
                "scale": config.scale,
                "method": "bicubic" if sr else "input",
                "psnr": bicubic.psnr,
                "ssim": bicubic.ssim,
                "macs_g": 0.0,
                "macs_fraction": 0.0,
                "note": "MATLAB-style bicubic upscaling (MACs not counted)"
                if sr
                else f"the degraded input ({recipe.task.degradation().describe()})",  # type: ignore[union-attr]
                **per_image_columns(bicubic),
            }
        )
        dense_row = context.row("dense", 1.0, dense_model, evaluate_on_test(context, dense_model))
        dense_row["note"] = f"{config.dense_steps} steps, cache {dense.digest}" + (
            " (reused)" if dense.reused else ""
        )
        rows.append(dense_row)
        for method in config.methods:
            producer = row_producer(method)
            budgets: Sequence[str | None] = config.budgets if producer.per_budget else [None]
            for budget in budgets:
                made = producer.fn(context, budget)
                made_rows = [] if made is None else made if isinstance(made, list) else [made]
                rows.extend(made_rows)
                store_rows(config.row_cache, made_rows)
        attach_deltas(rows)
        if not config.timing or config.cached_only:
            return rows
        context.say(f"timing {len(context.timed)} models ({config.timing_rounds} interleaved rounds)")
        timings = measure_step_times(
            context.timed,
            training_batch(config),
            config.timing_rounds,
            config.timing_warmup,
            first_step=config.finetune_steps + 1,
        )
        for row in rows:
            key = row_key(row)
            if timings.samples.get(key) and row.get("step_time_ratio") is None:  # a producer's own timing stands
                row["step_ms"] = timings.median(key) * 1e3
                row["step_time_ratio"] = timings.ratio(key, row_key(dense_row))
        store_rows(config.row_cache, rows)
        return rows
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)


def check_rows(rows: list[Row], tolerance: float = 0.02) -> list[tuple[str, bool]]:
    """The protocol's claims, each with pass/fail: 2:4 costs ~nothing, budgets are exact/met."""
    results: list[tuple[str, bool]] = []
    dense = next((r for r in rows if r["method"] == "dense"), None)
    oneshot24 = next((r for r in rows if r["method"] == "oneshot" and r["budget"] == "2:4"), None)
    if dense and oneshot24:
        gap = dense["psnr"] - oneshot24["psnr"]
        results.append((f"one-shot 2:4 within 0.1 dB of dense (gap {gap:+.3f} dB)", gap <= 0.1))
    for row in rows:
        budget = row.get("budget")
        if row["method"] in ("oneshot", "srste", "uniform_ste") and isinstance(budget, str):
            n, m = parse_nm(budget)
            ok = abs(row["prunable_macs_fraction"] - n / m) < 1e-9
            results.append(
                (f"{row['method']} {budget}: prunable MACs {row['prunable_macs_fraction']:.6f} = {n}/{m}", ok)
            )
        if row["method"] == "filter" and "target_macs_fraction" in row:
            target = row["target_macs_fraction"]
            ok = abs(row["macs_fraction"] - target) <= tolerance * target
            results.append(
                (f"filter {budget}: MACs {row['macs_fraction']:.4f} within 2% of {target:.4f}", ok)
            )
        if row["method"] == "sls" and isinstance(budget, str):
            n, m = parse_nm(budget)
            ok = row["prunable_macs_fraction"] <= n / m * (1 + 1e-9)
            results.append(
                (f"sls {budget}: prunable MACs {row['prunable_macs_fraction']:.4f} <= {n / m:.4f}", ok)
            )
    return results + evidence_checks(rows)
