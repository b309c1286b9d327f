"""Small shared helpers for the reliability tests (checkpoints without training, one-line checks)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.data.io import write_image
from nmrestore.engine.checkpoint import save_checkpoint
from nmrestore.models import create_model
from nmrestore.recipes.schema import recipe_from_dict
from tests.conftest import tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def tiny_checkpoint(path: Path, **model: Any) -> Path:
    """A dense edsr_small x2 checkpoint (8 channels, 1 block) with random weights, no training."""
    recipe = recipe_from_dict(tiny_recipe_dict(**({"model": model} if model else {})))
    torch.manual_seed(0)
    net = create_model(recipe.model.name, scale=recipe.model.scale, **recipe.model.kwargs)
    meta = {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
    }
    return save_checkpoint(path, net, meta, with_rng=False)


def image(path: Path, height: int = 12, width: int = 10, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_image(path, rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def fails_cleanly(args: list[str], *needles: str) -> str:
    """Run the CLI in-process: exit 2, exactly one line ``error: ...`` holding every needle."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    message = result.output.strip()
    assert "Traceback" not in message
    assert len(message.splitlines()) == 1, message
    assert message.startswith("error: "), message
    for needle in needles:
        assert needle in message, message
    print(f"[{args[0]}] exit 2: {message}")  # pytest -s shows the lines docs/RELIABILITY.md quotes
    return message


def cli_env() -> dict[str, str]:
    """Environment for a ``python -m nmrestore.cli.main`` subprocess importing this checkout."""
    path = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "nmrestore.cli.main", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), env=cli_env(), capture_output=True, text=True, timeout=timeout)


def listing(folder: Path) -> dict[str, tuple[int, float]]:
    """Every path under ``folder`` with its size and mtime (to show a refused run touched nothing)."""
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(folder))] = (st.st_size if stat.S_ISREG(st.st_mode) else -1, st.st_mtime)
    return out


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
