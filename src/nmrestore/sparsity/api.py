"""``sparsify_`` / ``squash_`` / ``check_nm``: the public face of the N:M core.

A method is a typed config (a pydantic model with a ``method`` literal) plus a registered
handler that attaches masks to the eligible layers and may return a *controller* for methods with
training-time state (SLS scores, SR-STE's per-step refresh). The Trainer only knows the
:class:`Controller` base class and its hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import SparsityError, short_repr
from nmrestore.sparsity import nm
from nmrestore.sparsity.parametrization import (
    SRSTE_LAMBDA,
    GradMode,
    NMMask,
    in_axis_of,
    nm_layers,
    nm_mask_of,
)

PRUNABLE_TYPES = (nn.Conv2d, nn.Linear, nn.ConvTranspose2d)

#: ``filter_fn(name, module) -> bool``: True keeps the layer eligible for pruning.
FilterFn = Callable[[str, nn.Module], bool]


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``."""
    try:
        n_text, m_text = text.split(":")
        n, m = int(n_text), int(m_text)
    except ValueError as exc:
        raise SparsityError(f"sparsity must look like N:M (e.g. 2:4), got {text!r}") from exc
    if not 1 <= n <= m:
        raise SparsityError(f"N:M needs 1 <= N <= M, got {text!r}")
    return n, m


class NMConfig(BaseModel):
    """Uniform N:M masks from magnitude ranks (the base every method config extends).

    ``routes`` gives one N per route (e.g. ``[8, 16, 32]`` for ClassPruning's three classes);
    when omitted there is one route with ``n``. ``out_block`` > 1 shares each mask by blocks of
    that many consecutive output channels ("coarse" N:M: a block's kept inputs form one dense
    reduction axis, the shape of matrix units such as AMX); a layer whose output channels are not
    a multiple of it stays dense, with that reason.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["nm"] = "nm"
    n: int = Field(2, ge=1, le=255)
    m: int = Field(4, ge=1, le=255)
    routes: tuple[int, ...] | None = None
    grad_mode: GradMode = GradMode.HARD
    srste_lambda: float = Field(SRSTE_LAMBDA, ge=0)
    dense_first_last: bool = True
    out_block: int = Field(1, ge=1, le=256, description="output channels sharing one mask (1: per channel)")

    #: ``"module:function"`` of the method's own training program, which ``nmrestore.engine.train``
    #: runs instead of the plain Trainer loop (None: the plain loop). A dotted path rather than the
    #: function, so a method's core never imports its program (which imports the engine).
    training_program: ClassVar[str | None] = None
    #: ``"module:Class"`` of the method's eval/infer hooks (``nmrestore.engine.hooks.MethodHooks``
    #: subclass; None: the plain model's behaviour), named for the same reason.
    eval_hooks: ClassVar[str | None] = None

    @model_validator(mode="after")
    def _ns_within_m(self) -> NMConfig:
        bad = [n for n in self.route_ns() if not 1 <= n <= self.m]
        if bad:
            raise ValueError(f"N must be in 1..M={self.m}, got {bad}")
        return self

    def route_ns(self) -> tuple[int, ...]:
        return self.routes if self.routes else (self.n,)

    @model_serializer(mode="wrap")
    def _without_default_block(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # out_block came after recipes were saved in checkpoints and cached runs were keyed by their
        # dump: leaving the default out keeps every earlier recipe, digest and resume the same
        data: dict[str, Any] = handler(self)
        if self.out_block == 1:
            data.pop("out_block", None)
        return data


class Controller:
    """Training-time state of a method: the one interface the Trainer, the runner and the harness call.

    Subclass it and override what the method needs; every hook has a no-op default, so callers
    call hooks directly and a method without, say, artifacts simply inherits the empty one.
    """

    #: DDP must look for parameters that leave the graph mid-run (SLS scores once N is frozen).
    find_unused_parameters: bool = False

    def step(self, step: int) -> None:
        """Called after every optimizer step (refresh ranks, anneal, freeze...)."""

    def regularizer(self) -> dict[str, Tensor]:
        """Extra loss terms to add to the task loss (may be empty)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores to resume the controller exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """Optimizer groups with their own settings (e.g. SLS scores at their own LR); the rest of the
        trainable parameters form the default group."""
        return []

    def finalize(self) -> None:
        """Called once after the last training step (SLS: a run never ends above its budget)."""

    def write_artifacts(self, model: nn.Module, run_dir: Path) -> list[Path]:
        """Write method-specific tables and charts into ``run_dir`` after training; returns the paths."""
        return []

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging about the method's state (e.g. SLS's cost fraction)."""
        return {}


@dataclass(frozen=True)
class LayerInfo:
    """A layer found by :func:`eligible_layers`."""

    name: str
    module: nn.Module
    kind: str
    shape: tuple[int, ...]
    in_axis: int


@dataclass(frozen=True)
class PrunedLayer:
    name: str
    kind: str
    shape: tuple[int, ...]
    ns: tuple[int, ...]
    m: int


@dataclass(frozen=True)
class DenseLayer:
    name: str
    kind: str
    shape: tuple[int, ...]
    reason: str


@dataclass
class SparsifyReport:
    """What ``sparsify_`` did: every prunable-type layer is listed, pruned or dense with a reason."""

    method: str
    pruned: list[PrunedLayer] = field(default_factory=list)
    dense: list[DenseLayer] = field(default_factory=list)
    controller: Controller | None = None

    def table(self) -> str:
        lines = [f"method {self.method}: {len(self.pruned)} layers pruned, {len(self.dense)} dense"]
        for p in self.pruned:
            ns = "/".join(str(n) for n in p.ns)
            lines.append(f"  pruned  {p.name:<32} {p.kind:<16} {ns}:{p.m}")
        for d in self.dense:
            lines.append(f"  dense   {d.name:<32} {d.kind:<16} {d.reason}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


Handler = Callable[[nn.Module, list[LayerInfo], Any], Controller | None]
_METHODS: dict[str, tuple[type[NMConfig], Handler]] = {}


def register_method(name: str, config_type: type[NMConfig]) -> Callable[[Handler], Handler]:
    """Register ``handler(model, layers, config) -> Controller | None`` for ``config_type``."""

    def wrap(handler: Handler) -> Handler:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = (config_type, handler)
        return handler

    return wrap


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_config_type(name: str) -> type[NMConfig]:
    if name not in _METHODS:
        raise SparsityError(f"unknown method {short_repr(name)}; known: {', '.join(list_methods())}")
    return _METHODS[name][0]


def _first_last_names(model: nn.Module) -> set[str]:
    declared = getattr(model, "nm_dense_layers", None)
    if declared is not None:
        return set(declared)
    names = [n for n, mod in model.named_modules() if isinstance(mod, PRUNABLE_TYPES)]
    return {names[0], names[-1]} if names else set()


def eligible_layers(
    model: nn.Module,
    m: int,
    filter_fn: FilterFn | None = None,
    dense_first_last: bool = True,
    out_block: int = 1,
) -> tuple[list[LayerInfo], list[DenseLayer]]:
    """Split the model's Conv/Linear layers into prunable ones and dense ones with a reason.

    The first and last convolutions (``model.nm_dense_layers`` when the model declares them,
    definition order otherwise) stay dense by default, as in the papers; a ``filter_fn`` decides
    instead when given. Shape rules (channels not a multiple of M, depthwise) always apply.
    """
    first_last = _first_last_names(model) if dense_first_last and filter_fn is None else set()
    prunable: list[LayerInfo] = []
    dense: list[DenseLayer] = []
    for name, module in model.named_modules():
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        if nm_mask_of(module) is not None:
            raise SparsityError(f"layer {name!r} already has an N:M mask; squash_ or rebuild the model first")
        kind = type(module).__name__
        weight = module.weight
        shape = tuple(weight.shape)
        in_axis = in_axis_of(module)
        groups = getattr(module, "groups", 1)
        per_group_in = shape[1] if in_axis == 1 else shape[0] // groups
        out_channels = shape[1 - in_axis]
        reason = None
        if groups > 1 and per_group_in == 1:
            reason = "depthwise convolution"
        elif per_group_in % m:
            reason = f"{per_group_in} input channels per group, not a multiple of M={m}"
        elif out_channels % out_block:
            reason = f"{out_channels} output channels, not a multiple of out_block={out_block}"
        elif filter_fn is not None and not filter_fn(name, module):
            reason = "excluded by filter_fn"
        elif name in first_last:
            reason = "first/last layer (dense by default, as in the papers)"
        if reason:
            dense.append(DenseLayer(name, kind, shape, reason))
        else:
            prunable.append(LayerInfo(name, module, kind, shape, in_axis))
    return prunable, dense


def attach_masks(
    layers: Sequence[LayerInfo],
    config: NMConfig,
    mask_factory: Callable[[LayerInfo], NMMask] | None = None,
) -> None:
    """Register an :class:`NMMask` (or ``mask_factory``'s subclass) on every layer."""
    for layer in layers:
        if mask_factory is not None:
            mask = mask_factory(layer)
        else:
            mask = NMMask(
                layer.module.weight,
                config.m,
                config.route_ns(),
                layer.in_axis,
                config.grad_mode,
                config.srste_lambda,
                out_block=config.out_block,
            )
        # unsafe=True: the mask keeps shape and dtype; skipping the check avoids a forward.
        parametrize.register_parametrization(layer.module, "weight", mask, unsafe=True)


@register_method("nm", NMConfig)
def _uniform_nm(model: nn.Module, layers: list[LayerInfo], config: NMConfig) -> None:
    attach_masks(layers, config)
    return None


def sparsify_(model: nn.Module, config: NMConfig, filter_fn: FilterFn | None = None) -> SparsifyReport:
    """Apply a method config to every eligible layer of ``model`` in place.

    Returns a :class:`SparsifyReport` listing what was pruned, what stayed dense and why, and the
    method's controller (None for methods without training-time state).
    """
    if config.method not in _METHODS:
        raise SparsityError(f"unknown method {config.method!r}; known: {', '.join(list_methods())}")
    config_type, handler = _METHODS[config.method]
    if not isinstance(config, config_type):
        raise SparsityError(f"method {config.method!r} needs a {config_type.__name__}, got {type(config).__name__}")
    prunable, dense = eligible_layers(model, config.m, filter_fn, config.dense_first_last, config.out_block)
    if not prunable:
        reasons = "; ".join(f"{d.name}: {d.reason}" for d in dense) or "the model has no Conv/Linear layer"
        raise SparsityError(f"no layer can take {config.route_ns()[0]}:{config.m} sparsity ({reasons})")
    controller = handler(model, prunable, config)
    pruned = [
        PrunedLayer(layer.name, layer.kind, layer.shape, config.route_ns(), config.m) for layer in prunable
    ]
    # A handler may choose per-layer N (SLS); report what the masks actually hold.
    masks = {name: mask for name, _, mask in nm_layers(model)}
    pruned = [
        PrunedLayer(p.name, p.kind, p.shape, tuple(int(v) for v in masks[p.name].route_n), p.m)
        if p.name in masks
        else p
        for p in pruned
    ]
    return SparsifyReport(config.method, pruned, dense, controller)


@torch.no_grad()
def squash_(model: nn.Module) -> nn.Module:
    """Bake every mask (active route) into a dense-with-zeros weight and drop the parametrization.

    This is the hand-off to every deployment path (ONNX, packing, sparse kernels).
    """
    for _, module, _ in list(nm_layers(model)):
        # A deep copy shares the class PyTorch generated for a parametrized module, and removing
        # the parametrization deletes the weight property from that class: give this module its
        # own class first, so squashing a copy never breaks the original.
        cls = type(module)
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


@dataclass(frozen=True)
class PatternCheck:
    name: str
    n: int
    m: int
    ok: bool
    worst_group: int  # the largest number of non-zero weights found in one group


def check_nm(model: nn.Module, patterns: dict[str, tuple[int, int]] | None = None) -> list[PatternCheck]:
    """Verify the N:M pattern of every pruned layer; raise :class:`SparsityError` on a violation.

    Masked layers are checked for every route (the effective weight of each route has at most N
    non-zeros per group, and the ranks are a permutation in every group). For squashed models pass
    ``patterns`` = ``{layer name: (n, m)}``.
    """
    results: list[PatternCheck] = []
    if patterns is None:
        for name, module, mask in nm_layers(model):
            perm_ok = nm.ranks_are_permutations(mask.ranks, mask.m, mask.in_axis)
            dense = module.parametrizations.weight.original
            previous = mask.route
            for route in range(mask.num_routes):
                mask.route = route
                effective = dense.detach() * mask.mask()
                worst = int(nm.to_groups(effective != 0, mask.m, mask.in_axis).sum(-1).max())
                results.append(PatternCheck(f"{name}[route {route}]", mask.n, mask.m, perm_ok and worst <= mask.n, worst))
            mask.route = previous
    else:
        modules = dict(model.named_modules())
        for name, (n, m) in patterns.items():
            if name not in modules:
                raise SparsityError(f"check_nm: the model has no layer {name!r}")
            module = modules[name]
            weight = module.weight.detach()
            worst = int(nm.to_groups(weight != 0, m, in_axis_of(module)).sum(-1).max())
            results.append(PatternCheck(name, n, m, worst <= n, worst))
    bad = [r for r in results if not r.ok]
    if bad:
        detail = ", ".join(f"{r.name} has a group with {r.worst_group} > N={r.n}" for r in bad[:5])
        raise SparsityError(f"N:M pattern broken in {len(bad)} layer(s): {detail}")
    return results


def nm_patterns(model: nn.Module) -> dict[str, tuple[int, int]]:
    """``{layer: (N of the active route, M)}`` for every masked layer (to check after squashing)."""
    return {name: (mask.n, mask.m) for name, _, mask in nm_layers(model)}
