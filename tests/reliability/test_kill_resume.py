"""SIGKILL training at seeded-random moments (inside steps, during checkpoint writes), resume each time.

``ckpt_every=1`` makes the trainer write ``last.safetensors`` + ``last.json`` after every step, so a
kill delayed by a random few milliseconds after a step's sidecar appears often lands in the middle
of the next write. After every kill the checkpoints on disk must all load and verify (atomic
rename + SHA-256 in the metadata); temp files may remain only as dot-files. The interrupted run,
resumed with ``--resume`` each time, must end with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from nmrestore.engine.checkpoint import load_checkpoint, save_checkpoint
from nmrestore.errors import CheckpointError
from tests.conftest import tiny_recipe_dict

STEPS = 30
MIN_KILLS = 5
MAX_KILLS = 10
SEED = 20261122


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nmrestore.cli.main",
        "train",
        str(recipe),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _sidecar_step(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("step", 0))
    except (OSError, ValueError):
        return -1


def _is_temp(name: str) -> bool:
    """nmrestore's ``.last.safetensors.XXXX.tmp`` or safetensors' own ``.tmpXXXXXX`` (it renames too)."""
    return name.startswith(".") and (name.endswith(".tmp") or name.startswith(".tmp"))


def _temps(ckpt_dir: Path) -> set[str]:
    try:
        return {name for name in os.listdir(ckpt_dir) if _is_temp(name)}
    except OSError:
        return set()


def _check_no_half_written(ckpt_dir: Path) -> tuple[int, int]:
    """Every visible checkpoint file loads and verifies; returns (last step, number of dot temp files)."""
    if not ckpt_dir.exists():
        return 0, 0
    temps = 0
    last_step = 0
    for entry in sorted(ckpt_dir.iterdir()):
        if entry.name.startswith("."):
            assert _is_temp(entry.name), f"unexpected hidden file {entry.name}"
            temps += 1
            continue
        assert entry.name in {"last.safetensors", "last.json", "best.safetensors", "best.json"}, entry.name
        if entry.suffix == ".json":
            json.loads(entry.read_text())  # written atomically too: never a torn JSON
            continue
        try:
            ckpt = load_checkpoint(entry)  # checks the SHA-256 of the tensor bytes
        except CheckpointError as exc:  # pragma: no cover - the failure this test exists to catch
            pytest.fail(f"half-written checkpoint visible after a kill: {exc}")
        if entry.name == "last.safetensors":
            last_step = ckpt.step
    return last_step, temps


@pytest.mark.slow
def test_five_or_more_sigkills_then_resume_give_the_uninterrupted_weights(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            tiny_recipe_dict(
                train={"steps": STEPS, "ckpt_every": 1, "val_every": STEPS, "log_every": 5, "threads": 1}
            )
        )
    )
    subprocess.run(_cmd(recipe, tmp_path / "full"), check=True, env=_env(), timeout=300, capture_output=True)

    rng = random.Random(SEED)
    cut = tmp_path / "cut"
    ckpt_dir = cut / "checkpoints"
    sidecar = ckpt_dir / "last.json"
    kills: list[dict[str, object]] = []
    temps_before: set[str] = set()
    for attempt in range(40):
        saved, _ = _check_no_half_written(ckpt_dir)
        resume = ["--resume"] if attempt else []
        proc = subprocess.Popen(
            _cmd(recipe, cut, *resume), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        mid_writes = sum(bool(k["mid_write"]) for k in kills)
        if len(kills) >= MAX_KILLS or (len(kills) >= MIN_KILLS and mid_writes >= 2):  # enough: let it finish
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err.decode()
            break
        target = min(saved + rng.randint(1, 3), STEPS - 2)
        mode = "write" if len(kills) % 2 or len(kills) >= MIN_KILLS else "step"
        delay = rng.uniform(0.0, 0.03)  # a random moment inside one of the next steps
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline and _sidecar_step(sidecar) < target:
            time.sleep(0.002)
        if mode == "write":  # spin until a checkpoint temp file appears: kill while it is being written
            while (
                proc.poll() is None and time.monotonic() < deadline and not (_temps(ckpt_dir) - temps_before)
            ):
                pass
        else:
            time.sleep(delay)
        if proc.poll() is not None:  # finished before the kill: the run is complete
            assert proc.returncode == 0, proc.stderr.read().decode() if proc.stderr else ""
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.stderr:
            proc.stderr.close()
        step, _ = _check_no_half_written(ckpt_dir)
        left = _temps(ckpt_dir) - temps_before  # a temp file left behind: the kill hit a write
        temps_before |= left
        kills.append({"mode": mode, "after_step": target, "on_disk_step": step, "mid_write": sorted(left)})
    print("kills:", json.dumps(kills))
    assert len(kills) >= MIN_KILLS, kills
    assert any(k["mid_write"] for k in kills), kills  # at least one kill interrupted a checkpoint write
    assert len({k["on_disk_step"] for k in kills}) >= MIN_KILLS, kills  # killed at different points

    full = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.safetensors")
    done = load_checkpoint(ckpt_dir / "last.safetensors")
    assert done.step == full.step == STEPS
    a, b = full.model_state, done.model_state
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    for name in _temps(ckpt_dir):  # leftovers of killed writes: ignored by resume, cleaned here
        (ckpt_dir / name).unlink()


def test_checkpoint_files_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "last.safetensors", torch.nn.Linear(2, 2), {"step": 1})
    finally:
        os.umask(old)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)
