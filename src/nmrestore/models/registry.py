"""timm-style model registry: ``@register_model``, ``create_model(name, **kw)``, ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from nmrestore.errors import NMRestoreError

_ModelFn = TypeVar("_ModelFn", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: _ModelFn) -> _ModelFn:
    """Register a model builder under its function name (``edsr_baseline``, ``carn_small``...)."""
    name = fn.__name__
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is registered twice")
    _REGISTRY[name] = fn
    return fn


def list_models() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def is_model(name: str) -> bool:
    return name in _REGISTRY


def create_model(name: str, scale: int | None = None, **kwargs: object) -> nn.Module:
    """Build a registered model. Raises :class:`NMRestoreError` naming the known models if unknown.

    ``scale=None`` takes the builder's default: x2 for the SR models, 1 for the deblurring nets
    (which support nothing else).
    """
    if name not in _REGISTRY:
        raise NMRestoreError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if scale is not None:
        kwargs["scale"] = scale
    model = _REGISTRY[name](**kwargs)
    model.model_name = name  # recorded in checkpoints so another model's weights are refused
    return model
