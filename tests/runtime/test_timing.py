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


def test_a_shuffled_order_runs_each_contender_once_per_round_after_varying_predecessors() -> None:
    calls: list[str] = []
    contenders = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    timings = interleaved(contenders, rounds=11, warmup=1, shuffle_seed=3)
    rounds = [calls[i : i + 4] for i in range(0, len(calls), 4)]
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    assert all(len(timings.samples[k]) == 11 for k in "abcd")
    # a rotation would always run "b" right after "a"; shuffled rounds give "b" other predecessors
    before_b = {r[r.index("b") - 1] for r in rounds if r.index("b") > 0}
    assert len(before_b) > 1
    again: list[str] = []
    interleaved({k: (lambda k=k: again.append(k)) for k in "abcd"}, rounds=11, warmup=1, shuffle_seed=3)
    assert again == calls  # the seed fixes the order


def test_speedup_is_the_median_of_paired_ratios() -> None:
    # per-round ratios 2, 4, 2.5: their median is 2.5, where the ratio of the medians would say 4
    timings = Timings({"dense": [2.0, 4.0, 10.0], "sparse": [1.0, 1.0, 4.0]})
    assert timings.speedup("sparse", "dense") == pytest.approx(2.5)
    assert timings.ratio("sparse", "dense") == pytest.approx(0.4)
    assert timings.median("dense") == 4.0
    assert paired_median([], []) != paired_median([], [])  # NaN without any round


def test_settle_pauses_before_every_call_outside_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    # a contender's spinning threads (ONNX Runtime's pool) must not steal the next one's cores: the
    # pause comes before each call, warm-up included, and is not part of any sample
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr("nmrestore.runtime.timing.time.sleep", lambda s: events.append(f"sleep {s}"))
    monkeypatch.setattr("nmrestore.runtime.timing.time.perf_counter", lambda: float(next(clock)))
    runs = {k: (lambda k=k: events.append(k)) for k in "ab"}
    timings = interleaved(runs, rounds=2, warmup=1, settle_s=0.05)
    assert events == ["sleep 0.05", "a", "sleep 0.05", "b"] * 1 + ["sleep 0.05", "b", "sleep 0.05", "a"] + [
        "sleep 0.05", "a", "sleep 0.05", "b"
    ]
    assert timings.samples == {"a": [1.0, 1.0], "b": [1.0, 1.0]}  # each sample: one clock tick, no pause
    events.clear()
    interleaved(runs, rounds=1, warmup=0)
    assert events == ["a", "b"]  # no pause unless asked


def test_prime_runs_each_contender_untimed_right_before_its_timed_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # one layer timed alone: after the pause its threads have slept; the untimed call wakes them
    events: list[str] = []
    clock = iter(range(100))
    monkeypatch.setattr("nmrestore.runtime.timing.time.sleep", lambda s: events.append("sleep"))
    monkeypatch.setattr("nmrestore.runtime.timing.time.perf_counter", lambda: float(next(clock)))
    runs = {k: (lambda k=k: events.append(k)) for k in "ab"}
    timings = interleaved(runs, rounds=1, warmup=0, settle_s=0.05, prime=True)
    assert events == ["sleep", "a", "a", "sleep", "b", "b"]
    assert timings.samples == {"a": [1.0], "b": [1.0]}  # only the second call of each is on the clock
