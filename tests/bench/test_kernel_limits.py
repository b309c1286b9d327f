"""The kernel-limits section: its line fit, its masks, and that its text comes from the figures."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_kernel_limits import BLOCKS, SAME, M, channel_tiles, fit, masked_weight, render  # noqa: E402


def _payload(fixed_ns: float, per_weight_ns: float) -> dict[str, Any]:
    per_thread = channel_tiles(2, (2, 64))
    rows = [
        {"case": f"{n}:32", "n": n, "variant": "", "kept_per_channel": 18 * n,
         "ms": (fixed_ns + per_weight_ns * 18 * n) * per_thread / 1e6}
        for n in (1, 2, 4)
    ]  # fmt: skip
    return {
        "threads": 2, "rounds": 3, "input": [1, 64, 90, 320], "tile": [2, 64], "kernel": "k", "rows": rows,
        "same_channels_speedup": {"2:32": 2.0}, "plain_input_ratio": {"2:32": 1.25},
    }  # fmt: skip


def test_the_line_through_exact_points_gives_back_its_fixed_and_per_weight_cost() -> None:
    fixed, per_weight = fit(_payload(40.0, 4.0))
    assert fixed == pytest.approx(40.0) and per_weight == pytest.approx(4.0)


def test_the_text_is_drawn_from_the_figures() -> None:
    _, body = render("kernel_limits", _payload(40.0, 4.0))
    assert "about 40 ns fixed plus 4.0 ns per kept weight" in body
    assert "2.00x faster at 2:32 (so 50% of the time is L1 misses)" in body
    assert "1.25x the time at 2:32" in body


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("variant", ["", SAME, BLOCKS])
def test_masks_keep_n_of_every_m_input_channels(n: int, variant: str) -> None:
    w = masked_weight(n, variant)
    kept = (w != 0).reshape(64, 64 // M, M, 3, 3).sum(dim=2)
    if variant != SAME:
        assert bool((kept == n).all())
    if variant == BLOCKS:  # every block of 16 output channels shares one mask
        blocks = (w != 0).reshape(4, 16, 64, 3, 3)
        assert torch.equal(blocks[:, :1].expand_as(blocks), blocks)
    if variant == SAME:  # every output channel keeps the same input channels, one weight fewer in every fourth
        assert torch.equal(((w != 0) | (w != 0)[0]), (w != 0)[0].expand_as(w))
        assert int((kept != n).sum()) == 16 and bool((kept[3::4, 0, 0, 0] == n - 1).all())


def test_the_blocks_paragraph_is_drawn_from_the_figures() -> None:
    payload = _payload(40.0, 4.0)
    per_thread = channel_tiles(2, (2, 64))
    payload["rows"] += [
        {"case": f"{n}:32 {BLOCKS}", "n": n, "variant": BLOCKS, "kept_per_channel": 18 * n,
         "ms": (30.0 + 1.5 * 18 * n) * per_thread / 1e6}
        for n in (1, 2, 4)
    ]  # fmt: skip
    payload["blocks_speedup"] = {"4:32": 1.9}
    payload["quiet_ceilings"] = {"copy_gbs": 27.5}
    _, body = render("kernel_limits", payload)
    assert "a channel-tile costs about 30 ns fixed plus 1.5 ns per kept weight" in body
    assert "1.90x faster at 4:32" in body
    assert "7.4 MB input" in body and "27.5 GB/s" in body
