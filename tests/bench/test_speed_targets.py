"""The speed-targets section: kept MACs per N:M, the rates it derives, and text drawn from the figures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed_targets import kept_gmac, render, roofline_ms, vector_ceiling  # noqa: E402

PARTS = {
    "head.0 (first conv, dense)": 1.0,
    "16 residual blocks (2 convs 64->64, ReLU, skip sum)": 64.0,
    "body.16 conv 64->64 (engines: with the long skip sum)": 32.0,
    "tail.0.0 upsampler conv 64->256": 32.0,
    "tail.1 (last conv, dense)": 3.0,
}


def test_kept_macs_count_n_of_m_of_the_pruned_convs_and_all_of_the_dense_ones() -> None:
    assert kept_gmac(PARTS, "4:32") == pytest.approx(128 / 8 + 4)
    assert kept_gmac(PARTS, "2:4") == pytest.approx(64 + 4)


def _payload() -> dict[str, Any]:
    row = {"engine": "engine f32", "runtime": "openvino f32", "nm": "4:32", "wanted": 2.0,
           "runtime_ms": 400.0, "engine_ms": 250.0, "speedup_now": 1.6, "kept_gmac": 10.0,
           "roofline_ms": 50.0}  # fmt: skip
    over = {**row, "engine": "engine bf16", "runtime": "openvino default", "nm": "2:4", "wanted": 1.0,
            "runtime_ms": 50.0, "engine_ms": 100.0, "speedup_now": 0.5, "kept_gmac": 20.0,
            "roofline_ms": 40.0, "coarse_roofline_ms": 20.0, "runtime_roofline_ms": 40.0}  # fmt: skip
    sources = {"date": "d", "command": "c"}
    return {
        "model": "m", "sources": {"speed": sources, "speed_roofline": sources},
        "ceilings": {"gemm_f32_gmacs": 200.0, "gemm_bf16_gmacs": 1000.0}, "rows": [row, over],
    }  # fmt: skip


def test_rates_and_shares_come_from_the_rows() -> None:
    _, body = render("speed_targets", _payload())
    # 10 GMAC in 400 / 2 = 200 ms: 50 GMAC/s, 25% of 200; now 10 GMAC in 250 ms: 40 GMAC/s
    assert (
        "| engine f32 >= 2x openvino f32 at 4:32 | 1.60 | 400.0 | 250.0 | 200.0 | 10.00 | 40 | 50 | 25% | 5% "
        "| 50.0 | 25% | 20% | - | - |" in body
    )
    assert "ask for 25%-25% of the vector ceiling, 1.25-1.25x the rate" in body
    # 20 GMAC in 50 ms: 400 GMAC/s, twice the vector ceiling; now 20 GMAC in 100 ms: 200 GMAC/s
    assert "200% (engine bf16, 2:4; now 100%)" in body
    # roofline 50 ms of the 200 allowed, of the 250 taken now; 40 of 50 allowed, of 100 now
    assert "25% (engine f32, 4:32; now 20%), 80% (engine bf16, 2:4; now 40%)" in body
    # coarse roofline 20 ms of the 50 allowed; the runtime's own roofline 40 ms of its 50 ms
    assert "| 20.0 | 40% |" in body
    assert "targets ask for 40% (2:4) of that roofline" in body and "dense model at 80% (2:4)" in body


def test_roofline_takes_the_slower_of_compute_and_traffic_per_part() -> None:
    ceilings = {"gemm_f32_gmacs": 100.0, "gemm_bf16_gmacs": 1000.0, "copy_gbs": 10.0}
    parts = {"head.0 (first conv, dense)": (1.0, 50.0), "16 residual blocks": (64.0, 100.0), "MeanShift": (9.0, 9.0)}
    # f32 at 4:32: head max(10 ms compute, 5 ms traffic); blocks max(80 ms, 10 ms); MeanShift is no conv part
    assert roofline_ms(parts, "4:32", False, ceilings) == pytest.approx(90.0)
    # bf16: head on AMX max(1 ms, 2.5 ms); blocks stay on the vector units max(80 ms, 5 ms)
    assert roofline_ms(parts, "4:32", True, ceilings) == pytest.approx(82.5)
    # coarse: the blocks on AMX too, max(8 ms, 5 ms)
    assert roofline_ms(parts, "4:32", True, ceilings, coarse=True) == pytest.approx(10.5)


def test_the_prototype_rows_are_read_against_the_bf16_targets_they_answer() -> None:
    payload = _payload()
    payload["prototype"] = {
        "date": "p", "slowed": [],
        "rows": {"2:4": {"ms": 50.0, "runtime_ms": 50.0, "speedup": 1.0},
                 "4:32": {"ms": 10.0, "runtime_ms": 30.0, "speedup": 3.0}},
    }  # fmt: skip
    _, body = render("speed_targets", payload)
    # only 2:4 has a bf16 target against OpenVINO's default here; its coarse roofline is 20 of the 50 ms
    assert "section `coarse` (run p)" in body
    assert "50.0 ms at 2:4, 1.00x (the target is 1x), 40% of its roofline." in body
    assert "at 4:32" not in body.split("section `coarse`")[1]
    assert "slowed" not in body.split("section `coarse`")[1]
    payload["prototype"]["slowed"] = ["f32 GEMM 100 against 230"]
    _, body = render("speed_targets", payload)
    assert "That run was timed on a slowed machine (f32 GEMM 100 against 230)." in body
    del payload["prototype"]
    assert "section `coarse` (run" not in render("speed_targets", payload)[1]


def test_the_fp16_kernel_reads_against_twice_the_vector_ceiling() -> None:
    assert vector_ceiling("engine fp16", 200.0) == 400.0 and vector_ceiling("engine bf16", 200.0) == 200.0
    ceilings = {"gemm_f32_gmacs": 100.0, "gemm_bf16_gmacs": 1000.0, "copy_gbs": 10.0}
    parts = {"16 residual blocks": (64.0, 100.0)}
    # 8 GMAC at 4:32 on the vector units: 80 ms at f32's rate, 40 ms at fp16's
    assert roofline_ms(parts, "4:32", True, ceilings, vector_scale=2.0) == pytest.approx(40.0)
    payload = _payload()
    fp16 = {**payload["rows"][1], "engine": "engine fp16", "nm": "2:32", "wanted": 2.0,
            "runtime_ms": 80.0, "engine_ms": 100.0, "kept_gmac": 8.0}  # fmt: skip
    payload["rows"].append(fp16)
    _, body = render("speed_targets", payload)
    # 8 GMAC in 80 / 2 = 40 ms: 200 GMAC/s, 50% of the fp16 ceiling (400); now 80 GMAC/s, 20%
    assert "| engine fp16 >= 2x openvino default at 2:32 |" in body and "| 50% |" in body
    assert "50% (engine fp16, 2:32; now 20%)" in body
    assert "for it the 2:32 targets ask 50% of its ceiling, where the fp16 engine runs at 20% now" in body
