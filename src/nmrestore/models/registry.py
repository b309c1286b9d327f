"""timm-style model registry: ``@register_model``, ``create_model(name, **kw)``, ``list_models()``.

Model keyword arguments can come from a file (a recipe, a checkpoint's embedded recipe), so
:func:`check_model_kwargs` checks them against the builder's signature and
:func:`check_model_size` estimates the model's bytes on the ``meta`` device, where nothing is
allocated, before a caller builds it for real.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch
from torch import nn

from nmrestore.errors import NMRestoreError, short_repr

_ModelFn = TypeVar("_ModelFn", bound=Callable[..., nn.Module])
_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

#: Largest parameters + buffers accepted from a file without ``allow_large`` (1 GiB: six times the
#: biggest model of the zoo, full EDSR at 163 MB).
MAX_MODEL_BYTES = 1 << 30
#: Largest integer / sequence length a model keyword may carry without ``allow_large``: widths and
#: depths beyond it are typos or attacks, and even a ``meta`` build of 10**9 blocks would hang.
MAX_KWARG_INT = 4096
MAX_KWARG_ITEMS = 64


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


def _builder(name: object) -> Callable[..., nn.Module]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise NMRestoreError(f"unknown model {short_repr(name)}; known models: {', '.join(list_models())}")
    return _REGISTRY[name]


def check_model_kwargs(name: str, kwargs: Mapping[str, object]) -> None:
    """Refuse keywords the builder of ``name`` does not take, naming them and the accepted ones."""
    params = inspect.signature(_builder(name)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p != "scale"]
    unknown = sorted(str(k) for k in kwargs if k not in accepted)
    if unknown:
        raise NMRestoreError(
            f"model {name} takes no keyword(s) {', '.join(short_repr(k, 40) for k in unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; accepted: {', '.join(accepted) or 'none'}"
            + ("  (the scale is model.scale)" if "scale" in unknown else "")
        )


def _check_kwarg_value(name: str, key: str, value: object, depth: int = 0) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, float | str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_KWARG_INT:
            raise NMRestoreError(
                f"model {name}: {key}={short_repr(value)} is above {MAX_KWARG_INT}; pass allow_large "
                "(--allow-large) if you mean it"
            )
        return
    if isinstance(value, list | tuple) and depth < 2:
        if len(value) > MAX_KWARG_ITEMS:
            raise NMRestoreError(f"model {name}: {key} has {len(value)} items, more than {MAX_KWARG_ITEMS}")
        for item in value:
            _check_kwarg_value(name, key, item, depth + 1)
        return
    raise NMRestoreError(f"model {name}: {key} must be a number, a string or a short list, got {short_repr(value)}")


def estimate_model_bytes(name: str, scale: int | None = None, **kwargs: object) -> int:
    """Bytes of parameters and buffers of ``create_model(name, scale, **kwargs)``, built on ``meta``."""
    with torch.device("meta"):
        model = create_model(name, scale=scale, **kwargs)
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def check_model_size(name: str, scale: int | None, kwargs: Mapping[str, object], limit: int = MAX_MODEL_BYTES) -> int:
    """Estimate the model's size before building it; :class:`NMRestoreError` above ``limit`` bytes.

    Returns the estimate. The keywords are bounded first (see :data:`MAX_KWARG_INT`), so the
    estimate itself stays cheap.
    """
    check_model_kwargs(name, kwargs)
    for key, value in kwargs.items():
        _check_kwarg_value(name, str(key), value)
    size = estimate_model_bytes(name, scale, **kwargs)
    if size > limit:
        raise NMRestoreError(
            f"model {name} x{scale} with {short_repr(dict(kwargs))} would need {_human(size)} of "
            f"parameters (limit {_human(limit)}); pass allow_large (--allow-large) if you mean it"
        )
    return size


def _human(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


def create_model(name: str, scale: int | None = None, **kwargs: object) -> nn.Module:
    """Build a registered model. Raises :class:`NMRestoreError` naming the known models if unknown,
    or the keywords the builder does not take.

    ``scale=None`` takes the builder's default: x2 for the SR models, 1 for the deblurring nets
    (which support nothing else).
    """
    builder = _builder(name)
    check_model_kwargs(name, {k: v for k, v in kwargs.items() if k != "scale"})
    if scale is not None:
        kwargs["scale"] = scale
    try:
        model = builder(**kwargs)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:  # a keyword of the wrong type or range
        raise NMRestoreError(f"cannot build model {name}: {type(exc).__name__}: {str(exc)[:200]}") from None
    model.model_name = name  # recorded in checkpoints so another model's weights are refused
    # what rebuilds it: a compiled engine file (runtime/compiled.py) stores name, scale and these
    model.model_kwargs = {k: v for k, v in kwargs.items() if k != "scale"}
    return model
