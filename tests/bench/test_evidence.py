"""The claims a table may make, on hand-made rows whose paired differences are known."""

from __future__ import annotations

from typing import Any

from nmrestore.bench.context import list_row_producers
from nmrestore.bench.evidence import ablation_lines, attach_deltas, evidence_checks

BASE = [30.0 + 0.1 * (i % 7) for i in range(40)]


def _row(method: str, budget: Any, shift: float, macs: float = 1.0) -> dict[str, Any]:
    # a tile-wise constant shift plus a little spread: its paired interval sits tightly around `shift`
    tiles = [b + shift + 0.001 * (i % 3) for i, b in enumerate(BASE)]
    return {"method": method, "budget": budget, "tiles": tiles, "psnr": sum(tiles) / len(tiles), "macs_g": macs}


def test_uniform_ste_is_a_registered_row_producer() -> None:
    assert "uniform_ste" in list_row_producers()


def test_sls_is_compared_with_the_best_uniform_row_including_the_ablation() -> None:
    rows = [_row("oneshot", "2:32", 0.0), _row("srste", "2:32", 0.01), _row("uniform_ste", "2:32", 0.05)]
    rows.append(_row("sls", "2:32", 0.03))
    checks = [(text, ok) for text, ok in evidence_checks(rows) if text.startswith("SLS vs")]
    assert len(checks) == 1
    text, ok = checks[0]
    assert "uniform_ste 2:32" in text and "reversed" in text and not ok


def test_ablation_lines_separate_the_search_from_the_gradient() -> None:
    rows = [_row("srste", "2:32", 0.0), _row("uniform_ste", "2:32", 0.0005), _row("sls", "2:32", 0.04)]
    lines = ablation_lines(rows)
    assert len(lines) == 2
    search, gradient = lines
    assert search.startswith("the search") and "sls 2:32 - uniform_ste 2:32 = +0.040" in search
    assert "interval excludes 0" in search
    assert gradient.startswith("the gradient") and "uniform_ste 2:32 - srste 2:32" in gradient


def test_no_ablation_lines_without_the_ablation_row() -> None:
    assert ablation_lines([_row("srste", "4:32", 0.0), _row("sls", "4:32", 0.04)]) == []


def test_deltas_pair_each_row_with_the_dense_row_of_its_own_task_and_scale() -> None:
    """PNG's table holds a dense and a PNG row per task (x2, x3, x4) after the harness's own dense row:
    each PNG row is compared with its task's dense row, never with another scale's."""
    rows: list[dict[str, Any]] = [
        {"method": "dense", "task": "sr", "scale": 2, "tiles": [40.0, 41.0]},
        {"method": "dense", "task": "sr_x2", "scale": 2, "tiles": [39.0, 40.0]},
        {"method": "png", "task": "sr_x2", "scale": 2, "tiles": [38.5, 40.0]},
        {"method": "dense", "task": "sr_x3", "scale": 3, "tiles": [35.0, 36.0]},
        {"method": "png", "task": "sr_x3", "scale": 3, "tiles": [35.0, 35.0]},
    ]
    attach_deltas(rows)
    assert rows[2]["vs_dense"]["mean"] == -0.25  # against sr_x2's dense row, not the harness's
    assert rows[4]["vs_dense"]["mean"] == -0.5  # against sr_x3's dense row
    assert "vs_dense" not in rows[0] and "vs_dense" not in rows[1] and "vs_dense" not in rows[3]
