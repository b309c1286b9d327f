"""What an SLS budget counts (prunable MACs, MACs or params) and whether a set of N meets it."""

from __future__ import annotations

from torch import nn

from nmrestore.cost import CostReport, count_cost
from nmrestore.errors import SparsityError
from nmrestore.methods.sls.config import SLSConfig
from nmrestore.sparsity.api import (
    PRUNABLE_TYPES,
    LayerInfo,
)
from nmrestore.sparsity.parametrization import dense_weight

#: Relative slack when comparing a cost with the budget (float rounding of large MAC counts).
BUDGET_RTOL = 1e-9


def _in_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, PRUNABLE_TYPES):
            channels = getattr(module, "in_channels", None)
            if channels is None:
                raise SparsityError(
                    "cannot count MACs of a model whose first layer is a Linear; use budget_kind='params'"
                )
            return int(channels)
    return 3


def count_at(model: nn.Module, input_size: tuple[int, int] | None) -> CostReport:
    """Dense per-layer MACs, with an error that says what to do when the forward cannot be traced."""
    try:
        return count_cost(model, input_size, in_channels=_in_channels(model))
    except SparsityError:
        raise
    except Exception as exc:  # a model that takes no image input of that shape
        raise SparsityError(
            f"cannot count the MACs of this model ({type(exc).__name__}: {exc}); "
            "set input_size to a size its forward accepts, or use budget_kind='params'"
        ) from exc


class Budget:
    """Per-layer costs for one budget kind: ``C = fixed + sum_l N_l / M * cost_l``."""

    def __init__(
        self, names: list[str], costs: list[float], fixed: float, reference: float, kind: str
    ) -> None:
        self.names = names
        self.costs = costs
        self.fixed = fixed
        self.reference = reference
        self.kind = kind

    @classmethod
    def build(cls, model: nn.Module, layers: list[LayerInfo], config: SLSConfig) -> Budget:
        names = [layer.name for layer in layers]
        if config.budget_kind == "params":
            costs = [float(dense_weight(layer.module).numel()) for layer in layers]
            return cls(names, costs, 0.0, float(sum(costs)), "params")
        report = count_at(model, config.input_size)
        macs = {layer.name: float(layer.dense_macs) for layer in report.layers}
        costs = [macs.get(name, 0.0) for name in names]
        prunable = sum(costs)
        if config.budget_kind == "macs":
            reference = float(report.dense_macs)
            fixed = reference - prunable  # dense layers and non-Conv/Linear MACs count at full cost
        else:
            reference, fixed = prunable, 0.0
        if reference <= 0:
            raise SparsityError("the prunable layers perform no MACs for this input; check input_size")
        return cls(names, costs, fixed, reference, config.budget_kind)

    def fraction(self, ns: list[int], m: int) -> float:
        return (self.fixed + sum(n / m * c for n, c in zip(ns, self.costs, strict=True))) / self.reference

    def weights(self, m: int) -> list[float]:
        """d(C / C_ref) / dN_l: each layer's cost of one more kept rank, normalised (O(1) numbers)."""
        return [c / (m * self.reference) for c in self.costs]

    def minimum(self, m: int) -> float:
        return self.fraction([1] * len(self.costs), m)


def meets_budget(fraction: float, budget: float) -> bool:
    return fraction <= budget * (1 + BUDGET_RTOL)
