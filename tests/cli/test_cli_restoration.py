"""The command line on deblurring/denoising recipes: train, eval (RGB, no crop), infer, clean errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.data.io import write_image
from tests.conftest import tiny_recipe_dict

runner = CliRunner()

DEBLUR = {"kind": "deblur", "blur": {"kernel_size": 5}}


@pytest.fixture(scope="module")
def deblurred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny one-shot 2:4 deblurring run, made through `nmrestore train`."""
    folder = tmp_path_factory.mktemp("cli_deblur")
    recipe = folder / "recipe.yaml"
    data = tiny_recipe_dict(
        task=DEBLUR,
        model={"name": "edsr_small", "scale": 1, "kwargs": {"n_feats": 8, "n_blocks": 1}},
        sparsity={"method": "oneshot", "n": 2, "m": 4},
        train={"steps": 4, "val_every": 4, "ckpt_every": 4, "threads": 1},
    )
    del data["model"]["scale"]  # deblurring defaults to scale 1
    recipe.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(folder / "run"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "val PSNR" in result.output
    return folder / "run" / "checkpoints" / "last.safetensors"


def test_eval_deblur_uses_rgb_without_crop(deblurred: Path) -> None:
    result = runner.invoke(app, ["eval", str(deblurred), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["scale"] == 1 and payload["metric"] == "RGB" and payload["crop_border"] == 0
    assert payload["task_label"].startswith("deblur (motion blur")
    assert len(payload["per_image"]) == 3
    assert payload["cost"]["input_height"] == 720 and payload["cost"]["input_width"] == 1280
    final = json.loads((deblurred.parent.parent / "final.json").read_text())
    # the recipe validates on the first test photo: same input, same metric as `nmrestore eval`
    assert payload["per_image"][0]["psnr"] == pytest.approx(final["val_psnr"])
    text = runner.invoke(app, ["eval", str(deblurred)])
    assert text.exit_code == 0 and "RGB, 0-pixel border crop" in text.output


def test_eval_on_a_gopro_folder_and_infer_keeps_the_size(deblurred: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for frame in ("000001", "000002"):
        sharp = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        write_image(tmp_path / "GoPro" / "test" / "GOPR0001" / "sharp" / f"{frame}.png", sharp)
        write_image(tmp_path / "GoPro" / "test" / "GOPR0001" / "blur" / f"{frame}.png", sharp // 2)
    result = runner.invoke(
        app, ["eval", str(deblurred), "--hr-dir", str(tmp_path / "GoPro" / "test"), "--json"]
    )
    assert result.exit_code == 0, result.output
    names = [row["name"] for row in json.loads(result.output)["per_image"]]
    assert names == ["GOPR0001_000001", "GOPR0001_000002"]
    image = tmp_path / "blurry.png"
    Image.fromarray(rng.integers(0, 255, (13, 17, 3), dtype=np.uint8)).save(image)
    result = runner.invoke(app, ["infer", str(deblurred), str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "out" / "blurry.png").size == (17, 13)


def test_restoration_mistakes_exit_2_with_one_line(deblurred: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"task": {"kind": "deblur"}, "model": {"scale": 2}}))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert (
        result.exit_code == 2 and "needs model.scale 1" in result.output and "Traceback" not in result.output
    )
    recipe.write_text(yaml.safe_dump({"task": {"kind": "sr", "sigma": 25}}))
    result = runner.invoke(app, ["train", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "task.sigma is for kind 'denoise'" in result.output
    write_image(tmp_path / "pairs" / "gt" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    write_image(tmp_path / "pairs" / "lq" / "a.png", np.zeros((8, 7, 3), dtype=np.uint8))
    result = runner.invoke(app, ["eval", str(deblurred), "--hr-dir", str(tmp_path / "pairs")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "lq/a.png" in result.output and "gt/a.png" in result.output
    result = runner.invoke(app, ["cost", "dmphn_small", "--scale", "2"])
    assert result.exit_code == 2 and "supports scale 1" in result.output


def test_cost_and_models_know_scale_1_nets() -> None:
    result = runner.invoke(app, ["cost", "dmphn_small", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["model"]["scale"] == 1
    assert payload["summary"]["input_height"] == 720 and payload["summary"]["input_width"] == 1280
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "dmphn_small" in listing.output and "(x1)" in listing.output
