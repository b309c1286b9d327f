"""What filter pruning did (channels per group, the MAC target) and its controller, which records the pruned shapes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from nmrestore.errors import SparsityError
from nmrestore.sparsity.api import (
    Controller,
)


@dataclass(frozen=True)
class GroupChannels:
    """One group of coupled output channels: its root layer, the layers it spans, before/after."""

    root: str
    layers: tuple[str, ...]
    before: int
    after: int


@dataclass
class FilterReport:
    """What :func:`filter_prune_` did."""

    target_fraction: float
    achieved_fraction: float
    tolerance: float
    dense_macs: int
    macs: int
    groups: list[GroupChannels] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # weight shape after, per layer
    dense_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # weight shape before
    protected: list[str] = field(default_factory=list)  # layers whose output channels were kept

    @property
    def within_tolerance(self) -> bool:
        return abs(self.achieved_fraction - self.target_fraction) <= self.tolerance * self.target_fraction

    @property
    def channels(self) -> dict[str, int]:
        """Output channels per layer after pruning."""
        return {name: int(shape[0]) for name, shape in self.shapes.items()}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["within_tolerance"] = self.within_tolerance
        out["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        out["dense_shapes"] = {k: list(v) for k, v in self.dense_shapes.items()}
        return out

    def table(self) -> str:
        lines = [
            f"filter pruning: {self.achieved_fraction:.2%} of dense MACs (target {self.target_fraction:.2%}"
            f" +/- {self.tolerance:.0%}), {self.macs / 1e9:.2f} of {self.dense_macs / 1e9:.2f} GMACs"
        ]
        for g in self.groups:
            lines.append(f"  group {g.root:<28} {g.before:>5} -> {g.after:<5} ({len(g.layers)} layers)")
        if self.protected:
            lines.append(f"  output channels kept: {', '.join(self.protected)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


class FilterController(Controller):
    """The Trainer-facing state of filter pruning: nothing to do per step; remembers the shapes.

    Its ``state_dict`` goes into every checkpoint's meta, so the pruned shapes are on record.
    """

    def __init__(self, report: FilterReport) -> None:
        self.report = report

    def step(self, step: int) -> None:
        return None

    def regularizer(self) -> dict[str, Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"filter": self.report.to_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("filter", {}).get("shapes")
        if saved is not None and {k: list(v) for k, v in self.report.shapes.items()} != saved:
            raise SparsityError("the checkpoint's filter-pruned shapes differ from this model's")
