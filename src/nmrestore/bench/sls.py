"""The harness's ``sls`` rows: the published SLS schedule compressed into ``finetune_steps``."""

from __future__ import annotations

from typing import Any

from nmrestore.bench.config import Row
from nmrestore.bench.context import BenchContext, finetuned_row, register_row_producer, row_key
from nmrestore.methods.sls.controller import SLSController
from nmrestore.sparsity.api import parse_nm

#: Epochs per SLS search in the harness, and the compression-ratio growth per epoch the annealing asks
#: for over a whole search: the published code's 0.2 per 1000-step epoch over its 200-epoch search
#: is 40 in all, which covers every budget down to 1/41 of the MACs (2:32 needs 16).
SLS_EPOCHS = 100


SLS_RATIO_GROWTH = 0.2 * 200


def sls_settings(steps: int, budget: float) -> dict[str, Any]:
    """SLS scaled to a short fine-tune: search in the first half, fine-tune with N frozen after.

    The published code's schedule compressed into ``steps``: the search (the first half) holds
    :data:`SLS_EPOCHS` epochs; masks are re-selected every epoch, also after N is frozen; every second
    epoch the cost coefficient grows by 1.2 if the ratio grew by less than the threshold during the
    last epoch, the threshold being :data:`SLS_RATIO_GROWTH` spread over the search's epochs, so a
    short search gets the published annealing budget, not just its constants.
    """
    search = max(1, steps // 2)
    epoch = max(1, search // SLS_EPOCHS)
    return {
        "method": "sls",
        "m": 32,
        "budget": budget,
        "budget_kind": "prunable_macs",
        "search_steps": search,
        "refresh_every": epoch,
        "anneal_interval": 2 * epoch,
        "anneal_threshold": SLS_RATIO_GROWTH * epoch / search,
        "score_lr": 0.01,
    }


@register_row_producer("sls")
def _sls(context: BenchContext, budget: str | None) -> Row | None:
    assert budget is not None
    n, m = parse_nm(budget)
    if m != 32 or n == m:
        return None  # SLS rows are the M = 32 budgets (8:32, 4:32, 2:32), as in the paper
    row = finetuned_row(context, "sls", budget, sls_settings(context.config.finetune_steps, n / m))
    if row is None or row_key(row) not in context.timed:
        return row  # a cached row: its note is already there
    controller = context.timed[row_key(row)].controller
    message = controller.message if isinstance(controller, SLSController) else ""
    if isinstance(controller, SLSController) and controller.projected:
        row["note"] = f"projected onto the budget: {message}"
    elif message:
        row["note"] = message
    return row
