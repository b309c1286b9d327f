"""The engine's per-layer records: a route's weights, a tactic decision, the tactic names.

Kept apart from :mod:`nmrestore.runtime.layers` so that the modules a layer calls into (the
spatial router) can record decisions without importing the layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from nmrestore.runtime.packing import CSRWeight


@dataclass
class RouteWeights:
    """One route's weights: the dense-with-zeros tensor (dense tactic) and its CSR form (or None)."""

    dense: Tensor
    csr: CSRWeight | None
    nm: tuple[int, int] | None  # the route's N:M, None when the layer is not N:M on this route
    why_dense: str = ""  # why there is no CSR form (e.g. "N = M on this route")

    _half: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def density(self) -> float:
        return self.csr.density if self.csr is not None else float((self.dense != 0).float().mean())

    def values_half(self, half: torch.dtype = torch.bfloat16) -> Tensor:
        """The CSR values rounded to ``half`` (bf16 or fp16: that kernel's weights), made once."""
        assert self.csr is not None
        key = f"values {half}"
        if key not in self._half:
            self._half[key] = self.csr.values.to(half).contiguous()
        return self._half[key]

    def dense_bf16(self) -> Tensor:
        """The dense weight in bf16, channels-last for a 4-d weight (oneDNN's fast layout), made once."""
        if "dense" not in self._half:
            w = self.dense.to(torch.bfloat16)
            self._half["dense"] = w.contiguous(memory_format=torch.channels_last) if w.dim() == 4 else w
        return self._half["dense"]


@dataclass
class LayerDecision:
    """A tactic choice: one row of the per-layer table."""

    layer: str
    kind: str
    route: int
    input_shape: tuple[int, ...]
    threads: int
    nm: str
    density: float
    dense_ms: float | None
    sparse_ms: float | None
    choice: str  # one of TACTICS
    reason: str  # "timed", "reused" (same structure timed before or on disk), "forced", or why not sparse
    times_ms: dict[str, float] = field(default_factory=dict)  # every timed tactic (bf16 ones included)

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "kind": self.kind,
            "route": self.route,
            "input_shape": list(self.input_shape),
            "threads": self.threads,
            "nm": self.nm,
            "density": self.density,
            "dense_ms": self.dense_ms,
            "sparse_ms": self.sparse_ms,
            "choice": self.choice,
            "reason": self.reason,
            "times_ms": dict(self.times_ms),
        }


Extra = tuple["Tensor | None", float, bool]  # (residual, scale, post_relu) of a fused epilogue
#: The tactics a layer chooses among: PyTorch or the sparse kernel, each in f32 or bf16, and the
#: sparse kernel in fp16.
TACTICS = ("dense", "dense_bf16", "sparse", "sparse_bf16", "sparse_fp16")
#: The 16-bit dtype each sparse tactic runs the kernel in (absent: f32).
HALF_OF = {"sparse_bf16": torch.bfloat16, "sparse_fp16": torch.float16}
#: The input form each tactic asks its producer for: an f32, bf16 or fp16 hand-off view (padded
#: (row, channel, column) layout), or bf16 channels-last (oneDNN's layout).
WANTS = {"sparse": "f32", "sparse_bf16": "bf16", "sparse_fp16": "fp16", "dense_bf16": "bf16_cl"}
