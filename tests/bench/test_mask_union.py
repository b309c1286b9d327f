"""The mask-union section: exact unions of hand-made masks, and its rendering."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_mask_union import block_union, independent_union, render  # noqa: E402


def _masks(rows_of_channels: list[list[int]], m: int = 8) -> torch.Tensor:
    """(O, 1, M) masks, channel c keeping the rows listed for it."""
    groups = torch.zeros(len(rows_of_channels), 1, m, dtype=torch.bool)
    for channel, rows in enumerate(rows_of_channels):
        groups[channel, 0, rows] = True
    return groups


def test_channels_that_share_a_mask_need_only_its_rows() -> None:
    groups = _masks([[1, 5]] * 4)
    assert block_union(groups, 4, greedy=False) == 2.0
    assert block_union(groups, 4, greedy=True) == 2.0


def test_greedy_order_groups_alike_channels_that_natural_order_mixes() -> None:
    groups = _masks([[0, 1], [6, 7]] * 4)  # two disjoint masks, alternating
    assert block_union(groups, 4, greedy=False) == 4.0  # each block holds both masks
    assert block_union(groups, 4, greedy=True) == 2.0  # each block one mask


def test_the_union_is_averaged_over_groups() -> None:
    groups = torch.zeros(2, 2, 4, dtype=torch.bool)
    groups[0, 0, 0] = groups[1, 0, 1] = True  # group 0: rows 0 and 1
    groups[0, 1, 2] = groups[1, 1, 2] = True  # group 1: row 2 twice
    assert block_union(groups, 2, greedy=False) == 1.5


def test_channels_must_fill_whole_blocks() -> None:
    with pytest.raises(ValueError, match="not a multiple of 4"):
        block_union(_masks([[0]] * 6), 4, greedy=False)


def test_independent_masks_expectation() -> None:
    assert independent_union(1, 2, 1) == pytest.approx(1.0)
    assert independent_union(2, 32, 16) == pytest.approx(32 * (1 - (30 / 32) ** 16))


def test_render_reports_the_least_and_the_densest_per_channel_union() -> None:
    def ckpt(run: str, n: int, out_block: int, greedy: float) -> dict[str, object]:
        layer = {
            "layer": "l",
            "n": n,
            "m": 32,
            "out_block": out_block,
            "natural": greedy + 1,
            "greedy": greedy,
        }
        return {"scale": 4, "run": run, "layers": [layer, layer]}

    payload = {
        "block": 16,
        "checkpoints": [ckpt("a", 4, 1, 26.0), ckpt("b", 2, 1, 18.0), ckpt("c", 2, 16, 2.0)],
    }
    title, body = render("mask_union", payload)
    assert "AMX" in title
    assert "| x4 a | per-channel | 2 | 4.00 of 32 | 27.00 | 26.00 | 28.22 | 6.50x | 81% |" in body
    assert "| x4 c | block-shared | 2 | 2.00 of 32 | 3.00 | 2.00 | 20.61 | 1.00x | 6% |" in body
    assert "needs 6.50x the K rows of its own kept weights at best (x4 a)" in body
    assert "up to 81% of the dense K axis (x4 a)" in body
