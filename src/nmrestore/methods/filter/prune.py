"""Planning channels per group to meet the MAC target, then pruning the lowest-L1 channels of each group."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import BudgetError, SparsityError
from nmrestore.methods.filter.config import DEFAULT_TOLERANCE, DEFAULT_TRACE_SIZE, FilterConfig
from nmrestore.methods.filter.controller import FilterReport, GroupChannels
from nmrestore.methods.filter.graph import (
    ChannelGroup,
    classify_layers,
    example_input,
    layer_name_map,
    subpixel_groups,
    tp_groups,
    weight_axes,
)
from nmrestore.sparsity.api import (
    PRUNABLE_TYPES,
    eligible_layers,
    parse_nm,
)
from nmrestore.sparsity.parametrization import nm_layers

log = logging.getLogger(__name__)


class _MacModel:
    """MACs predicted from weight shapes: a layer's MACs are proportional to ``shape[0] * shape[1]``.

    The factor (kernel size x output pixels) comes from a real ``count_cost``, so no per-op formula
    is written here; the prediction only serves to plan, the result is measured again.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] | None, groups: list[ChannelGroup]) -> None:
        cost = count_cost(model, input_size)
        modules = dict(model.named_modules())
        self.unit: dict[nn.Module, float] = {}
        self.shape: dict[nn.Module, tuple[int, int]] = {}
        for layer in cost.layers:
            module = modules[layer.name]
            w = module.weight.shape
            self.unit[module] = layer.dense_macs / max(1, w[0] * w[1])
            self.shape[module] = (int(w[0]), int(w[1]))
        self.other = cost.dense_macs - sum(layer.dense_macs for layer in cost.layers)
        self.groups = groups

    def macs(self, removed: Sequence[int]) -> float:
        """Predicted MACs after removing ``removed[i]`` more channels from group i."""
        shapes = {m: list(s) for m, s in self.shape.items()}
        for group, k in zip(self.groups, removed, strict=True):
            if k:
                for module, axis, per_channel in group.members:
                    if module in shapes:
                        shapes[module][axis] -= k * per_channel
        return self.other + sum(self.unit[m] * max(s[0], 0) * max(s[1], 0) for m, s in shapes.items())


def _plan(
    mac_model: _MacModel, groups: list[ChannelGroup], goal: float, tolerance: float, min_channels: int
) -> list[int]:
    """Channels to remove per group (see the module docstring for the policy)."""
    removed = [0] * len(groups)
    high, low = goal * (1 + tolerance), goal * (1 - tolerance)
    current = mac_model.macs(removed)
    while current > goal:
        order = sorted(
            (i for i, g in enumerate(groups) if g.channels - removed[i] > min_channels),
            key=lambda i: (-(groups[i].channels - removed[i]) / groups[i].initial, i),
        )
        chosen: int | None = None
        closest: tuple[float, int] | None = None
        for i in order:
            removed[i] += 1
            macs = mac_model.macs(removed)
            removed[i] -= 1
            if macs >= low:
                chosen = i
                break
            if closest is None or abs(macs - goal) < closest[0]:
                closest = (abs(macs - goal), i)
        if chosen is None:
            # every group is at min_channels, or every single removal lands below the band
            if current > high and closest is not None and closest[0] < abs(current - goal):
                removed[closest[1]] += 1
            break
        removed[chosen] += 1
        macs = mac_model.macs(removed)
        if current <= high and abs(macs - goal) > abs(current - goal):
            removed[chosen] -= 1  # already in the band, and this step moves away from the target
            break
        current = macs
    return removed


def _l1(weight: Tensor, axis: int) -> Tensor:
    """L1 norm of every slice of ``weight`` along ``axis``."""
    return weight.detach().abs().transpose(0, axis).flatten(1).sum(1)


@torch.no_grad()
def _prune_group(
    graph: tp.DependencyGraph, group: ChannelGroup, count: int, importance: tp.importance.Importance
) -> None:
    """Remove the ``count`` channels of lowest group L1 norm."""
    if group.consumers:  # sub-pixel group: producer rows in blocks of r**2, consumer inputs one by one
        producer_axis = weight_axes(group.root)[0]
        per_layer = [_l1(group.root.weight, producer_axis).view(group.channels, group.factor).sum(1)]
        per_layer += [_l1(c.weight, weight_axes(c)[1]) for c in group.consumers]
        scores = torch.stack(per_layer).mean(0)
        idxs = sorted(torch.argsort(scores.cpu(), stable=True)[:count].tolist())
        rows = [c * group.factor + j for c in idxs for j in range(group.factor)]
        graph.get_pruner_of_module(group.root).prune_out_channels(group.root, rows)
        for consumer in group.consumers:
            graph.get_pruner_of_module(consumer).prune_in_channels(consumer, idxs)
        return
    pruner = graph.get_pruner_of_module(group.root)
    full = graph.get_pruning_group(group.root, pruner.prune_out_channels, list(range(group.channels)))
    scores = importance(full)
    if scores is None:  # nothing to rank (no Conv/Linear weight in the group): keep graph order
        scores = torch.arange(group.channels, dtype=torch.float32)
    idxs = sorted(torch.argsort(scores.detach().cpu(), stable=True)[:count].tolist())
    pruned = graph.get_pruning_group(group.root, pruner.prune_out_channels, idxs)
    if not graph.check_pruning_group(pruned):
        raise SparsityError(f"Torch-Pruning refuses to prune {count} channels of group {group.root_name}")
    pruned.prune()


def filter_prune_(
    model: nn.Module,
    target_fraction: float,
    example_input_size: tuple[int, int] = DEFAULT_TRACE_SIZE,
    prunable: Iterable[str] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    input_size: tuple[int, int] | None = None,
    min_channels: int = 1,
    max_rounds: int = 3,
) -> FilterReport:
    """Prune output channels of ``model`` in place until its MACs are ``target_fraction`` of dense.

    Args:
        model: a dense model (no N:M masks); modified in place (same module objects, smaller weights).
        target_fraction: whole-network MACs to reach, as a fraction of the model's current MACs.
        example_input_size: LR (height, width) used to trace the dependency graph.
        prunable: names of the layers whose output channels may be pruned (None: all); layers
            whose outputs are fixed by the data (sub-pixel shuffles, the network output) never are.
        tolerance: relative distance to the target that is accepted.
        input_size: LR input of the MAC counts (None: the 1280x720-output convention).
        min_channels: fewest output channels any group keeps.
        max_rounds: plan/prune/measure rounds when the measured MACs disagree with the plan.

    Raises:
        BudgetError: the target is above 1 or below what the protected layers alone cost.
    """
    if not 0 < target_fraction <= 1:
        raise BudgetError(f"the MAC target must be a fraction in (0, 1], got {target_fraction}")
    if any(True for _ in nm_layers(model)):
        raise SparsityError("filter pruning needs a dense model; squash_ the N:M masks first")
    names = layer_name_map(model)
    dense_shapes = {
        name: tuple(int(s) for s in module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }
    dense_macs = count_cost(model, input_size).dense_macs
    goal = target_fraction * dense_macs
    example = example_input(model, example_input_size)
    was_training = model.training
    # in-place activations rewrite a conv output's grad_fn, which hides the conv from the tracer
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    model.eval()
    try:
        for module in inplace:
            module.inplace = False  # type: ignore[assignment]
        with torch.no_grad():
            expected_shape = tuple(model(example).shape)
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    finally:
        model.train(was_training)
        for module in inplace:
            module.inplace = True  # type: ignore[assignment]
    allowed = None if prunable is None else set(prunable)
    fixed, producers = classify_layers(graph)
    ignored = [
        m
        for m, name in names.items()
        if isinstance(m, PRUNABLE_TYPES) and (m in fixed or (allowed is not None and name not in allowed))
    ]
    importance = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    initial: dict[str, int] = {}

    def current_groups() -> list[ChannelGroup]:
        groups = tp_groups(graph, ignored, names) + subpixel_groups(producers, allowed, names)
        for g in groups:
            g.initial = initial.setdefault(g.root_name, g.channels)
        return groups

    achieved = float(dense_macs)
    for _ in range(max_rounds):
        groups = current_groups()
        removed = _plan(_MacModel(model, input_size, groups), groups, goal, tolerance, min_channels)
        for group, count in zip(groups, removed, strict=True):
            if count:
                _prune_group(graph, group, count, importance)
        achieved = float(count_cost(model, input_size).dense_macs)
        if achieved <= goal * (1 + tolerance) or not any(removed):
            break
    with torch.no_grad():
        model.eval()
        try:
            shape = tuple(model(example).shape)
        finally:
            model.train(was_training)
    if shape != expected_shape:
        raise SparsityError(f"filter pruning broke the model: output {shape}, expected {expected_shape}")
    pruned_groups = current_groups()
    shuffled = {g.root for g in pruned_groups if g.consumers}
    report = FilterReport(
        target_fraction=float(target_fraction),
        achieved_fraction=achieved / dense_macs,
        tolerance=tolerance,
        dense_macs=int(dense_macs),
        macs=int(achieved),
        groups=[
            GroupChannels(g.root_name, tuple(names.get(m, "?") for m in g.out_layers), g.initial, g.channels)
            for g in pruned_groups
        ],
        shapes={
            name: tuple(int(s) for s in module.weight.shape)
            for name, module in model.named_modules()
            if isinstance(module, PRUNABLE_TYPES)
        },
        dense_shapes=dense_shapes,
        protected=sorted(names[m] for m in fixed if m in names and m not in shuffled),
    )
    if achieved > goal * (1 + tolerance):
        raise BudgetError(
            f"filter pruning cannot go below {report.achieved_fraction:.2%} of the dense MACs "
            f"(target {target_fraction:.2%}): the layers whose channels are fixed cost too much"
        )
    if not report.within_tolerance:
        log.warning(
            "filter pruning landed at %.4f of dense MACs, target %.4f",
            report.achieved_fraction,
            target_fraction,
        )
    return report


def nm_budget_fraction(
    model: nn.Module, n: int, m: int, input_size: tuple[int, int] | None = None, dense_first_last: bool = True
) -> float:
    """Whole-network MAC fraction that uniform N:M reaches on ``model`` (the filter rows' target).

    Uses :func:`~nmrestore.sparsity.api.eligible_layers` with N:M's rules (M-divisible inputs,
    first/last dense), so it is exactly what ``sparsify_(model, NMConfig(n=n, m=m))`` would count.
    """
    layers, _ = eligible_layers(model, m, None, dense_first_last)
    pruned = {layer.name for layer in layers}
    cost = count_cost(model, input_size)
    saved = sum(layer.dense_macs for layer in cost.layers if layer.name in pruned) * (1 - n / m)
    return (cost.dense_macs - saved) / cost.dense_macs


def target_fraction_of(model: nn.Module, config: FilterConfig) -> float:
    """The MAC fraction a :class:`FilterConfig` asks for on ``model``."""
    if config.target_macs_fraction is not None:
        return float(config.target_macs_fraction)
    assert config.budget is not None
    n, m = parse_nm(config.budget)
    return nm_budget_fraction(model, n, m, config.input_size)
