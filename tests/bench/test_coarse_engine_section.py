"""The coarse-engine section: speed-ups from the rounds, PSNR from section `coarse`, slowed runs marked."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_coarse_engine  # noqa: E402
from bench_coarse_engine import checkpoint, render  # noqa: E402

QUIET = {"copy_gbs": 27.0, "gemm_f32_gmacs": 230.0, "gemm_bf16_gmacs": 1280.0}


def _payload(after: dict[str, float]) -> dict[str, Any]:
    runs = {"engine f32": [10.0, 10.0, 10.0], "PyTorch dense": [40.0, 40.0, 40.0],
            "openvino f32": [30.0, 30.0, 30.0], "openvino default": [8.0, 8.0, 8.0]}  # fmt: skip
    row = {"nm": "4:32", "masks": "coarse (blocks of 16)", "checkpoint": "c", "runs_ms": runs,
           "max_abs_diff": {"engine f32": 1e-7, "openvino default": 5e-3}}  # fmt: skip
    return {"machine_before": QUIET, "machine_after": after, "quiet_ceilings": QUIET, "scale": 4,
            "input": [1, 3, 180, 320], "threads": 2, "rounds": 3, "kernel": "k", "rows": [row]}  # fmt: skip


def test_speed_ups_come_from_the_rounds_and_psnr_from_the_coarse_section(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_coarse_engine, "psnr_of", lambda: {("coarse SR-STE", "4:32"): 47.484})
    _, body = render("coarse_engine", _payload(QUIET))
    assert "| 4:32 | coarse (blocks of 16) | 47.484 | 10.0 | 40.0 | 30.0 | 8.0 | 3.00x (3.00x [3.00, 3.00]) |" in body
    assert "0.80x (0.80x [0.80, 0.80])" in body
    assert "not reliable" not in body


def test_a_slowed_machine_marks_the_run_unreliable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench_coarse_engine, "psnr_of", dict)
    _, body = render("coarse_engine", _payload({**QUIET, "gemm_f32_gmacs": 100.0}))
    assert "| - |" in body  # no PSNR without section coarse
    assert "**This run's timings are not reliable**" in body


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match=r"srste-4of32/checkpoints/last\.safetensors is missing"):
        checkpoint(tmp_path, 4, "srste-4of32")
