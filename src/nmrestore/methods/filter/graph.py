"""The channel groups of a model: Torch-Pruning's dependency graph, plus the sub-pixel groups it cannot couple right."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from nmrestore.sparsity.api import (
    PRUNABLE_TYPES,
)

_CHANNEL_SHUFFLES = ("PixelShuffle", "PixelUnshuffle", "ChannelShuffle")


@dataclass
class ChannelGroup:
    """Coupled output channels: ``members`` are (layer, weight axis, weight slices per channel)."""

    root: nn.Module
    root_name: str
    members: list[tuple[nn.Module, int, float]]
    out_layers: list[nn.Module]
    channels: int
    initial: int
    consumers: list[nn.Module] = field(default_factory=list)  # sub-pixel groups only
    factor: int = 1  # sub-pixel groups: r**2 producer channels per kept channel


def layer_name_map(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}


def example_input(model: nn.Module, trace_size: tuple[int, int]) -> Tensor:
    first = next((m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)), None)
    channels = 3
    if isinstance(first, nn.Conv2d | nn.ConvTranspose2d):
        channels = first.in_channels
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.randn(1, channels, *trace_size, device=device)


def weight_axes(module: nn.Module) -> tuple[int, int]:
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


def classify_layers(graph: tp.DependencyGraph) -> tuple[set[nn.Module], dict[nn.Module, list[nn.Module]]]:
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
            out_channels = int(module.weight.shape[weight_axes(module)[0]])
            ok = clean and not plain_consumer and unique
            ok = ok and all(
                getattr(c, "groups", 1) == 1
                and c.weight.shape[weight_axes(c)[1]] > 0
                and out_channels % c.weight.shape[weight_axes(c)[1]] == 0
                and c.weight.shape[weight_axes(c)[1]] == unique[0].weight.shape[weight_axes(unique[0])[1]]
                for c in unique
            )
            fixed.add(module)
            if ok:
                producers[module] = unique
    return fixed, producers


def tp_groups(
    graph: tp.DependencyGraph, ignored: list[nn.Module], names: dict[nn.Module, str]
) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
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
            out_axis, in_axis = weight_axes(module)
            if graph.is_out_channel_pruning_fn(dep.handler):
                members.append((module, out_axis, per_channel))
                out_layers.append(module)
            elif graph.is_in_channel_pruning_fn(dep.handler) and not _is_depthwise(module):
                groups_of = getattr(module, "groups", 1) if in_axis == 1 else 1
                members.append((module, in_axis, per_channel / groups_of))
        groups.append(ChannelGroup(root, names.get(root, "?"), members, out_layers, channels, channels))
    return groups


def subpixel_groups(
    producers: dict[nn.Module, list[nn.Module]], allowed: set[str] | None, names: dict[nn.Module, str]
) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    for producer, consumers in producers.items():
        name = names.get(producer, "?")
        if allowed is not None and name not in allowed:
            continue
        channels = int(consumers[0].weight.shape[weight_axes(consumers[0])[1]])
        factor = int(producer.weight.shape[weight_axes(producer)[0]]) // channels
        members = [(producer, weight_axes(producer)[0], float(factor))]
        members += [(c, weight_axes(c)[1], 1.0) for c in consumers]
        groups.append(ChannelGroup(producer, name, members, [producer], channels, channels, consumers, factor))
    return groups
