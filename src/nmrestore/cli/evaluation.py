"""``eval`` and ``infer``: load any checkpoint as it was trained, score it or restore images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from nmrestore.cost import count_cost
from nmrestore.data.io import read_image, to_tensor, write_image
from nmrestore.engine.evaluate import evaluate_model, progress_over, resolve_device
from nmrestore.engine.hooks import hooks_for_method, method_hooks
from nmrestore.engine.loading import load_any
from nmrestore.engine.runner import build_eval_dataset, model_from_checkpoint
from nmrestore.errors import CheckpointError, DatasetError, NMRestoreError
from nmrestore.recipes.schema import DataSource, TaskSpec
from nmrestore.sparsity.parametrization import nm_layers


def evaluate_checkpoint(
    checkpoint: Path,
    hr_dir: Path | None,
    scale: int | None,
    class_map_dir: Path | None = None,
    task: str | None = None,
    sparse_engine: bool = False,
    allow_large: bool = False,
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Per-image and mean PSNR/SSIM plus cost; the recipe's eval protocol (SR: Y, crop = scale;
    deblurring/denoising: RGB, no crop). Without ``hr_dir`` the built-in test photos are used, made
    into inputs the way the task makes them (bicubic LR, or its degradation with a fixed seed per image);
    a folder with pairs (``lq/`` + ``gt/``, GoPro) is used as it is.

    A ClassPruning checkpoint is scored through its patch pipeline (route histogram, average MACs,
    a class map per image saved to ``class_map_dir``, by default ``<run>/class_maps``).
    ``sparse_engine``: run the N:M layers on the sparse CPU kernel (:mod:`nmrestore.runtime`);
    the cost figures are still counted on the model itself. ``allow_large``: build a model above
    the size limit for files (see :func:`~nmrestore.engine.runner.model_from_checkpoint`).
    ``device``: auto, cpu or cuda; ``progress``: a bar over the images on stderr.
    """
    target = _device(device, sparse_engine)
    ckpt = load_any(checkpoint)  # a training or a packed checkpoint
    model, recipe = model_from_checkpoint(ckpt, allow_large=allow_large)
    hooks = method_hooks(recipe.sparsity)
    model_scale = recipe.model.scale
    if task is not None:  # a multi-task model (PNG): score this task
        model_scale = hooks.activate_task(model, task)
    task_spec = hooks.eval_task(model, recipe.task, task)
    if scale is not None and scale != model_scale:
        raise CheckpointError(f"{ckpt.path} is a x{model_scale} model; --scale {scale} does not match")
    if hr_dir is None:
        source = DataSource(source="builtin", split="test")
    else:
        if not hr_dir.is_dir():
            raise DatasetError(f"{hr_dir} is not a folder")
        source = DataSource(source="folder", root=hr_dir)
    dataset = build_eval_dataset(source, model_scale, task_spec)
    crop = recipe.eval.crop_border if recipe.eval.crop_border is not None else model_scale
    engine = hooks.sparse_engine(model) if sparse_engine else None
    own = hooks.evaluate(ckpt, model, recipe, dataset, crop, class_map_dir, engine)
    if own is not None:  # the method scores its own way (ClassPruning: patch by patch)
        return _with_engine(own, engine)
    runner = model if engine is None else engine.to(target)
    result = evaluate_model(runner, dataset, crop, recipe.eval.test_y_channel, target, progress=progress)
    runner.to("cpu")  # the cost is counted on the CPU
    cost = count_cost(model)
    payload: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "model": recipe.model.name,
        "scale": model_scale,
        "task_label": _task_label(task_spec),  # ("task" is a PNG model's task name)
        "metric": "Y channel" if recipe.eval.test_y_channel else "RGB",
        "crop_border": crop,
        "method": recipe.sparsity.method if recipe.sparsity else "dense",
        **result.to_dict(),
        "cost": cost.summary(),
        "layers": [
            {"name": name, "n": mask.n, "m": mask.m, "routes": [int(v) for v in mask.route_n]}
            for name, _, mask in nm_layers(model)
        ],
    }
    payload.update(hooks.eval_extras(model, recipe, cost))
    return _with_engine(payload, engine)


def _device(name: str, sparse_engine: bool) -> torch.device:
    target = resolve_device(name)
    if sparse_engine and target.type != "cpu":
        raise NMRestoreError("--sparse-engine runs on the CPU; use --device cpu (or auto without a GPU)")
    return target


def _with_engine(payload: dict[str, Any], engine: torch.nn.Module | None) -> dict[str, Any]:
    """Add the sparse engine's per-layer tactic choices to an eval payload."""
    if engine is None:
        return payload
    from nmrestore.runtime import engine_state

    state = engine_state(engine)
    assert state is not None
    decisions = state.table()
    payload["sparse_engine"] = {
        "kernel": state.kernel_id if state.kernel is not None else None,
        "kernel_unavailable": None if state.kernel is not None else state.kernel_reason,
        "sparse_layers": sorted({d.layer for d in decisions if d.choice == "sparse"}),
        "dense_layers": sorted({d.layer for d in decisions if d.choice == "dense"}),
    }
    lines = payload.setdefault("extra_lines", [])
    used = len(payload["sparse_engine"]["sparse_layers"])
    if state.kernel is None:
        lines.append(f"sparse engine: kernel unavailable ({state.kernel_reason}); every layer ran dense")
    else:
        lines.append(f"sparse engine: {used} layer(s) on the sparse kernel, the rest dense PyTorch")
    return payload


def _task_label(task: TaskSpec) -> str:
    if task.kind == "denoise":
        return f"denoise (sigma {task.sigma:g})"
    if task.kind == "deblur":
        degradation = task.degradation()
        return f"deblur ({degradation.describe()})" if degradation is not None else "deblur"
    return "sr"


def plan_outputs(inputs: list[Path], out: Path, adaptive: bool = False) -> list[list[Path]]:
    """The files ``infer`` will write for each input, checked before anything is read or written.

    Refuses (one line, :class:`NMRestoreError`): ``--out`` naming a file; an output that is one of
    the inputs (``infer x.png --out .`` used to overwrite ``x.png``); two inputs writing one name
    (``a.png`` and ``a.jpg`` both become ``a.png``); an output path that is a folder. Refusing is
    predictable where silently suffixing would make users guess the names.
    """
    if out.exists() and not out.is_dir():
        raise NMRestoreError(f"--out {out} is a file; infer writes into a folder")
    plans = [
        [out / f"{path.stem}.png", *([out / f"{path.stem}_classmap.png"] if adaptive else [])] for path in inputs
    ]
    seen: dict[str, tuple[Path, Path]] = {}  # absolute output path -> (input, output as given)
    for path, targets in zip(inputs, plans, strict=True):
        for target in targets:
            key = os.path.abspath(target)
            if key in seen:
                raise NMRestoreError(
                    f"{seen[key][0]} and {path} would both be written to {target}; "
                    "rename one of them or run them separately"
                )
            seen[key] = (path, target)
            if target.is_dir():
                raise NMRestoreError(f"{target} is a folder; infer cannot write its output there")
    for path in inputs:
        for _, target in seen.values():
            if _same_file(path, target):
                raise NMRestoreError(
                    f"{target} would overwrite the input {path}; choose another --out folder"
                )
    return plans


def _same_file(a: Path, b: Path) -> bool:
    """``a`` and ``b`` are one file (same path, symlink or hard link)."""
    if os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # b does not exist yet: it is no input
        return False


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the header alone, or None (``read_image`` then names the problem)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.height, im.width
    except Exception:  # any decoder error: left to read_image's precise message
        return None


@torch.no_grad()
def infer_images(
    checkpoint: Path,
    inputs: list[Path],
    out: Path,
    adaptive: bool | None = None,
    patch_size: int | None = None,
    stride: int | None = None,
    task: str | None = None,
    sparse_engine: bool = False,
    allow_large: bool = False,
    tile: int | None = None,
    device: str = "cpu",
    progress: bool = False,
) -> list[Path]:
    """Restore each LR image with the checkpoint's model; returns the written paths.

    ``adaptive``: a ClassPruning checkpoint runs its patch pipeline and writes a class map
    (``<stem>_classmap.png``) beside each output; None (the default) decides from the checkpoint,
    as ``eval`` does (ClassPruning: adaptive; ``False`` runs its active route as a plain model). ``sparse_engine``: run the N:M layers on the
    sparse CPU kernel (:mod:`nmrestore.runtime`). Images larger than one ``tile`` (LR pixels,
    default ~1024 output pixels; 0 = never) run tile by tile (:mod:`nmrestore.engine.tiling`) with
    a margin covering the model's receptive field, so memory stays bounded.

    Nothing is written until every input is read and every output name checked
    (:func:`plan_outputs`); outputs are written atomically with a plain ``open()``'s permissions.
    """
    from nmrestore.limits import check_infer_size

    if tile is not None and tile < 0:
        raise NMRestoreError(f"--tile must be 0 (no tiling) or a positive LR size, got {tile}")
    target = _device(device, sparse_engine)
    ckpt = load_any(checkpoint)
    sparsity = ckpt.meta.get("sparsity")  # the method, before any model is built
    hooks = hooks_for_method(sparsity.get("method") if isinstance(sparsity, dict) else None)
    if adaptive is None:
        adaptive = hooks.adaptive_by_default
    plans = plan_outputs(inputs, out, adaptive)
    model, recipe = model_from_checkpoint(ckpt, allow_large=allow_large)
    model.eval()
    hooks = method_hooks(recipe.sparsity)
    scale = recipe.model.scale
    if task is not None:  # a multi-task model (PNG): run this task
        scale = hooks.activate_task(model, task)
    for path in inputs:  # header sizes first: refuse a huge output before decoding anything
        size = _image_size(path)
        if size is not None:
            check_infer_size(str(path), size, scale)
    images = [(path, read_image(path)) for path in inputs]  # read all first: fail before writing
    engine = hooks.sparse_engine(model) if sparse_engine else None
    if adaptive:
        return hooks.infer_adaptive(model, recipe, images, out, patch_size, stride, engine)
    runner = (model if engine is None else engine).to(target)
    return restore_images(runner, [image for _path, image in images], plans, scale, tile, target, progress)


def restore_images(
    runner: torch.nn.Module,
    images: list[Any],
    plans: list[list[Path]],
    scale: int,
    tile: int | None,
    target: torch.device,
    progress: bool,
) -> list[Path]:
    """Run ``runner`` on each image (in tiles when it is larger than the tile side) and write its output."""
    from nmrestore.engine.tiling import ALIGN, choose_overlap, default_tile, run_tiled

    side = default_tile(scale) if tile is None else -(-tile // ALIGN) * ALIGN
    overlap: int | None = None
    written = []
    for image, targets in progress_over(list(zip(images, plans, strict=True)), "infer", progress):
        x = to_tensor(image).unsqueeze(0).to(target)
        if side and max(x.shape[-2:]) > side:
            if overlap is None:  # measured once, only when some image needs tiles
                overlap = choose_overlap(runner, x.shape[1])
            output = run_tiled(runner, x, side, overlap)
        else:
            output = runner(x).clamp(0, 1)[0]
        written.append(write_image(targets[0], output.cpu() if isinstance(output, torch.Tensor) else output))
    return written
