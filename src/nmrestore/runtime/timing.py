"""Interleaved timing: the one way nmrestore compares the speed of two or more things.

Every contender runs once per round, the order rotated by one place every round (or drawn at random
each round), so a slow phase of the machine (another process, thermal throttling) hits all of them
alike. The first ``warmup`` rounds are run and discarded (allocator, caches, lazily chosen kernels).

**Speed-up** (one definition, used by ``nmrestore speed``, the benchmark harness and every script in
``benchmarks/``): the median over rounds of ``t_reference / t_candidate``, both times taken in the
same round. A time *ratio* (e.g. a training step against the dense one) is the median over rounds
of ``t_candidate / t_reference``. Pairing by round makes both robust to drifts that a ratio of two
separately taken medians is not.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Timings:
    """Seconds of every timed round, per contender, in round order."""

    samples: dict[str, list[float]]

    def median(self, key: str) -> float:
        """Median seconds of ``key``."""
        return statistics.median(self.samples[key])

    def ratio(self, candidate: str, reference: str) -> float:
        """Median over rounds of ``t_candidate / t_reference`` (1.5: the candidate takes 50% longer)."""
        return paired_median(self.samples[candidate], self.samples[reference])

    def speedup(self, candidate: str, reference: str) -> float:
        """Median over rounds of ``t_reference / t_candidate`` (2.0: the candidate is twice as fast)."""
        return paired_median(self.samples[reference], self.samples[candidate])


def paired_median(numerators: list[float], denominators: list[float]) -> float:
    """Median of the per-round ratios ``numerators[r] / denominators[r]`` (NaN when there is none)."""
    ratios = [a / b for a, b in zip(numerators, denominators, strict=True) if b > 0]
    return statistics.median(ratios) if ratios else float("nan")


#: Pause before each timed call when other runtimes take part (``settle_s``). ONNX Runtime's thread
#: pool spins for more than 10 ms after a run: a conv timed right after it took 1.7-2x its time here
#: (16.4 ms against 8.1 ms with spinning off); after a 50 ms pause it takes its own time.
PEER_SETTLE_S = 0.05


def interleaved(
    runs: Mapping[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    settle_s: float = 0.0,
    prime: bool = False,
    shuffle_seed: int | None = None,
) -> Timings:
    """Time every callable of ``runs`` once per round for ``warmup + rounds`` rounds, order rotating.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before the clock starts and before it
    stops, so asynchronous devices are timed to completion. ``settle_s``: seconds to sleep (untimed)
    before every call, so threads a contender leaves spinning do not steal the next one's cores
    (see :data:`PEER_SETTLE_S`). ``prime``: run the contender once more, untimed, right before each
    timed call (after the pause), so its threads are awake as they are for a layer in the middle of a
    forward; for timing one layer alone, where waking threads that slept through the pause took up
    to 10 ms on this machine (a 0.06 ms conv: 9.8 ms after a 50 ms pause). ``shuffle_seed``: draw each
    round's order at random (seeded) instead: a rotation keeps the cyclic order, so each contender
    always follows the same one, and whatever that one leaves behind (warm threads of the same runtime,
    cache contents) favours it every round.
    """
    keys = list(runs)
    samples: dict[str, list[float]] = {key: [] for key in keys}
    draw = random.Random(shuffle_seed) if shuffle_seed is not None else None
    for r in range(warmup + rounds):
        shift = r % len(keys)
        order = draw.sample(keys, len(keys)) if draw is not None else keys[shift:] + keys[:shift]
        for key in order:
            if settle_s > 0:
                time.sleep(settle_s)
            if prime:
                runs[key]()
            if sync is not None:
                sync()
            started = time.perf_counter()
            runs[key]()
            if sync is not None:
                sync()
            if r >= warmup:
                samples[key].append(time.perf_counter() - started)
    return Timings(samples)
