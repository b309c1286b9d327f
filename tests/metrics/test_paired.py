"""Tile PSNR and the paired bootstrap interval: exact hand-made cases and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from nmrestore.errors import ImageError
from nmrestore.metrics.paired import beats, paired_delta
from nmrestore.metrics.psnr_ssim import psnr, tile_psnr


def test_tile_psnr_hand_made() -> None:
    ref = torch.zeros(3, 4, 6)
    img = ref.clone()
    img[:, :2, :2] = 1 / 255  # top-left 2x2 tile off by one grey level everywhere: MSE 1
    tiles = tile_psnr(img, ref, 2)
    assert len(tiles) == 6  # 2 rows x 3 columns, row-major
    assert tiles[0] == pytest.approx(10 * math.log10(255**2))
    assert all(math.isinf(t) for t in tiles[1:])


def test_tile_psnr_drops_partial_tiles_and_crops_first() -> None:
    rng = torch.Generator().manual_seed(0)
    ref, img = torch.rand(3, 10, 11, generator=rng), torch.rand(3, 10, 11, generator=rng)
    assert len(tile_psnr(img, ref, 3)) == 3 * 3
    assert len(tile_psnr(img, ref, 3, crop_border=1)) == 2 * 3
    # one tile covering the whole cropped image is the image's PSNR
    whole = tile_psnr(img[:, :8, :8], ref[:, :8, :8], 6, crop_border=1, test_y_channel=True)
    assert whole == [pytest.approx(psnr(img[:, :8, :8], ref[:, :8, :8], crop_border=1, test_y_channel=True))]
    with pytest.raises(ImageError, match="no full 20x20 tile"):
        tile_psnr(img, ref, 20)


def test_paired_delta_hand_made() -> None:
    assert paired_delta([30.0, 31.0, 32.0], [29.0, 30.0, 31.0]).to_dict() == {
        "mean": 1.0, "low": 1.0, "high": 1.0, "n": 3, "level": 0.95,
    }
    rng = np.random.default_rng(0)
    base = rng.normal(30, 3, 500)
    better = base + 0.1 + rng.normal(0, 0.05, 500)
    won, delta = beats(better, base)
    assert won and 0.09 < delta.low < delta.mean < delta.high < 0.11
    lost, reverse = beats(base, better)
    assert not lost and reverse.high < 0
    tie, same = beats(base + rng.normal(0, 0.05, 500), base)
    assert not tie and same.low < 0 < same.high
    # the interval is reproducible (fixed seed)
    assert paired_delta(better, base) == paired_delta(better, base)


def test_paired_delta_handles_exact_tiles_and_refuses_bad_input() -> None:
    d = paired_delta([math.inf, 40.0, 41.0, 42.0], [math.inf, 39.0, 39.0, 40.0])
    assert d.n == 3 and d.mean == pytest.approx(5 / 3)
    capped = paired_delta([math.inf, 40.0, 41.0], [50.0, 39.0, 40.0])
    assert capped.n == 3 and capped.mean == pytest.approx((50 + 1 + 1) / 3)
    with pytest.raises(ValueError, match="equal-length"):
        paired_delta([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2"):
        paired_delta([1.0], [0.0])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=40), st.floats(-3, 3))
@example([0.0, 0.0, 5.960464477539063e-08], 1.0)  # near-constant after the shift: the mean, not d[0] (was a bug)
def test_shifting_one_side_shifts_the_interval(diffs: list[float], shift: float) -> None:
    base = [30.0] * len(diffs)
    a = [30.0 + d for d in diffs]
    first = paired_delta(a, base)
    moved = paired_delta([v + shift for v in a], base)
    assert first.low <= first.mean <= first.high
    assert moved.mean == pytest.approx(first.mean + shift, abs=1e-9)
    # BCa counts bootstrap means below the observed one: with many tied tiles a float ulp can move a
    # tie across, so the interval shifts with the data up to a small tolerance, not to the last bit
    assert moved.low == pytest.approx(first.low + shift, abs=1e-2)
    assert moved.high == pytest.approx(first.high + shift, abs=1e-2)
