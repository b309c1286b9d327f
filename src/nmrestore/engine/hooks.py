"""Method hooks: what ``eval``, ``infer`` and the demo do differently for a method.

The registry is the method's config class, as for training programs: it names a
:class:`MethodHooks` subclass as ``"module:Class"`` (``NMConfig.eval_hooks``) and the module is
imported on first use, so a method's core never imports its hooks (which may import the engine)
and no caller ever compares method names. A method without hooks gets :class:`MethodHooks`, whose
every hook is the plain single-route model's behaviour.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from nmrestore.cost import CostReport
from nmrestore.engine.checkpoint import Checkpoint
from nmrestore.errors import RecipeError, SparsityError
from nmrestore.recipes.schema import Recipe, TaskSpec
from nmrestore.sparsity.api import NMConfig, list_methods, method_config_type

__all__ = ["MethodHooks", "hooks_for_method", "method_hooks"]


class MethodHooks:
    """Every optional eval/infer hook with the plain model's behaviour; subclass and override.

    ``model`` is always the model :func:`~nmrestore.engine.runner.model_from_checkpoint` rebuilt
    (eval mode, on the CPU); ``engine`` the sparse-kernel version of it or None.
    """

    #: ``infer`` runs :meth:`infer_adaptive` unless told ``--no-adaptive`` (ClassPruning).
    adaptive_by_default: ClassVar[bool] = False

    def activate_task(self, model: nn.Module, task: str) -> int:
        """Make ``task`` (a name, or an index as digits) active for ``--task``; returns its scale.

        The default serves any model with switchable tasks (``tasks`` + ``set_task``)."""
        names = tuple(getattr(model, "tasks", ()))
        setter = getattr(model, "set_task", None)
        if not names or not callable(setter):
            raise SparsityError(f"--task needs a multi-task model; {type(model).__name__} has no tasks")
        if task.isdigit():
            if not 0 <= int(task) < len(names):
                raise SparsityError(f"task index {task} out of range (tasks: {', '.join(names)})")
            task = names[int(task)]
        setter(task)
        return int(getattr(model, "scale", 1))

    def eval_task(self, model: nn.Module, spec: TaskSpec, task: str | None) -> TaskSpec:
        """The task spec to score the model's active task with (``task``: the one ``--task`` chose)."""
        return spec

    def evaluate(
        self,
        ckpt: Checkpoint,
        model: nn.Module,
        recipe: Recipe,
        dataset: Iterable[dict[str, object]],
        crop: int,
        class_map_dir: Path | None,
        engine: nn.Module | None,
    ) -> dict[str, Any] | None:
        """The whole ``eval`` payload when the method scores its own way; None: the plain scoring."""
        return None

    def eval_extras(self, model: nn.Module, recipe: Recipe, cost: CostReport) -> dict[str, Any]:
        """Entries added to (or replacing in) the plain ``eval`` payload; ``extra_lines`` are printed."""
        return {}

    def infer_adaptive(
        self,
        model: nn.Module,
        recipe: Recipe,
        images: Sequence[tuple[Path, np.ndarray]],
        out: Path,
        patch_size: int | None,
        stride: int | None,
        engine: nn.Module | None,
    ) -> list[Path]:
        """``infer --adaptive``: write each output (and whatever goes beside it); the written paths."""
        method = "dense" if recipe.sparsity is None else recipe.sparsity.method
        raise SparsityError(f"--adaptive needs a ClassPruning checkpoint (method classpruning), not {method!r}")

    def sparse_engine(self, model: nn.Module) -> nn.Module:
        """The model compiled for the sparse CPU kernel (``--sparse-engine``; dense layers stay on
        PyTorch where the kernel is slower)."""
        from nmrestore.runtime import compile_sparse

        return compile_sparse(model)

    def restorer(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        """How a whole LR batch is restored (the demo's crops): the model itself by default."""
        return model

    def report_row(
        self,
        model: nn.Module,
        dataset: Iterable[dict[str, object]],
        crop: int,
        dense_macs: float,
        class_map_dir: Path | None,
    ) -> dict[str, Any] | None:
        """A demo report row scored the method's own way; None: the plain model's scoring."""
        return None


_BASE = MethodHooks()


def method_hooks(config: NMConfig | type[NMConfig] | None) -> MethodHooks:
    """The hooks a method config (or its class) names; :class:`MethodHooks` for dense or none."""
    if config is None:
        return _BASE
    kind = config if isinstance(config, type) else type(config)
    path = kind.eval_hooks
    if path is None:
        return _BASE
    module, _, name = path.partition(":")
    hooks = getattr(importlib.import_module(module), name, None)
    if not (isinstance(hooks, type) and issubclass(hooks, MethodHooks)):
        raise RecipeError(f"{kind.__name__}.eval_hooks = {path!r} names no MethodHooks subclass")
    return hooks()


def hooks_for_method(name: object) -> MethodHooks:
    """The hooks of a method known by name only (a checkpoint's metadata, before any model is built)."""
    importlib.import_module("nmrestore.methods")  # registers the methods that ship
    if not isinstance(name, str) or name not in list_methods():
        return _BASE
    return method_hooks(method_config_type(name))
