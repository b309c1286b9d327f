"""The benchmark harness on a tiny config: dense cache, rows, JSON, report and the CLI path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from nmrestore.bench import (
    ROW_KEYS,
    BenchConfig,
    check_rows,
    config_from_overrides,
    dense_recipe,
    ensure_dense,
    format_table,
    list_row_producers,
    recipe_digest,
    run_benchmark,
    write_json,
    write_report,
)
from nmrestore.cli.main import app
from nmrestore.errors import NMRestoreError, RecipeError

TINY: dict[str, Any] = {
    "model_kwargs": {"n_feats": 32, "n_blocks": 1},
    "dense_steps": 3,
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


def tiny(cache: Path, **changes: Any) -> BenchConfig:
    return BenchConfig(**{**TINY, "cache_dir": cache, **changes})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="module")
def bench(cache: Path) -> tuple[BenchConfig, list[dict[str, Any]], list[str]]:
    config = tiny(cache, budgets=("2:4", "8:32"))
    notes: list[str] = []
    return config, run_benchmark(config, notes), notes


def test_dense_cache_is_reused_for_the_same_recipe_and_rebuilt_for_another(tmp_path: Path) -> None:
    config = tiny(tmp_path, dense_steps=2)
    first = ensure_dense(config)
    assert not first.reused and first.path.is_file()
    stamp = first.path.stat().st_mtime_ns
    again = ensure_dense(tiny(tmp_path, dense_steps=2, threads=2, finetune_steps=7))  # same dense recipe
    assert again.reused and again.path == first.path and again.path.stat().st_mtime_ns == stamp
    changed = ensure_dense(tiny(tmp_path, dense_steps=3))
    assert not changed.reused and changed.digest != first.digest and changed.path.is_file()
    assert first.path.stat().st_mtime_ns == stamp  # the other entry is left alone
    assert recipe_digest(dense_recipe(config)) == first.digest
    (first.run_dir / "done.json").unlink()  # as if killed before the end: resumed, not restarted
    resumed = ensure_dense(tiny(tmp_path, dense_steps=2, threads=2))
    assert not resumed.reused and resumed.path == first.path and (first.run_dir / "done.json").is_file()


def test_rows_have_every_key_and_the_protocol_holds(
    bench: tuple[BenchConfig, list[dict[str, Any]], list[str]],
) -> None:
    config, rows, notes = bench
    methods = [(row["method"], row["budget"]) for row in rows]
    assert methods == [
        ("bicubic", None),
        ("dense", 1.0),
        ("dense_ft", 1.0),
        ("oneshot", "2:4"),
        ("oneshot", "8:32"),
        ("srste", "2:4"),
        ("srste", "8:32"),
        ("sls", "8:32"),  # SLS rows only at the M = 32 budgets
        ("filter", "2:4"),
        ("filter", "8:32"),
    ]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        assert row["task"] == "sr" and row["model"] == config.model and row["scale"] == 2
    by = {(row["method"], row["budget"]): row for row in rows}
    assert by[("dense", 1.0)]["step_time_ratio"] == 1.0
    for key, row in by.items():
        if key[0] != "bicubic":
            assert row["step_time_ratio"] > 0 and row["psnr"] > 0 and 0 < row["macs_fraction"] <= 1
    assert by[("oneshot", "8:32")]["prunable_macs_fraction"] == pytest.approx(0.25, abs=1e-12)
    assert by[("srste", "2:4")]["params_nonzero"] < by[("dense", 1.0)]["params_nonzero"]
    assert by[("filter", "8:32")]["macs_fraction"] == pytest.approx(
        by[("oneshot", "8:32")]["macs_fraction"], rel=0.02
    )
    assert by[("filter", "2:4")]["params"] < by[("dense", 1.0)]["params"]  # smaller tensors, not masks
    checks = dict(check_rows(rows))
    # the budget checks hold exactly; the quality relations (CIs) are for real studies, not 8-step runs
    exact = {t: ok for t, ok in checks.items() if "prunable MACs" in t or "within 2% of" in t}
    assert len(exact) == 7 and all(exact.values()), checks
    assert any(t.startswith("SR-STE vs one-shot: srste 2:4 - oneshot 2:4 = ") for t in checks), list(checks)
    assert any(t.startswith("every network (9) at least as good as bicubic") for t in checks)
    for row in rows:  # every row is scored per image and per tile, the same tiles everywhere
        assert [r["name"] for r in row["per_image"]] == ["chelsea"]
        assert len(row["tiles"]) == len(by[("dense", 1.0)]["tiles"]) > 4
        if row["method"] != "dense":
            delta = row["vs_dense"]
            assert delta["low"] <= delta["mean"] <= delta["high"] and delta["n"] == len(row["tiles"])
    assert notes == []
    assert "oneshot" in format_table(rows)


def test_json_and_report_are_written(
    bench: tuple[BenchConfig, list[dict[str, Any]], list[str]], tmp_path: Path
) -> None:
    config, rows, notes = bench
    path = write_json(rows, tmp_path / "rows.json", config, notes)
    payload = json.loads(path.read_text())
    assert payload["rows"] == json.loads(json.dumps(rows, default=str))
    assert payload["config"]["finetune_steps"] == 2 and payload["checks"]
    page = write_report(rows, config, tmp_path / "report", notes, command="test")
    text = page.read_text()
    assert "| method |" in text and "bench_sr_psnr_macs.png" in text
    assert (tmp_path / "report" / "bench_sr_psnr_macs.png").stat().st_size > 1000


def test_cli_quick_writes_json_and_report(cache: Path, tmp_path: Path) -> None:
    overrides = [f"{key}={json.dumps(value)}" for key, value in TINY.items()]
    overrides += [f"cache_dir={cache}", 'budgets=["2:4"]', 'methods=["oneshot"]']
    args = ["bench", "--quick", "--out", str(tmp_path / "out"), "--json-out", str(tmp_path / "rows.json")]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "oneshot" in result.output and "report written" in result.output
    rows = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["bicubic", "dense", "oneshot"]
    assert (tmp_path / "out" / "bench_sr.md").is_file()
    # --json: stdout is the JSON document and nothing else (the table goes to stderr)
    printed = CliRunner().invoke(app, [*args[:4], "--json", *args[6:]])
    assert printed.exit_code == 0, printed.output
    assert [r["method"] for r in json.loads(printed.stdout)["rows"]] == ["bicubic", "dense", "oneshot"]


def test_bad_settings_fail_cleanly() -> None:
    with pytest.raises(RecipeError, match="finetune_step"):
        config_from_overrides(True, ["finetune_step=3"])
    with pytest.raises(NMRestoreError, match="no benchmark rows"):
        run_benchmark(BenchConfig(methods=("nope",)))
    result = CliRunner().invoke(app, ["bench", "--quick", "--set", "budgets=['5:4']"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert {"oneshot", "srste", "filter", "sls", "dense_ft"} <= set(list_row_producers())


def test_classpruning_and_png_rows_come_through_the_harness_registry() -> None:
    assert {"classpruning", "png"} <= set(list_row_producers())


@pytest.mark.slow
def test_png_rows_one_per_task_and_method(cache: Path) -> None:
    from nmrestore.bench.png import PNGBenchSettings, register_bench_rows

    register_bench_rows(PNGBenchSettings(dense=2, grow=2, finetune=1, m=8, ns=(4, 4, 4), max_grow=1))
    try:
        rows = run_benchmark(tiny(cache, methods=("png",), dense_steps=3))
    finally:
        register_bench_rows()  # back to the documented settings for later tests
    png = [(row["task"], row["method"]) for row in rows if str(row["task"]).startswith("sr_x")]
    assert png == [(f"sr_x{s}", m) for s in (2, 3, 4) for m in ("dense", "png")]
    for row in rows:
        assert set(ROW_KEYS) <= set(row), row
        if row["method"] == "png":
            assert row["budget"] == "4:8" and row["prunable_macs_fraction"] == pytest.approx(0.5, abs=1e-12)
            assert row["psnr_minus_dense"] == pytest.approx(
                row["psnr"]
                - next(r["psnr"] for r in rows if r["task"] == row["task"] and r["method"] == "dense")
            )
    x3 = [row for row in rows if row["task"] == "sr_x3"]
    assert all(row["step_time_ratio"] > 0 for row in x3)
    for row in rows:  # scored per tile too: PNG's difference from its dense baseline has an interval
        if row["method"] == "png":
            assert row["vs_dense"]["low"] <= row["vs_dense"]["mean"] <= row["vs_dense"]["high"]


@pytest.mark.slow
def test_png_dense_baselines_start_from_png_s_own_dense_model(cache: Path) -> None:
    """Same start, same steps: each dense baseline is initialised from PNG's first (dense) phase."""
    from nmrestore.bench.png import PNGBenchSettings, dense_baseline_recipe, dense_start, prepare
    from nmrestore.engine.checkpoint import load_checkpoint

    config = tiny(cache, methods=("png",), dense_steps=3)
    settings = PNGBenchSettings(dense=2, grow=3, finetune=2, m=8, ns=(4, 4, 4), max_grow=1)
    recipe, run_dir, dense_paths = prepare(config, settings)
    assert recipe.data.val is None and recipe.data.holdout > 0  # validated on held-out training data
    start = dense_start(recipe, run_dir)
    assert start.is_file() and "00-x2-train" in str(start)
    for index, (task, steps) in enumerate([("x2", 2), ("x3", 5), ("x4", 5)]):
        baseline = dense_baseline_recipe(config, recipe, run_dir, index)
        assert baseline.train.init_from == start and baseline.train.steps == steps
        assert baseline.model.name == recipe.model.name and baseline.model.scale == index + 2
        assert baseline.sparsity is None
        assert load_checkpoint(dense_paths[task]).meta["step"] == steps


@pytest.mark.slow
def test_classpruning_row_comes_through_the_harness(cache: Path) -> None:
    from nmrestore.bench.classpruning import register_bench_rows

    tiny_cp = {"classifier_steps": 2, "joint_steps": 1, "label_stride": 32, "classifier_batch": 4}
    register_bench_rows(tiny_cp)
    try:
        rows = run_benchmark(tiny(cache, methods=("classpruning",), finetune_steps=3))
    finally:
        register_bench_rows()
    (row,) = [row for row in rows if row["method"] == "classpruning"]
    assert set(ROW_KEYS) <= set(row)
    assert row["budget"] == "adaptive" and len(row["route_histogram"]) == 3
    assert sum(row["route_histogram"]) > 0 and 0 < row["macs_fraction"] <= 1.2
    assert row["finetune_steps"] == 3 and row["step_time_ratio"] > 0


def test_finished_rows_are_reused_from_the_row_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny(
        tmp_path, budgets=("2:4",), methods=("oneshot", "filter"), row_cache=tmp_path / "rows.json", timing=False
    )
    first = run_benchmark(config)
    cache = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert sorted(k.split(":")[0] for k in cache) == ["filter@2", "oneshot@2"]

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a cached row was trained again")

    monkeypatch.setattr("nmrestore.bench.harness.BenchContext.finetune", no_training)
    again = run_benchmark(config)
    by_first = {(r["method"], r["budget"]): r for r in first}
    for row in again:
        if row["method"] in ("oneshot", "filter"):
            same = by_first[(row["method"], row["budget"])]
            assert row["psnr"] == same["psnr"] and row["tiles"] == same["tiles"] and row["note"] == same["note"]


def test_cached_only_reports_the_finished_rows_and_trains_nothing(tmp_path: Path) -> None:
    rows_file = tmp_path / "rows.json"
    run_benchmark(tiny(tmp_path, budgets=("2:4",), methods=("oneshot",), row_cache=rows_file, timing=False))
    notes: list[str] = []
    partial = run_benchmark(
        tiny(tmp_path, budgets=("2:4", "8:32"), methods=("oneshot", "srste"), row_cache=rows_file, cached_only=True),
        notes,
    )
    assert [(r["method"], r["budget"]) for r in partial] == [("bicubic", None), ("dense", 1.0), ("oneshot", "2:4")]
    assert sorted(notes) == sorted(f"{m}-{b}: not finished yet (not in the row cache)" for m, b in
                                   [("oneshot", "8:32"), ("srste", "2:4"), ("srste", "8:32")])
