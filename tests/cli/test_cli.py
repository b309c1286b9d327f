"""The command line: every command, and one clear line with exit code 2 for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.data.builtin import export_builtin
from tests.conftest import tiny_recipe_dict

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained one-shot 2:4 checkpoint, made through `nmrestore train`."""
    folder = tmp_path_factory.mktemp("cli")
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(sparsity={"method": "oneshot", "n": 2, "m": 4})))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(folder / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "val PSNR" in result.output
    return folder / "run" / "checkpoints" / "best.safetensors"


def _fails_cleanly(args: list[str], *needles: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    return message


def test_models_lists_the_zoo() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    assert "edsr_baseline" in result.output and "rcan_small" in result.output


def test_cost_json_totals_and_dense_layers() -> None:
    result = runner.invoke(app, ["cost", "edsr_baseline", "--scale", "4", "--sparsity", "2:4", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    summary = payload["summary"]
    assert 114.2e9 <= summary["dense_macs"] <= 114.5e9
    assert summary["prunable_macs"] * 2 == summary["prunable_dense_macs"]
    assert {d["name"] for d in payload["dense_layers"]} == {"head.0", "tail.1"}
    text = runner.invoke(app, ["cost", "fsrcnn_small", "--scale", "3", "--input", "64x48"])
    assert text.exit_code == 0 and "total:" in text.output


def test_eval_on_builtin_and_on_an_hr_folder(trained: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", str(trained), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["method"] == "oneshot" and len(payload["per_image"]) == 3
    assert all(layer["n"] == 2 and layer["m"] == 4 for layer in payload["layers"])
    export_builtin(tmp_path / "hr", "test")
    result = runner.invoke(app, ["eval", str(trained), "--hr-dir", str(tmp_path / "hr"), "--scale", "2"])
    assert result.exit_code == 0, result.output
    assert "mean" in result.output and "MACs" in result.output


def test_infer_writes_upscaled_images(trained: Path, tmp_path: Path) -> None:
    image = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(image)
    result = runner.invoke(app, ["infer", str(trained), str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "lr.png").size == (24, 20)


def test_bad_inputs_exit_2_with_one_line(trained: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(good)
    truncated.write_bytes(good.read_bytes()[:40])
    _fails_cleanly(["infer", str(trained), str(good), str(truncated), "--out", str(tmp_path / "o")], "broken.png")
    assert not (tmp_path / "o").exists()  # nothing half-done: all inputs are read before writing
    _fails_cleanly(["eval", str(trained), "--scale", "4"], "x2 model", "--scale 4")
    _fails_cleanly(["eval", str(tmp_path / "none.safetensors")], "does not exist")
    (tmp_path / "empty").mkdir()
    _fails_cleanly(["eval", str(trained), "--hr-dir", str(tmp_path / "empty")], "empty")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train: {stepz: 1}\n")
    _fails_cleanly(["train", str(recipe), "--out", str(tmp_path / "run")], "unknown key 'train.stepz'")
    _fails_cleanly(["cost", "edsr_small", "--sparsity", "2-4"], "N:M")
    _fails_cleanly(["cost", "no_such_model"], "unknown model")
    _fails_cleanly(["cost", "edsr_small", "--sparsity", "2:64"], "not a multiple of M=64")


def test_train_refuses_a_checkpoint_of_another_model(trained: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict(model={"name": "carn_small", "scale": 2})))
    _fails_cleanly(
        ["train", str(recipe), "--out", str(tmp_path / "run"), "--set", f"train.init_from={trained}", "--no-progress"],
        "'edsr_small' x2, not 'carn_small' x2",
    )


@pytest.mark.slow
def test_demo_quick_writes_the_report(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--quick", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    methods = [row["method"] for row in report["rows"]]
    assert methods[:3] == ["bicubic", "dense", "oneshot"]
    for name in ("report.md", "psnr_vs_macs.png", "crops_chelsea.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0


def test_recipes_lists_every_built_in_recipe() -> None:
    from nmrestore.recipes import builtin_recipes

    result = CliRunner().invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.strip().splitlines()]
    assert listed == builtin_recipes() and "demo_dense" in listed


def test_eval_and_infer_take_a_device_and_show_progress_on_request(trained: Path, tmp_path: Path) -> None:
    plain = json.loads(runner.invoke(app, ["eval", str(trained), "--json"]).output)
    shown = runner.invoke(app, ["eval", str(trained), "--json", "--device", "cpu", "--progress"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["psnr"] == plain["psnr"]  # the bar goes to stderr, stdout stays JSON
    image = tmp_path / "lr.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8)).save(image)
    result = runner.invoke(app, ["infer", str(trained), str(image), "--out", str(tmp_path / "o"), "--progress", "--device", "auto"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "o" / "lr.png").is_file()
    if not torch.cuda.is_available():
        message = _fails_cleanly(["eval", str(trained), "--device", "cuda"], "no CUDA device")
        assert len(message.splitlines()) == 1
    message = _fails_cleanly(["eval", str(trained), "--device", "cpu", "--sparse-engine", "--device", "cuda"])
    assert "Traceback" not in message


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_eval_on_cuda_matches_cpu(trained: Path) -> None:
    cpu = json.loads(runner.invoke(app, ["eval", str(trained), "--json"]).output)
    gpu = json.loads(runner.invoke(app, ["eval", str(trained), "--json", "--device", "cuda"]).output)
    assert gpu["psnr"] == pytest.approx(cpu["psnr"], abs=1e-3)
