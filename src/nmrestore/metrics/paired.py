"""Paired comparisons of two restorers on the same images, with a bootstrap confidence interval.

Differences between sparsity methods are often 0.05-0.3 dB, the size of the image-to-image noise of a
small test set. The unit of resampling is a fixed HR tile (e.g. 96x96 at x4): every method is scored on
the same tiles, the per-tile PSNR differences ``a - b`` are resampled with a fixed seed, and the 95%
interval of their mean says whether ``a`` beats ``b``. :func:`beats` only claims a win when the whole
interval lies above 0. The interval is SciPy's bias-corrected and accelerated (BCa) bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PairedDelta", "beats", "paired_delta"]

#: Resamples and seed of every interval nmrestore publishes (fixed, so a rerun prints the same CI).
N_RESAMPLES = 10_000
SEED = 0


@dataclass(frozen=True)
class PairedDelta:
    """Mean of ``a - b`` over the paired units, and its confidence interval."""

    mean: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return f"{self.mean:+.3f} dB [{self.low:+.3f}, {self.high:+.3f}]"

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "low": self.low, "high": self.high, "n": self.n, "level": self.level}


def paired_delta(
    a: Sequence[float], b: Sequence[float], level: float = 0.95, n_resamples: int = N_RESAMPLES, seed: int = SEED
) -> PairedDelta:
    """The mean paired difference ``a - b`` and its bootstrap CI (``a``, ``b``: per-tile PSNRs).

    Tiles where both are infinite (both exact) carry no information and are dropped; a tile exact for
    one side only gets the other's PSNR capped at 100 dB, so the difference stays finite.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be two equal-length 1-D sequences, got {x.shape} and {y.shape}")
    keep = ~(np.isinf(x) & np.isinf(y))
    d = np.minimum(x[keep], 100.0) - np.minimum(y[keep], 100.0)
    if d.size < 2:
        raise ValueError("a paired interval needs at least 2 tiles")
    if np.allclose(d, d[0]):  # no spread to resample: the interval is the mean itself
        mean = float(d.mean())  # not d[0]: "close" allows a spread of 1e-5 relative
        return PairedDelta(mean, mean, mean, int(d.size), level)
    result = stats.bootstrap(
        (d,),
        np.mean,
        confidence_level=level,
        n_resamples=n_resamples,
        method="BCa",
        random_state=np.random.default_rng(seed),
    )
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if math.isnan(low) or math.isnan(high):  # degenerate BCa (near-constant data): use the percentile CI
        low, high = (float(v) for v in np.percentile(d, [50 * (1 - level), 50 * (1 + level)]))
    return PairedDelta(float(d.mean()), low, high, int(d.size), level)


def beats(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> tuple[bool, PairedDelta]:
    """Whether ``a`` beats ``b`` (the CI of the mean tile-PSNR difference lies above 0), and the delta."""
    delta = paired_delta(a, b, level)
    return delta.low > 0, delta
