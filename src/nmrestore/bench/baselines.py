"""The baseline rows: dense fine-tuned, one-shot N:M, SR-STE, SLS's ablation and filter pruning."""

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


@register_row_producer("uniform_ste")
def _uniform_ste(context: BenchContext, budget: str | None) -> Row | None:
    """SLS's training without its search: uniform N:M from step 0, hard STE, ranks re-selected every step.

    The ablation row of SLS: it differs from an SLS row only by the search phase (SLS starts dense
    and lowers N layer by layer until the budget holds) and from SR-STE only by the gradient (plain
    straight-through instead of SR-STE's decay of the pruned weights). Run at the M = 32 budgets.
    """
    assert budget is not None
    n, m = parse_nm(budget)
    if m != 32 or n == m:
        return None
    sparsity = {"method": "srste", "n": n, "m": m, "grad_mode": "hard", "refresh_every": 1}
    return finetuned_row(context, "uniform_ste", budget, sparsity)


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
