"""MACs, parameters and packed bytes, dense and effective, per layer and per route.

The dense per-module MACs come from PyTorch's own ``FlopCounterMode`` (FLOPs / 2), run under a
``FakeTensorMode`` so no real computation happens and a 720p EDSR costs milliseconds to count.
Effective MACs of a pruned layer are its dense MACs x N/M (docs/ARCHITECTURE.md, section 3). Counting never changes
the model: its train/eval flags and mask caches are restored.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.utils import parametrize
from torch.utils.flop_counter import FlopCounterMode

from nmrestore.sparsity import nm
from nmrestore.sparsity.api import PRUNABLE_TYPES
from nmrestore.sparsity.parametrization import NMMask, dense_weight, nm_mask_of

#: The SR papers' convention: MACs for a 1280x720 HR output.
DEFAULT_OUTPUT_SIZE = (720, 1280)  # (height, width)
BYTES_PER_VALUE = 4  # fp32


@dataclass(frozen=True)
class LayerCost:
    """Cost of one Conv/Linear layer. ``ns`` is N per route, None for a dense layer."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dense_macs: int
    weight_params: int
    bias_params: int
    ns: tuple[int, ...] | None = None
    m: int | None = None

    @property
    def prunable(self) -> bool:
        return self.ns is not None

    def density(self, route: int = 0) -> float:
        """Kept fraction N/M of the route (1 for a dense layer)."""
        return 1.0 if self.ns is None or self.m is None else self.ns[route] / self.m

    def macs(self, route: int = 0) -> float:
        return self.dense_macs * self.density(route)

    def nonzero_params(self, route: int = 0) -> int:
        return round(self.weight_params * self.density(route)) + self.bias_params

    def packed_bytes(self, route: int = 0) -> int:
        if self.ns is None or self.m is None:
            return (self.weight_params + self.bias_params) * BYTES_PER_VALUE
        weight = nm.packed_nbytes(self.weight_params, self.ns[route], self.m, BYTES_PER_VALUE)
        return weight + self.bias_params * BYTES_PER_VALUE


@dataclass
class CostReport:
    """Per-layer and total cost of a model for one input size."""

    input_size: tuple[int, int]
    layers: list[LayerCost] = field(default_factory=list)
    other_macs: int = 0  # MACs outside Conv/Linear layers (e.g. matmuls in attention)
    other_params: int = 0  # parameters outside Conv/Linear layers (PReLU slopes, ...)

    @property
    def num_routes(self) -> int:
        return max((len(layer.ns) for layer in self.layers if layer.ns), default=1)

    # dense totals
    @property
    def dense_macs(self) -> int:
        return sum(layer.dense_macs for layer in self.layers) + self.other_macs

    @property
    def prunable_dense_macs(self) -> int:
        return sum(layer.dense_macs for layer in self.layers if layer.prunable)

    @property
    def params(self) -> int:
        return sum(layer.weight_params + layer.bias_params for layer in self.layers) + self.other_params

    # effective totals, per route
    def macs(self, route: int = 0) -> float:
        return sum(layer.macs(route) for layer in self.layers) + self.other_macs

    def prunable_macs(self, route: int = 0) -> float:
        return sum(layer.macs(route) for layer in self.layers if layer.prunable)

    def nonzero_params(self, route: int = 0) -> int:
        return sum(layer.nonzero_params(route) for layer in self.layers) + self.other_params

    def packed_bytes(self, route: int = 0) -> int:
        layers = sum(layer.packed_bytes(route) for layer in self.layers)
        return layers + self.other_params * BYTES_PER_VALUE

    def macs_fraction(self, route: int = 0) -> float:
        """Effective whole-network MACs as a fraction of the dense whole-network MACs."""
        return self.macs(route) / self.dense_macs if self.dense_macs else 1.0

    def summary(self, route: int = 0) -> dict[str, float | int]:
        return {
            "input_height": self.input_size[0],
            "input_width": self.input_size[1],
            "dense_macs": self.dense_macs,
            "macs": self.macs(route),
            "macs_g": self.macs(route) / 1e9,
            "macs_fraction": self.macs_fraction(route),
            "prunable_dense_macs": self.prunable_dense_macs,
            "prunable_macs": self.prunable_macs(route),
            "params": self.params,
            "params_nonzero": self.nonzero_params(route),
            "packed_bytes": self.packed_bytes(route),
            "dense_bytes": self.params * BYTES_PER_VALUE,
        }

    def to_dict(self, route: int = 0) -> dict[str, object]:
        return {
            "summary": self.summary(route),
            "routes": [self.summary(r) for r in range(self.num_routes)],
            "layers": [
                {**asdict(layer), "macs": layer.macs(route), "share_of_macs": layer.dense_macs / self.dense_macs}
                for layer in self.layers
            ],
        }

    def table(self, route: int = 0) -> str:
        """A plain-text per-layer table with totals (GMACs)."""
        rows = [f"{'layer':<34} {'kind':<16} {'shape':<18} {'N:M':>6} {'dense G':>9} {'eff. G':>9} {'share':>6}"]
        for layer in self.layers:
            nm_text = f"{layer.ns[route]}:{layer.m}" if layer.ns else "dense"
            share = layer.dense_macs / self.dense_macs if self.dense_macs else 0.0
            shape = "x".join(str(s) for s in layer.shape)
            rows.append(
                f"{layer.name:<34} {layer.kind:<16} {shape:<18} {nm_text:>6} "
                f"{layer.dense_macs / 1e9:>9.3f} {layer.macs(route) / 1e9:>9.3f} {share:>6.1%}"
            )
        s = self.summary(route)
        rows.append(
            f"total: {s['dense_macs'] / 1e9:.2f} GMACs dense, {s['macs_g']:.2f} effective "
            f"({s['macs_fraction']:.1%}); prunable {s['prunable_dense_macs'] / 1e9:.2f} -> "
            f"{s['prunable_macs'] / 1e9:.2f}; params {s['params']:,} ({s['params_nonzero']:,} non-zero); "
            f"packed {s['packed_bytes']:,} B of {s['dense_bytes']:,} B"
        )
        return "\n".join(rows)


def default_input_size(model: nn.Module, output_size: tuple[int, int] = DEFAULT_OUTPUT_SIZE) -> tuple[int, int]:
    """LR input size whose output is ``output_size`` at the model's scale (1 if it has none)."""
    scale = int(getattr(model, "scale", 1))
    return output_size[0] // scale, output_size[1] // scale


def _per_module_flops(model: nn.Module, input_size: tuple[int, int], in_channels: int) -> dict[str, int]:
    counter = FlopCounterMode(display=False)
    root = type(model).__name__
    # Masked weights are computed once for real inside parametrize.cached(), so the fake forward
    # below reads them from the cache and never needs data-dependent values (N of a route).
    with parametrize.cached():
        for module in model.modules():
            if parametrize.is_parametrized(module, "weight"):
                _ = module.weight
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode, counter:
            example = fake_mode.from_tensor(torch.empty(1, in_channels, *input_size, device=_device_of(model)))
            model(example)
    flops: dict[str, int] = {}
    for key, per_op in counter.get_flop_counts().items():
        name = "" if key == root else key[len(root) + 1 :] if key.startswith(root + ".") else None
        if name is not None:
            flops[name] = int(sum(per_op.values()))
    flops["__total__"] = int(counter.get_total_flops())
    return flops


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def count_cost(
    model: nn.Module,
    input_size: tuple[int, int] | None = None,
    in_channels: int = 3,
) -> CostReport:
    """Count dense and effective cost of ``model`` for one ``(height, width)`` input.

    ``input_size`` defaults to the LR input of a 1280x720 output at ``model.scale``.
    """
    size = input_size or default_input_size(model)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            flops = _per_module_flops(model, size, in_channels)
    finally:
        for module, training in was_training.items():
            module.training = training

    layers: list[LayerCost] = []
    # Learned mask state (e.g. SLS scores) is training-time only and not part of the network.
    counted_params: set[int] = {
        id(p) for module in model.modules() if isinstance(module, NMMask) for p in module.parameters()
    }
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        weight = dense_weight(module)
        bias = module.bias
        counted_params.add(id(weight))
        if bias is not None:
            counted_params.add(id(bias))
        mask = nm_mask_of(module)
        layers.append(
            LayerCost(
                name=name,
                kind=type(module).__name__.removeprefix("Parametrized"),
                shape=tuple(weight.shape),
                dense_macs=flops.get(name, 0) // 2,
                weight_params=weight.numel(),
                bias_params=0 if bias is None else bias.numel(),
                ns=None if mask is None else tuple(int(v) for v in mask.route_n),
                m=None if mask is None else mask.m,
            )
        )
    layer_macs = sum(layer.dense_macs for layer in layers)
    other_params = sum(p.numel() for p in model.parameters() if id(p) not in counted_params)
    return CostReport(
        input_size=size,
        layers=layers,
        other_macs=max(0, flops["__total__"] // 2 - layer_macs),
        other_params=other_params,
    )


__all__ = ["DEFAULT_OUTPUT_SIZE", "CostReport", "LayerCost", "count_cost", "default_input_size"]
