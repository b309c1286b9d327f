"""Real processes: SIGKILL and resume, and a two-process DDP run on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nmrestore.engine.checkpoint import load_checkpoint
from tests.conftest import tiny_recipe_dict

pytestmark = pytest.mark.slow


def _write_recipe(tmp_path: Path, **sections: object) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict(**sections)))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nmrestore.cli.main", "train", *args, "--no-progress"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_sigkill_after_a_checkpoint_then_resume_gives_the_same_weights(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path, train={"steps": 40, "ckpt_every": 5, "val_every": 40, "log_every": 5})
    subprocess.run(_cli(str(recipe), "--out", str(tmp_path / "full")), check=True, env=_env(), timeout=300)

    proc = subprocess.Popen(_cli(str(recipe), "--out", str(tmp_path / "cut")), env=_env())
    sidecar = tmp_path / "cut" / "checkpoints" / "last.json"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if sidecar.exists() and json.loads(sidecar.read_text()).get("step", 0) >= 10:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").step
    assert 10 <= killed_at < 40

    subprocess.run(_cli(str(recipe), "--out", str(tmp_path / "cut"), "--resume"), check=True, env=_env(), timeout=300)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors").model_state
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.safetensors").model_state
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_ddp_on_cpu_keeps_replicas_identical(tmp_path: Path) -> None:
    recipe = _write_recipe(tmp_path, sparsity={"method": "srste", "n": 2, "m": 4}, train={"steps": 6})
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
        "-m", "nmrestore.cli.main", "train", str(recipe), "--out", str(tmp_path / "ddp"), "--no-progress",
    ]
    subprocess.run(cmd, check=True, env=_env(), timeout=300)
    records = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["world_size"] == 2 and final["replicas_identical"] is True
    assert load_checkpoint(tmp_path / "ddp" / "checkpoints" / "last.safetensors").step == 6
