"""The baseline rows: dense fine-tuned, one-shot N:M, SR-STE and filter pruning."""

from __future__ import annotations

from nmrestore.bench.config import Row
from nmrestore.bench.context import BenchContext, finetuned_row, register_row_producer, row_key
from nmrestore.methods.filter.controller import FilterController
from nmrestore.sparsity.api import parse_nm


@register_row_producer("dense_ft", per_budget=False)
def _dense_ft(context: BenchContext, budget: str | None) -> Row | None:
    """The dense model fine-tuned for the same steps: the control for 'fine-tuning alone'."""
    return finetuned_row(context, "dense_ft", None, None)


@register_row_producer("oneshot")
def _oneshot(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    return finetuned_row(context, "oneshot", budget, {"method": "oneshot", "n": n, "m": m})


@register_row_producer("srste")
def _srste(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    return finetuned_row(context, "srste", budget, {"method": "srste", "n": n, "m": m})


@register_row_producer("filter")
def _filter(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    _, m = parse_nm(budget)
    row = finetuned_row(
        context,
        "filter",
        budget,
        {"method": "filter", "budget": budget},
        prunable_names=context.nm_prunable_names(m),
    )
    if row is None or row_key(row) not in context.timed:
        return row  # a cached row: its note is already there
    controller = context.timed[row_key(row)].controller
    if isinstance(controller, FilterController):
        report = controller.report
        row["target_macs_fraction"] = report.target_fraction
        row["note"] = (
            f"target {report.target_fraction:.4f}, channels "
            + "/".join(f"{g.after}" for g in report.groups[:2])
            + (" ..." if len(report.groups) > 2 else "")
        )
    return row
