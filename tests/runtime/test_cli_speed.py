"""``nmrestore speed`` and the ``--sparse-engine`` flag of ``eval``/``infer``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from nmrestore.cli.main import app
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


def test_speed_json_on_a_tiny_input() -> None:
    args = ["speed", "edsr_small", "--scale", "2", "--sparsity", "2:8", "--input", "20x12"]
    result = runner.invoke(app, [*args, "--threads", "1", "--repeats", "2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["input_shape"] == [1, 3, 12, 20] and payload["threads"] == 1 and payload["repeats"] == 2
    assert payload["dense_ms"] > 0 and payload["sparse_ms"] > 0
    # one speed-up definition (nmrestore.runtime.timing): the median of the per-round ratios
    ratios = [d / s for d, s in zip(payload["dense_runs_ms"], payload["sparse_runs_ms"], strict=True)]
    assert payload["speedup"] == pytest.approx(statistics.median(ratios))
    assert payload["max_abs_diff"] <= 1e-4
    assert len(payload["dense_runs_ms"]) == len(payload["sparse_runs_ms"]) == 2
    layers = payload["layers"]
    assert {row["layer"] for row in layers} >= {"body.0.body.0", "body.4", "tail.0.0"}
    for row in layers:  # the dense first and last convs are timed on the kernel too (dense_convs)
        assert row["nm"] == ("-" if row["layer"] in ("head.0", "tail.1") else "2:8")
        assert row["choice"] in ("sparse", "dense")
        assert set(row) >= {"layer", "input_shape", "dense_ms", "sparse_ms", "choice"}
    assert {row["layer"] for row in layers} >= {"head.0", "tail.1"} and not payload["untouched"]


def test_speed_table_and_clean_errors() -> None:
    result = runner.invoke(
        app,
        [
            "speed",
            "edsr_small",
            "--sparsity",
            "2:4",
            "--input",
            "16x8",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--tactic",
            "sparse",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "speed-up" in result.output and "dense ms" in result.output and "sparse ms" in result.output
    for args, needle in [
        (["speed", "edsr_small"], "--sparsity"),
        (["speed", "edsr_small", "--sparsity", "2:4", "--tactic", "fast"], "--tactic"),
        (["speed", "edsr_small", "--sparsity", "2:4", "--input", "big"], "WIDTHxHEIGHT"),
        (["speed", "edsr_small", "--sparsity", "2:4", "--repeats", "0"], "--repeats"),
        (["speed", "edsr_small", "--sparsity", "2:4", "--route", "3"], "route"),
    ]:
        bad = runner.invoke(app, args)
        assert bad.exit_code == 2, bad.output
        assert needle in bad.output and "Traceback" not in bad.output


def test_speed_at_fp16_lists_the_fp16_tactic_where_the_kernel_has_it() -> None:
    from nmrestore.runtime import load_kernel

    lib = load_kernel()
    args = ["speed", "edsr_small", "--sparsity", "2:32", "--input", "70x10", "--threads", "1", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--precision", "fp16", "--tactic", "sparse", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    body = [row for row in payload["layers"] if row["nm"] == "2:32"]
    want = "sparse_fp16" if lib is not None and lib.has_f16 else "sparse"
    assert body and {row["choice"] for row in body} == {want}
    assert payload["max_abs_diff"] <= 2e-2  # fp16 activations (the dense convs in bf16)
    bad = runner.invoke(app, [*args, "--precision", "fp8"])
    assert bad.exit_code == 2 and "--precision" in bad.output and "Traceback" not in bad.output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("speed")
    recipe = folder / "recipe.yaml"
    data = tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4})
    data["train"] = {**data["train"], "steps": 2, "val_every": 2, "ckpt_every": 2}
    recipe.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(folder / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    return folder / "run" / "checkpoints" / "best.safetensors"


def test_speed_eval_and_infer_with_a_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "speed",
            "edsr_small",
            "--checkpoint",
            str(checkpoint),
            "--input",
            "16x12",
            "--threads",
            "1",
            "--repeats",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_abs_diff"] <= 1e-4
    wrong = runner.invoke(app, ["speed", "carn", "--checkpoint", str(checkpoint)])
    assert wrong.exit_code == 2 and "edsr_small" in wrong.output
    # the checkpoint names its model: no model argument needed
    unnamed = runner.invoke(
        app, ["speed", "--checkpoint", str(checkpoint), "--input", "16x12", "--threads", "1", "--repeats", "1", "--json"]
    )
    assert unnamed.exit_code == 0, unnamed.output
    assert json.loads(unnamed.output)["model"].startswith("edsr_small x2")
    nothing = runner.invoke(app, ["speed", "--sparsity", "2:4"])
    assert nothing.exit_code == 2 and "model name" in nothing.output

    plain = json.loads(runner.invoke(app, ["eval", str(checkpoint), "--json"]).output)
    fast = runner.invoke(app, ["eval", str(checkpoint), "--json", "--sparse-engine"])
    assert fast.exit_code == 0, fast.output
    fast_payload = json.loads(fast.output)
    assert fast_payload["psnr"] == pytest.approx(plain["psnr"], abs=1e-3)
    assert fast_payload["sparse_engine"]["sparse_layers"] or fast_payload["sparse_engine"]["dense_layers"]

    image = tmp_path / "lr.png"
    Image.fromarray((np.random.default_rng(0).random((10, 14, 3)) * 255).astype(np.uint8)).save(image)
    outs = {}
    for flag in ([], ["--sparse-engine"]):
        out = tmp_path / ("fast" if flag else "plain")
        done = runner.invoke(app, ["infer", str(checkpoint), str(image), "--out", str(out), *flag])
        assert done.exit_code == 0, done.output
        outs[bool(flag)] = np.asarray(Image.open(out / "lr.png")).astype(int)
    assert outs[True].shape == (20, 28, 3)
    assert np.abs(outs[True] - outs[False]).max() <= 1  # equal up to rounding to 8 bits


def test_speed_with_the_dense_runtime_reports_its_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("openvino")
    from nmrestore.runtime import dense_runtime

    # PyTorch's dense model stands in for OpenVINO here (tests/runtime/test_dense_runtime.py says why)
    monkeypatch.setattr(
        dense_runtime, "openvino_runners", lambda reference, x, threads, f32: ([lambda inp: reference(inp)], "f32")
    )
    args = ["speed", "edsr_small", "--sparsity", "2:4", "--input", "16x12", "--threads", "1", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--dense-runtime", "openvino", "--json"])
    assert result.exit_code == 0, result.output
    [choice] = json.loads(result.output)["dense_runtime"]
    assert choice["input_shape"] == [1, 3, 12, 16] and choice["runtime"] == "openvino f32"
    assert choice["max_abs_diff"] <= 1e-3 and choice["reason"] in ("faster", "the engine was as fast or faster")
    table = runner.invoke(app, [*args, "--dense-runtime", "openvino"])
    assert table.exit_code == 0 and "dense runtime for 1x3x12x16: openvino f32 (f32)" in table.output
    for extra, message in (
        (["--dense-runtime", "tensorrt"], "must be none or openvino"),
        (["--dense-runtime", "openvino", "--tactic", "sparse"], "needs --tactic auto"),
    ):
        bad = runner.invoke(app, [*args, *extra])
        assert bad.exit_code == 2 and message in bad.output, bad.output
