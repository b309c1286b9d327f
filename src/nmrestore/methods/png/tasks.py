"""PNG's tasks on a model: which layers each task owns, and switching the active task."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from nmrestore.errors import SparsityError
from nmrestore.methods.png.config import PNGConfig
from nmrestore.methods.png.mask import PNGMask
from nmrestore.models.multitask import MultiTaskSR
from nmrestore.sparsity.parametrization import nm_layers, set_route


def png_tasks(model: nn.Module, config: PNGConfig) -> tuple[str, ...]:
    """The task names of ``model`` under ``config`` (the model's own for a multi-task model)."""
    if isinstance(model, MultiTaskSR):
        if config.tasks is not None and tuple(config.tasks) != model.tasks:
            raise SparsityError(
                f"sparsity.tasks {list(config.tasks)} differ from the model's tasks {list(model.tasks)}"
            )
        tasks = model.tasks
    elif config.tasks is not None:
        tasks = tuple(config.tasks)
    else:
        raise SparsityError(
            f"PNG needs tasks: use a multi-task model (e.g. edsr_small_multiscale) or set sparsity.tasks "
            f"for {type(model).__name__}"
        )
    if len(tasks) != len(config.ns):
        raise SparsityError(
            f"the model has {len(tasks)} tasks ({', '.join(tasks)}) but ns has {len(config.ns)} values"
        )
    return tasks


def owner_of(name: str, prefixes: dict[int, tuple[str, ...]]) -> int:
    """Index of the task owning module or parameter ``name`` (-1: shared)."""
    for task, owned in prefixes.items():
        if any(name == p or name.startswith(p + ".") for p in owned):
            return task
    return -1


def owned_prefixes(model: nn.Module, tasks: Sequence[str]) -> dict[int, tuple[str, ...]]:
    """Task index -> module-name prefixes it owns (empty for a model without task layers)."""
    if not isinstance(model, MultiTaskSR):
        return {}
    modules = model.task_modules()
    return {i: tuple(modules.get(task, ())) for i, task in enumerate(tasks)}


def select_task(model: nn.Module, task: str | int | None) -> int | None:
    """Make ``task`` (a name such as ``"x3"``, or an index; a string of digits is an index) active.

    The one task switch of the package (``eval --task``, ONNX export, packed files, the PNG schedule).
    PNG models switch both their task layers and their masks' route, and the task's index is
    returned; any other model exposing ``set_task`` is asked directly (None is returned); a model
    without tasks is an error rather than silently running something else. ``task=None`` does nothing.
    """
    if task is None:
        return None
    if isinstance(task, str) and task.isdigit():
        task = int(task)
    if not (hasattr(model, "tasks") or png_masks(model)):
        setter = getattr(model, "set_task", None)
        if not callable(setter):
            raise SparsityError(
                f"{type(model).__name__} has no tasks (no set_task method); --task only applies to multi-task models"
            )
        setter(task)
        return None
    tasks = model.tasks if isinstance(model, MultiTaskSR) else None
    routes = [mask for _, _, mask in nm_layers(model) if isinstance(mask, PNGMask)]
    names: tuple[str, ...] | None = tasks
    if names is None:
        names = tuple(getattr(model, "png_tasks", ()))
    if isinstance(task, int):
        index = task
        if names and not 0 <= index < len(names):
            raise SparsityError(f"task index {index} out of range (tasks: {', '.join(names)})")
    else:
        if task not in (names or ()):
            raise SparsityError(f"unknown task {task!r}; tasks: {', '.join(names or ()) or 'none'}")
        index = names.index(task)
    if isinstance(model, MultiTaskSR):
        model.set_task(model.tasks[index])
    if routes:
        set_route(model, index)
    return index


def activate_task(model: nn.Module, task: str) -> int:
    """``select_task`` for the CLI (``--task x3``): returns the active scale (1 without scales)."""
    if not isinstance(model, MultiTaskSR) and not png_masks(model):
        raise SparsityError(f"--task needs a multi-task model; {type(model).__name__} has no tasks")
    select_task(model, task)
    return int(getattr(model, "scale", 1))


@contextmanager
def use_png_task(model: nn.Module, task: str | int) -> Iterator[int]:
    """Run a block with ``task`` active (layers and masks), restoring the previous one afterwards."""
    previous = model.task_index if isinstance(model, MultiTaskSR) else active_route(model)
    index = select_task(model, task)
    try:
        yield index
    finally:
        select_task(model, previous)


def active_route(model: nn.Module) -> int:
    for _, _, mask in nm_layers(model):
        return mask.route
    return 0


def png_masks(model: nn.Module) -> list[tuple[str, nn.Module, PNGMask]]:
    """Every (layer name, layer, PNG mask) of ``model``."""
    return [(name, module, mask) for name, module, mask in nm_layers(model) if isinstance(mask, PNGMask)]


def png_layer_table(model: nn.Module) -> str:
    """Per layer: owner (shared or a task), N per task, and the kept share of its weights (any task)."""
    masks = png_masks(model)
    tasks = png_task_names(model, masks[0][2].num_tasks) if masks else ()
    lines = [
        f"{'layer':<34} {'owner':<8} {'N per task (' + '/'.join(tasks) + ')':<24} {'kept (any task)':>15}"
    ]
    for name, _, mask in masks:
        owner = "shared" if mask.shared else tasks[mask.owner]
        ns = "/".join(str(int(v)) for v in mask.route_n) if mask.shared else str(int(mask.route_n[0]))
        kept = float(mask.union_mask().float().mean())
        lines.append(f"{name:<34} {owner:<8} {ns + ':' + str(mask.m):<24} {kept:>15.1%}")
    return "\n".join(lines)


def png_task_names(model: nn.Module, count: int) -> tuple[str, ...]:
    if isinstance(model, MultiTaskSR):
        return model.tasks
    names = tuple(getattr(model, "png_tasks", ()))
    return names if len(names) == count else tuple(f"task{i + 1}" for i in range(count))
