"""The N:M mask as a ``torch.nn.utils.parametrize`` parametrization on plain Conv/Linear layers.

``module.weight`` becomes ``original * mask`` where ``mask = keep[route][ranks]``: one uint8 rank
per weight and one N per *route* (a difficulty class for ClassPruning, a task for PNG, a single
default route otherwise). Ranks, per-route N and any learned state of a subclass live in buffers
and parameters, so ``state_dict`` restores everything.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from enum import Enum

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import SparsityError
from nmrestore.sparsity import nm

#: SR-STE's decay on pruned weights (Zhou et al., ICLR 2021).
SRSTE_LAMBDA = 2e-4


class GradMode(str, Enum):
    """How the gradient passes through the mask."""

    HARD = "hard"  # pruned weights get no gradient (SLS, one-shot fine-tuning)
    STE = "ste"  # dense gradient (straight-through)
    SRSTE = "srste"  # dense gradient + lambda * (1 - mask) * w (SR-STE)


class _StraightThroughMask(torch.autograd.Function):
    """w * mask forward; backward passes g (+ decay * (1 - mask) * w) to the dense weight."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor, decay: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        return weight * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        weight, mask = ctx.saved_tensors
        grad_weight = grad
        if ctx.decay:
            grad_weight = grad + ctx.decay * (1 - mask) * weight
        grad_mask = grad * weight if ctx.needs_input_grad[1] else None
        return grad_weight, grad_mask, None


def in_axis_of(module: nn.Module) -> int:
    """The weight axis holding input channels (0 for transposed convolutions)."""
    return 0 if isinstance(module, nn.ConvTranspose2d | nn.ConvTranspose1d) else 1


class NMMask(nn.Module):
    """Parametrization ``w -> w * mask`` with an N:M mask built from stored ranks.

    Args:
        weight: the layer's current weight (ranks are computed from it; it is not kept).
        m: group size M.
        n: N for each route (one int means a single route).
        in_axis: the weight axis of input channels (see :func:`in_axis_of`).
        grad_mode: how gradients pass the mask.
        srste_lambda: decay on pruned weights in ``srste`` mode.
        criterion: importance used by :meth:`refresh`.
        out_block: output channels that share one mask (1: each chooses its own); the criterion's
            scores are summed over each block, so ranks, refreshes included, stay block-shared.
    """

    def __init__(
        self,
        weight: Tensor,
        m: int,
        n: int | Sequence[int],
        in_axis: int = 1,
        grad_mode: GradMode | str = GradMode.HARD,
        srste_lambda: float = SRSTE_LAMBDA,
        criterion: nm.Criterion = nm.magnitude,
        out_block: int = 1,
    ) -> None:
        super().__init__()
        nm.check_divisible(weight.shape, m, in_axis)
        out_axis = 1 - in_axis  # (O, I, ...) weights: 0; ConvTranspose's (I, O, ...): 1
        if out_block < 1 or weight.shape[out_axis] % out_block:
            raise SparsityError(
                f"{weight.shape[out_axis]} output channels are not a multiple of out_block={out_block}"
            )
        per_route = [n] if isinstance(n, int) else list(n)
        for value in per_route:
            if not 1 <= value <= m:
                raise SparsityError(f"N must be in 1..M={m}, got {value}")
        self.m = m
        self.in_axis = in_axis
        self.grad_mode = GradMode(grad_mode)
        self.srste_lambda = srste_lambda
        self.out_block = out_block
        self.criterion = nm.blocked(criterion, out_block, out_axis)
        self.route = 0
        self.register_buffer("ranks", nm.compute_ranks(weight, m, in_axis, self.criterion))
        self.register_buffer("route_n", torch.tensor(per_route, dtype=torch.int64))
        self._mask_cache: dict[int, Tensor] = {}

    # -- state -------------------------------------------------------------------------------
    @property
    def num_routes(self) -> int:
        return int(self.route_n.numel())

    @property
    def n(self) -> int:
        """N of the active route."""
        return int(self.route_n[self.route])

    def set_n(self, n: int, route: int | None = None) -> None:
        """Set N for ``route`` (the active one by default)."""
        if not 1 <= n <= self.m:
            raise SparsityError(f"N must be in 1..M={self.m}, got {n}")
        self.route_n[self.route if route is None else route] = n
        self._mask_cache.clear()

    def set_route_ns(self, ns: Sequence[int]) -> None:
        """Replace the per-route N vector (changes the number of routes)."""
        for value in ns:
            if not 1 <= value <= self.m:
                raise SparsityError(f"N must be in 1..M={self.m}, got {value}")
        self.route_n = torch.tensor(list(ns), dtype=torch.int64, device=self.route_n.device)
        self.route = min(self.route, len(ns) - 1)
        self._mask_cache.clear()

    def set_route(self, route: int) -> None:
        if not 0 <= route < self.num_routes:
            raise SparsityError(f"route {route} does not exist (this layer has {self.num_routes})")
        self.route = route

    @torch.no_grad()
    def refresh(self, weight: Tensor) -> None:
        """Recompute ranks from ``weight`` (the dense, unmasked weight)."""
        self.ranks.copy_(nm.compute_ranks(weight, self.m, self.in_axis, self.criterion))
        self._mask_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._mask_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    # -- mask --------------------------------------------------------------------------------
    def keep(self) -> Tensor:
        """Keep table of the active route: ``mask = keep()[ranks]``. Subclasses may learn it."""
        return nm.keep_table(self.n, self.m, self.ranks.device)

    @property
    def learns_keep(self) -> bool:
        """True when :meth:`keep` is differentiable (the mask must not be cached)."""
        return False

    def mask(self) -> Tensor:
        """Float mask of the active route, the weight's shape."""
        if self.learns_keep:
            return self.keep()[self.ranks.long()]
        cached = self._mask_cache.get(self.route)
        if cached is None or cached.device != self.ranks.device:
            cached = self.keep()[self.ranks.long()]
            self._mask_cache[self.route] = cached
        return cached

    def forward(self, weight: Tensor) -> Tensor:
        mask = self.mask().to(weight.dtype)
        if self.grad_mode is GradMode.HARD:
            return weight * mask
        decay = self.srste_lambda if self.grad_mode is GradMode.SRSTE else 0.0
        return _StraightThroughMask.apply(weight, mask, decay)

    def extra_repr(self) -> str:
        ns = ",".join(str(int(v)) for v in self.route_n)
        block = f", out_block={self.out_block}" if self.out_block > 1 else ""
        return f"N={ns}, M={self.m}, grad_mode={self.grad_mode.value}{block}"


# -- helpers over models ----------------------------------------------------------------------
def nm_mask_of(module: nn.Module) -> NMMask | None:
    """The :class:`NMMask` on ``module.weight``, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, NMMask):
            return p
    return None


def nm_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, NMMask]]:
    """Every (name, layer, mask) with an N:M mask, in definition order."""
    for name, module in model.named_modules():
        mask = nm_mask_of(module)
        if mask is not None:
            yield name, module, mask


def dense_weight(module: nn.Module) -> Tensor:
    """The unmasked weight of a parametrized layer (or the plain weight)."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def refresh_(model: nn.Module) -> None:
    """Recompute every layer's ranks from its current dense weight."""
    for _, module, mask in nm_layers(model):
        mask.refresh(dense_weight(module))


def set_route(model: nn.Module, route: int) -> None:
    """Make ``route`` active in every N:M layer of ``model``."""
    for _, _, mask in nm_layers(model):
        mask.set_route(route)


def get_route(model: nn.Module) -> int:
    """The active route (0 when the model has no N:M layers)."""
    for _, _, mask in nm_layers(model):
        return mask.route
    return 0


@contextmanager
def use_route(model: nn.Module, route: int) -> Iterator[None]:
    """Run a block with ``route`` active, restoring the previous route afterwards."""
    previous = get_route(model)
    set_route(model, route)
    try:
        yield
    finally:
        set_route(model, previous)
