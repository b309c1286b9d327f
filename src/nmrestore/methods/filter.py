"""Filter (channel) pruning to a MAC target: the structured baseline of the SLS tables (DESIGN.md §3.1).

Whole output channels are removed, ranked by their group L1 norm, through Torch-Pruning's
:class:`~torch_pruning.DependencyGraph`, which keeps coupled layers consistent: EDSR's residual adds
tie the head conv, every block's second conv and the body's last conv into one group of channels
(pruned together), while each block's inner channels form a group of their own.

Two kinds of layer need care because their channel count is tied to the data layout:

* a convolution whose output reaches the network output (the image's colour channels) keeps all
  its output channels (it is listed in :attr:`FilterReport.protected`); its inputs still shrink;
* a convolution feeding a ``PixelShuffle(r)`` (the sub-pixel upsampler) holds ``C * r**2``
  channels that Torch-Pruning would couple one-to-one with the next conv's ``C`` inputs, which is
  wrong. It is kept out of Torch-Pruning and pruned here instead, in blocks of ``r**2`` rows
  together with the matching input channel of every consumer (a "sub-pixel group"). Without this
  the x4 upsampler's second conv, a third of EDSR-baseline x4's MACs, could never shrink and the
  low budgets (8:32 and below) would be out of reach.

**Which channels, how many.** The number of channels per group is planned before any weight is
touched: starting from the dense model, one channel at a time is taken from the group with the
largest kept fraction (ties: graph order), skipping a removal that would land more than
``tolerance`` below the target, until the whole-network MACs reach ``target * dense MACs`` (or
the closest point within ``tolerance``, relative, that one more channel can reach). So every group keeps about the same fraction of its channels (the
uniform-ratio variant of L1 filter pruning), the small groups make the fine adjustment, and the
resulting *shapes* depend only on the architecture and the target, never on the weights. That is
what lets a pruned checkpoint be rebuilt by pruning a freshly built model again (see
:attr:`FilterConfig.changes_shapes`). The L1 norms then only choose *which* channels go: per
channel, the mean over the group's layers of that channel's L1 norm (Torch-Pruning's
``MagnitudeImportance(p=1, group_reduction="mean")``; filters and the consumers' input slices).
MACs are predicted per layer from one :func:`~nmrestore.cost.count_cost` of the model (a layer's
MACs scale with ``weight.shape[0] * weight.shape[1]``) and the result is measured with
``count_cost`` again; a mismatch re-plans from the pruned model.

Filter pruning changes shapes, so it does not fit the mask model of :func:`~nmrestore.sparsify_`:
registered as method ``"filter"``, its handler prunes the model in place, attaches no mask and
returns a :class:`FilterController` whose ``state_dict`` (saved in every checkpoint's meta by the
Trainer) records the pruned shapes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch_pruning as tp
from pydantic import Field, model_validator
from torch import Tensor, nn

from nmrestore.cost import count_cost
from nmrestore.errors import BudgetError, SparsityError
from nmrestore.sparsity.api import (
    PRUNABLE_TYPES,
    Controller,
    LayerInfo,
    NMConfig,
    eligible_layers,
    parse_nm,
    register_method,
)
from nmrestore.sparsity.parametrization import nm_layers

log = logging.getLogger(__name__)

#: Relative distance to the MAC target that counts as "on target" (2%).
DEFAULT_TOLERANCE = 0.02

#: LR input used to trace the graph; tracing is shape-agnostic, small is fast.
DEFAULT_TRACE_SIZE = (16, 16)

_CHANNEL_SHUFFLES = ("PixelShuffle", "PixelUnshuffle", "ChannelShuffle")


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


# -- the graph --------------------------------------------------------------------------------
@dataclass
class _Group:
    """Coupled output channels: ``members`` are (layer, weight axis, weight slices per channel)."""

    root: nn.Module
    root_name: str
    members: list[tuple[nn.Module, int, float]]
    out_layers: list[nn.Module]
    channels: int
    initial: int
    consumers: list[nn.Module] = field(default_factory=list)  # sub-pixel groups only
    factor: int = 1  # sub-pixel groups: r**2 producer channels per kept channel


def _layer_name_map(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def _example_input(model: nn.Module, trace_size: tuple[int, int]) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)), None)
    channels = 3
    if isinstance(first, nn.Conv2d | nn.ConvTranspose2d):
        channels = first.in_channels
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.randn(1, channels, *trace_size, device=device)


def _weight_axes(module: nn.Module) -> tuple[int, int]:
    """(output axis, input axis) of the weight."""
    transposed = isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d)
    return (1, 0) if transposed else (0, 1)


def _is_depthwise(module: nn.Module) -> bool:
    groups = getattr(module, "groups", 1)
    return groups > 1 and groups == getattr(module, "out_channels", -1)


def _is_shuffle(node: Any) -> bool:
    grad_fn = type(node.grad_fn).__name__ if node.grad_fn is not None else ""
    return any(s in grad_fn or s in type(node.module).__name__ for s in _CHANNEL_SHUFFLES)


def _is_unary(node: Any) -> bool:
    """A parameter-free op with one input (an activation): channel i in, channel i out."""
    module = node.module
    has_params = isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False))
    return len(node.inputs) == 1 and not has_params and node.type == tp.ops.OPTYPE.ELEMENTWISE


def _classify(graph: tp.DependencyGraph) -> tuple[set[nn.Module], dict[nn.Module, list[nn.Module]]]:
    """Layers whose output channels Torch-Pruning must not touch, and the sub-pixel ones among them.

    Walks forward from each Conv/Linear through parameter-free ops to the next Conv/Linear. A layer
    is *fixed* when its output reaches the network output (the image's channels). A layer whose
    every path is ``[activation]* -> PixelShuffle -> [activation]* -> conv`` is a *sub-pixel
    producer*: Torch-Pruning would couple its C*r**2 channels one-to-one with the consumers' C
    inputs, so it is kept out of Torch-Pruning and pruned here in blocks of r**2 (returned with its
    consumers). Anything else behind a shuffle (adds, concatenations, PReLU slopes) stays fixed.
    """
    fixed: set[nn.Module] = set()
    producers: dict[nn.Module, list[nn.Module]] = {}
    for module, node in graph.module2node.items():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if not node.outputs:
            fixed.add(module)
            continue
        output = shuffled_any = plain_consumer = False
        clean = True
        consumers: list[nn.Module] = []
        # state: (node, passed a shuffle, passed a non-unary op before any shuffle)
        stack = [(o, False, False) for o in node.outputs]
        seen: set[tuple[int, bool, bool]] = set()
        while stack:
            nxt, shuffled, coupled = stack.pop()
            if (id(nxt), shuffled, coupled) in seen:
                continue
            seen.add((id(nxt), shuffled, coupled))
            if nxt.type == tp.ops.OPTYPE.OUTPUT:
                output = True
                continue
            if isinstance(nxt.module, PRUNABLE_TYPES):
                if shuffled:
                    consumers.append(nxt.module)
                else:
                    plain_consumer = True
                continue
            shuffle = _is_shuffle(nxt)
            if shuffle:
                shuffled_any = True
                clean = clean and not shuffled and not coupled
            elif not _is_unary(nxt):
                if shuffled:
                    clean = False
                coupled = True
            if not nxt.outputs:
                output = True
                continue
            stack.extend((o, shuffled or shuffle, coupled) for o in nxt.outputs)
        if output:
            fixed.add(module)
        elif shuffled_any:
            unique = list(dict.fromkeys(consumers))
            out_channels = int(module.weight.shape[_weight_axes(module)[0]])
            ok = clean and not plain_consumer and unique
            ok = ok and all(
                getattr(c, "groups", 1) == 1
                and c.weight.shape[_weight_axes(c)[1]] > 0
                and out_channels % c.weight.shape[_weight_axes(c)[1]] == 0
                and c.weight.shape[_weight_axes(c)[1]] == unique[0].weight.shape[_weight_axes(unique[0])[1]]
                for c in unique
            )
            fixed.add(module)
            if ok:
                producers[module] = unique
    return fixed, producers


def _tp_groups(
    graph: tp.DependencyGraph, ignored: list[nn.Module], names: dict[nn.Module, str]
) -> list[_Group]:
    groups: list[_Group] = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=list(PRUNABLE_TYPES)):
        root = group[0].dep.target.module
        channels = int(graph.get_out_channels(root))
        members: list[tuple[nn.Module, int, float]] = []
        out_layers: list[nn.Module] = []
        for dep, idxs in group:
            module = dep.target.module
            if not isinstance(module, PRUNABLE_TYPES):
                continue
            # a concatenation can feed one group's channels into a layer twice: count the indices
            per_channel = len(idxs) / channels
            out_axis, in_axis = _weight_axes(module)
            if graph.is_out_channel_pruning_fn(dep.handler):
                members.append((module, out_axis, per_channel))
                out_layers.append(module)
            elif graph.is_in_channel_pruning_fn(dep.handler) and not _is_depthwise(module):
                groups_of = getattr(module, "groups", 1) if in_axis == 1 else 1
                members.append((module, in_axis, per_channel / groups_of))
        groups.append(_Group(root, names.get(root, "?"), members, out_layers, channels, channels))
    return groups


def _subpixel_groups(
    producers: dict[nn.Module, list[nn.Module]], allowed: set[str] | None, names: dict[nn.Module, str]
) -> list[_Group]:
    groups: list[_Group] = []
    for producer, consumers in producers.items():
        name = names.get(producer, "?")
        if allowed is not None and name not in allowed:
            continue
        channels = int(consumers[0].weight.shape[_weight_axes(consumers[0])[1]])
        factor = int(producer.weight.shape[_weight_axes(producer)[0]]) // channels
        members = [(producer, _weight_axes(producer)[0], float(factor))]
        members += [(c, _weight_axes(c)[1], 1.0) for c in consumers]
        groups.append(_Group(producer, name, members, [producer], channels, channels, consumers, factor))
    return groups


# -- planning ------------------------------------------------------------------------------------
class _MacModel:
    """MACs predicted from weight shapes: a layer's MACs are proportional to ``shape[0] * shape[1]``.

    The factor (kernel size x output pixels) comes from a real ``count_cost``, so no per-op formula
    is written here; the prediction only serves to plan, the result is measured again.
    """

    def __init__(self, model: nn.Module, input_size: tuple[int, int] | None, groups: list[_Group]) -> None:
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
    mac_model: _MacModel, groups: list[_Group], goal: float, tolerance: float, min_channels: int
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
    graph: tp.DependencyGraph, group: _Group, count: int, importance: tp.importance.Importance
) -> None:
    """Remove the ``count`` channels of lowest group L1 norm."""
    if group.consumers:  # sub-pixel group: producer rows in blocks of r**2, consumer inputs one by one
        producer_axis = _weight_axes(group.root)[0]
        per_layer = [_l1(group.root.weight, producer_axis).view(group.channels, group.factor).sum(1)]
        per_layer += [_l1(c.weight, _weight_axes(c)[1]) for c in group.consumers]
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
    names = _layer_name_map(model)
    dense_shapes = {
        name: tuple(int(s) for s in module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, PRUNABLE_TYPES)
    }
    dense_macs = count_cost(model, input_size).dense_macs
    goal = target_fraction * dense_macs
    example = _example_input(model, example_input_size)
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
    fixed, producers = _classify(graph)
    ignored = [
        m
        for m, name in names.items()
        if isinstance(m, PRUNABLE_TYPES) and (m in fixed or (allowed is not None and name not in allowed))
    ]
    importance = tp.importance.MagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    initial: dict[str, int] = {}

    def current_groups() -> list[_Group]:
        groups = _tp_groups(graph, ignored, names) + _subpixel_groups(producers, allowed, names)
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


@register_method("filter", FilterConfig)
def _filter(model: nn.Module, layers: list[LayerInfo], config: FilterConfig) -> FilterController:
    target = target_fraction_of(model, config)
    report = filter_prune_(
        model,
        target,
        config.trace_size,
        prunable=[layer.name for layer in layers],
        tolerance=config.tolerance,
        input_size=config.input_size,
        min_channels=config.min_channels,
    )
    log.info("%s", report.table())
    return FilterController(report)


__all__ = [
    "FilterConfig",
    "FilterController",
    "FilterReport",
    "GroupChannels",
    "filter_prune_",
    "nm_budget_fraction",
    "target_fraction_of",
]
