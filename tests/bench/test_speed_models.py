"""bench_speed's --models: each uniform row's model and scale, and a clear error for a bad item."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import model_specs  # noqa: E402

KNOWN = {"edsr_baseline", "carn"}


def test_a_name_alone_takes_its_default_scale_and_a_scale_overrides_it() -> None:
    assert model_specs("edsr_baseline:2,edsr_baseline:4,carn", KNOWN) == [
        ("edsr_baseline", 2),
        ("edsr_baseline", 4),
        ("carn", 4),
    ]
    assert model_specs(" edsr_baseline , ", KNOWN) == [("edsr_baseline", 2)]


@pytest.mark.parametrize(
    ("text", "message"),
    [("rcan:2", "unknown model 'rcan'"), ("carn:8", "the scale must be 2, 3 or 4"), (",", "no model")],
)
def test_a_bad_item_is_named(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_specs(text, KNOWN)
