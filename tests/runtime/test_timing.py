"""The one timing helper: rotating interleaved rounds, warm-up discarded, paired ratios."""

from __future__ import annotations

import pytest

from nmrestore.runtime.timing import Timings, interleaved, paired_median


def test_rounds_rotate_and_warmup_is_discarded() -> None:
    calls: list[str] = []
    timings = interleaved({k: (lambda k=k: calls.append(k)) for k in "abc"}, rounds=3, warmup=1)
    # round r starts at key r % 3
    assert calls == list("abc" "bca" "cab" "abc")
    assert all(len(timings.samples[k]) == 3 for k in "abc")


def test_speedup_is_the_median_of_paired_ratios() -> None:
    # per-round ratios 2, 4, 2.5: their median is 2.5, where the ratio of the medians would say 4
    timings = Timings({"dense": [2.0, 4.0, 10.0], "sparse": [1.0, 1.0, 4.0]})
    assert timings.speedup("sparse", "dense") == pytest.approx(2.5)
    assert timings.ratio("sparse", "dense") == pytest.approx(0.4)
    assert timings.median("dense") == 4.0
    assert paired_median([], []) != paired_median([], [])  # NaN without any round
