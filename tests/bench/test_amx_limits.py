"""The AMX-limits section: its shares come from the figures, and an ablated kernel build loads."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_amx_limits import ABLATIONS, FULL, render  # noqa: E402


def _payload(parts_ms: dict[int, float]) -> dict[str, Any]:
    rows = [{"nm": "2:32", "build": FULL, "ms": 20.0, "speedup": 1.0}]
    rows += [{"nm": "2:32", "build": ABLATIONS[k], "ms": ms, "speedup": 20.0 / ms} for k, ms in parts_ms.items()]
    return {"threads": 2, "rounds": 3, "input": [1, 64, 180, 320], "blocks": 16, "kernel": "k", "rows": rows}


def test_the_shares_and_the_summary_are_drawn_from_the_figures() -> None:
    _, body = render("amx_limits", _payload({1: 18.0, 2: 15.0, 3: 14.0, 4: 16.0, 5: 19.8}))
    assert "| 2:32 | the gather (kept input rows into the B tiles) | 14.0 | 0.88 | 6.0 ms | 30% | 1.43x |" in body
    assert "at 2:32 (20.0 ms): the gather 30%, the second conv's epilogue 25%" in body
    assert "input latency 1%" in body
    assert "No part takes more than 30%" in body


def test_a_part_that_takes_half_the_time_is_said_so() -> None:
    _, body = render("amx_limits", _payload({3: 9.0}))
    assert "One part takes at least half of the time." in body


@pytest.mark.slow
def test_an_ablated_build_loads_and_differs_from_the_kernel() -> None:
    from nmrestore.runtime import load_kernel
    from nmrestore.runtime.kernel import load_kernel_variant

    lib = load_kernel()
    if lib is None or not lib.has_amx:
        pytest.skip("no AMX path here")
    variant = load_kernel_variant(("NMK_AMX_ABLATE=3",))
    assert variant.has_amx and variant._lib._name != lib._lib._name  # another build, cached apart
