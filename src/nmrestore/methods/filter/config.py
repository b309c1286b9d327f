"""Filter pruning's typed config: the MAC target (an N:M budget or a fraction) and its tolerance."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from nmrestore.errors import SparsityError
from nmrestore.sparsity.api import (
    NMConfig,
    parse_nm,
)

#: Relative distance to the MAC target that counts as "on target" (2%).
DEFAULT_TOLERANCE = 0.02


#: LR input used to trace the graph; tracing is shape-agnostic, small is fast.
DEFAULT_TRACE_SIZE = (16, 16)


class FilterConfig(NMConfig):
    """L1 filter pruning to a whole-network MAC fraction (``method: filter``).

    Give either ``target_macs_fraction`` (of the dense whole-network MACs at the MAC-count input)
    or ``budget`` (``"8:32"``: the whole-network fraction that uniform N:M at that budget reaches
    on the same model, with N:M's default first/last-dense rule, so filter rows match N:M rows).

    The inherited N:M fields do not apply: ``n`` and ``m`` stay 1 (whole channels are removed,
    what remains is dense; ``m = 1`` also makes every conv pass ``sparsify_``'s shape rule),
    ``routes``/``grad_mode``/``srste_lambda`` are ignored. The layers ``sparsify_`` hands over
    (after ``filter_fn`` and ``dense_first_last``) are those whose *output* channels may be
    pruned; ``dense_first_last`` defaults to False here because the first conv's filters are the
    residual stream's (a True value protects it, and with it every channel coupled to it).
    """

    method: Literal["filter"] = "filter"  # type: ignore[assignment]
    n: int = Field(1, ge=1, le=1, description="unused by filter pruning (whole channels are removed)")
    m: int = Field(1, ge=1, le=1, description="unused by filter pruning (whole channels are removed)")
    dense_first_last: bool = False
    target_macs_fraction: float | None = Field(None, gt=0, le=1)
    budget: str | None = Field(
        None, description="an N:M budget whose whole-network MAC fraction is the target"
    )
    tolerance: float = Field(DEFAULT_TOLERANCE, gt=0, lt=1, description="relative distance to the MAC target")
    min_channels: int = Field(1, ge=1, description="fewest output channels a group keeps")
    trace_size: tuple[int, int] = DEFAULT_TRACE_SIZE
    input_size: tuple[int, int] | None = None  # LR input for MAC counts; None: 1280x720 output

    #: The handler changes parameter shapes: a checkpoint is rebuilt by running it on a fresh model.
    changes_shapes: ClassVar[bool] = True

    @model_validator(mode="after")
    def _one_target(self) -> FilterConfig:
        if self.out_block != 1:
            raise ValueError("filter pruning removes whole channels; out_block is for N:M masks (use 1)")
        if (self.target_macs_fraction is None) == (self.budget is None):
            raise ValueError(
                "filter pruning needs exactly one of target_macs_fraction or budget (e.g. '8:32')"
            )
        if self.budget is not None:
            try:
                parse_nm(self.budget)
            except SparsityError as exc:
                raise ValueError(f"budget: {exc}") from None
        if self.routes is not None:
            raise ValueError("filter pruning has a single route; routes do not apply")
        return self
