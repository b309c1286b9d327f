"""Benchmarks as a library: the CPU protocol (docs/ARCHITECTURE.md) as :func:`run_benchmark`, and its outputs.

Layout: :mod:`.config` (what a run is, the cached dense model), :mod:`.context` (what a row producer
sees, the producer registry), :mod:`.steps` (training-step timing), one module of rows per method
family (:mod:`.baselines`, :mod:`.sls`, :mod:`.classpruning`, :mod:`.png`),
:mod:`.harness` (the loop and its checks), :mod:`.report` (tables, plot, JSON).
"""

from nmrestore.bench.config import (
    ROW_KEYS,
    BenchConfig,
    DenseCheckpoint,
    config_from_overrides,
    dense_recipe,
    ensure_dense,
    full_config,
    quick_config,
    recipe_digest,
)
from nmrestore.bench.context import BenchContext, list_row_producers, register_row_producer
from nmrestore.bench.harness import check_rows, run_benchmark
from nmrestore.bench.report import format_table, markdown_table, plot_psnr_macs, write_json, write_report
from nmrestore.bench.steps import measure_step_times

__all__ = [
    "ROW_KEYS",
    "BenchConfig",
    "BenchContext",
    "DenseCheckpoint",
    "check_rows",
    "config_from_overrides",
    "dense_recipe",
    "ensure_dense",
    "format_table",
    "full_config",
    "list_row_producers",
    "markdown_table",
    "measure_step_times",
    "plot_psnr_macs",
    "quick_config",
    "recipe_digest",
    "register_row_producer",
    "run_benchmark",
    "write_json",
    "write_report",
]
