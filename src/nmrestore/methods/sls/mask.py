"""SLS's mask: M-1 priority scores per layer decide N (a prefix of the magnitude ranks)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from nmrestore.errors import SparsityError
from nmrestore.methods.sls.config import KEEP_THRESHOLD
from nmrestore.sparsity import nm
from nmrestore.sparsity.parametrization import SRSTE_LAMBDA, GradMode, NMMask, nm_layers


class _HardThreshold(torch.autograd.Function):
    """Forward the prefix indicator b_k = 1[p_j > 0.5 for all j <= k]; backward identity (STE)."""

    @staticmethod
    def forward(ctx, p: Tensor) -> Tensor:  # type: ignore[override]
        return torch.cumprod((p > KEEP_THRESHOLD).to(p.dtype), 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        return grad


class SLSMask(NMMask):
    """An :class:`NMMask` whose N is learned from M-1 priority scores, then frozen.

    While searching, :meth:`keep` is ``[1, b_1, ..., b_{M-1}]`` with b from the scores (hard
    forward, straight-through backward), so the mask is rebuilt every forward and gradients reach
    ``scores``. Once frozen, ``route_n`` holds N, the scores are ignored (and stop requiring
    gradients) and the mask is a cached uniform ``rank < N`` table. ``scores`` and the ``frozen``
    buffer are in the ``state_dict``, so a checkpoint restores either state exactly.
    """

    def __init__(
        self,
        weight: Tensor,
        m: int,
        in_axis: int = 1,
        grad_mode: GradMode | str = GradMode.HARD,
        srste_lambda: float = SRSTE_LAMBDA,
        score_init: float = 1.0,
        score_clamp: float = 1.03,
        criterion: nm.Criterion = nm.magnitude,
        out_block: int = 1,
    ) -> None:
        super().__init__(weight, m, m, in_axis, grad_mode, srste_lambda, criterion, out_block)
        if m < 2:
            raise SparsityError(f"sls needs M >= 2, got {m}")
        self.score_clamp = float(score_clamp)
        self.scores = nn.Parameter(torch.full((m - 1,), float(score_init), device=weight.device))
        self.register_buffer("frozen", torch.tensor(False, device=weight.device))
        self._is_frozen = False
        self.sync_n()

    # -- scores -> N ---------------------------------------------------------------------------
    def priorities(self) -> Tensor:
        """p_k = prod_{j<=k} clamp(s_j, 0, score_clamp), differentiable in the scores."""
        return torch.cumprod(self.scores.clamp(0.0, self.score_clamp), 0)

    def learned_keep(self) -> Tensor:
        """Keep table from the scores, ``[1, b_1..b_{M-1}]``; straight-through to the scores."""
        b = _HardThreshold.apply(self.priorities())
        return torch.cat([b.new_ones(1), b])

    def soft_n(self) -> Tensor:
        """N = 1 + sum(b) as a tensor whose gradient reaches the scores (via the STE)."""
        return 1 + _HardThreshold.apply(self.priorities()).sum()

    @torch.no_grad()
    def scores_n(self) -> int:
        """N the scores currently select (whatever the frozen state)."""
        return 1 + int(_HardThreshold.apply(self.priorities()).sum())

    def hard_n(self) -> int:
        """The N in force: the frozen N, or the one the scores select while searching."""
        return self.n if self._is_frozen else self.scores_n()

    def sync_n(self) -> None:
        """Copy the scores' N into ``route_n`` so reports and cost counts see it while searching."""
        if not self._is_frozen:
            self.route_n[0] = self.scores_n()

    @torch.no_grad()
    def project_scores(self) -> None:
        """Keep the scores in [0, score_clamp] (projected gradient: the clamp never traps them)."""
        self.scores.clamp_(0.0, self.score_clamp)

    # -- freezing ------------------------------------------------------------------------------
    @property
    def is_frozen(self) -> bool:
        return self._is_frozen

    def freeze(self, n: int | None = None) -> None:
        """Fix N (the scores' N by default): ``route_n`` holds it, the scores are no longer used."""
        value = self.scores_n() if n is None else int(n)
        self.set_n(value)
        self.frozen.fill_(True)
        self._set_frozen(True)

    def unfreeze(self) -> None:
        """Resume the search from the stored scores."""
        self.frozen.fill_(False)
        self._set_frozen(False)
        self.sync_n()

    def _set_frozen(self, frozen: bool) -> None:
        self._is_frozen = frozen
        self.scores.requires_grad_(not frozen)
        if frozen:
            self.scores.grad = None  # an optimizer skips parameters without a gradient
        self._mask_cache.clear()

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self._set_frozen(bool(self.frozen))

    # -- NMMask interface ----------------------------------------------------------------------
    def keep(self) -> Tensor:
        if self._is_frozen:
            return super().keep()
        return self.learned_keep()

    @property
    def learns_keep(self) -> bool:
        return not self._is_frozen

    def extra_repr(self) -> str:
        state = "frozen" if self._is_frozen else "searching"
        return f"N={self.hard_n()}, M={self.m}, {state}, grad_mode={self.grad_mode.value}"


def sls_masks(model: nn.Module) -> Iterator[tuple[str, nn.Module, SLSMask]]:
    """Every (name, layer, mask) of ``model`` carrying an :class:`SLSMask`."""
    for name, module, mask in nm_layers(model):
        if isinstance(mask, SLSMask):
            yield name, module, mask
