"""The benchmark harness with ``task = deblur / denoise``: rows, metrics, cost at 1280x720, PNG noise levels."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from nmrestore.bench import ROW_KEYS, BenchConfig, dense_recipe, format_table, run_benchmark
from nmrestore.bench.config import recipe_digest
from nmrestore.bench.report import describe
from nmrestore.cost import count_cost
from nmrestore.models import create_model
from nmrestore.recipes.schema import BlurSpec

TINY: dict[str, Any] = {
    "dense_steps": 2,
    "finetune_steps": 2,
    "patch_size": 8,
    "batch_size": 2,
    "samples_per_epoch": 4,
    "max_train_images": 1,
    "max_test_images": 1,
    "timing_rounds": 1,
    "timing_warmup": 0,
    "threads": 1,
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-restore-cache")


def test_sr_recipes_and_cache_keys_do_not_change() -> None:
    """Adding tasks must not retrain anyone's cached SR dense model: the SR dense recipe has no task key."""
    sr = BenchConfig()
    assert "task" not in dense_recipe(sr).model_dump(mode="json")
    denoise = BenchConfig(task="denoise", scale=1, sigma=15)
    assert dense_recipe(denoise).task.sigma == 15 and dense_recipe(denoise).eval.crop_border == 0
    assert recipe_digest(dense_recipe(denoise)) != recipe_digest(
        dense_recipe(BenchConfig(task="denoise", scale=1))
    )
    assert "RGB PSNR/SSIM, no border crop" in describe(denoise)


def test_deblur_rows(cache: Path) -> None:
    config = BenchConfig(
        **TINY,
        task="deblur",
        model="dmphn_small",
        scale=1,
        blur=BlurSpec(kernel_size=5),
        methods=("oneshot", "sls"),
        budgets=("2:4", "8:32"),
        cache_dir=cache,
    )
    torch.set_num_threads(1)
    notes: list[str] = []
    rows = run_benchmark(config, notes)
    assert [(r["method"], r["budget"]) for r in rows] == [
        ("input", None),
        ("dense", 1.0),
        ("oneshot", "2:4"),
        ("oneshot", "8:32"),
        ("sls", "8:32"),
    ]
    for row in rows:
        assert set(ROW_KEYS) <= set(row) and row["task"] == "deblur" and row["scale"] == 1
    dense_macs = count_cost(create_model("dmphn_small")).dense_macs  # a 1280x720 input at scale 1
    assert rows[1]["macs_g"] == pytest.approx(dense_macs / 1e9)
    assert rows[2]["prunable_macs_fraction"] == pytest.approx(0.5, abs=1e-12)
    assert rows[4]["prunable_macs_fraction"] <= 0.25 + 1e-9
    assert "motion blur" in rows[0]["note"] and "input" in format_table(rows)


@pytest.mark.slow
def test_png_rows_for_noise_levels(cache: Path) -> None:
    from nmrestore.bench.png import PNGBenchSettings, register_bench_rows

    register_bench_rows(PNGBenchSettings(dense=2, grow=2, finetune=1, m=8, ns=(4, 4, 4), max_grow=1))
    try:
        config = BenchConfig(
            **TINY,
            task="denoise",
            model="edsr_small",
            model_kwargs={"n_feats": 32, "n_blocks": 1},
            scale=1,
            methods=("png",),
            cache_dir=cache,
        )
        rows = run_benchmark(config)
    finally:
        register_bench_rows()  # back to the documented settings for later tests
    png = [(r["task"], r["method"]) for r in rows if str(r["task"]).startswith("denoise_")]
    assert png == [(f"denoise_sigma{s}", m) for s in (15, 25, 50) for m in ("dense", "png")]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        if row["method"] == "png":
            assert row["budget"] == "4:8" and row["scale"] == 1
    timed = [r for r in rows if r["task"] == "denoise_sigma25"]
    assert all(r["step_time_ratio"] > 0 for r in timed)
    # each level's dense baseline trains on its own noise, from PNG's dense start (cached: nothing trains)
    from nmrestore.bench.png import dense_baseline_recipe, prepare

    settings = PNGBenchSettings(dense=2, grow=2, finetune=1, m=8, ns=(4, 4, 4), max_grow=1)
    recipe, run_dir, _ = prepare(config, settings)
    sigmas = [dense_baseline_recipe(config, recipe, run_dir, i).task.sigma for i in range(3)]
    assert sigmas == [15.0, 25.0, 50.0]
