"""``eval`` and ``infer``: load any checkpoint as it was trained, score it or restore images."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from nmrestore.cost import count_cost
from nmrestore.data.builtin import load_builtin
from nmrestore.data.datasets import SREvalDataset, load_folder
from nmrestore.data.io import read_image, to_tensor, write_image
from nmrestore.engine.evaluate import evaluate_model
from nmrestore.engine.runner import model_from_checkpoint
from nmrestore.errors import CheckpointError, DatasetError
from nmrestore.export.packed import load_any
from nmrestore.sparsity.parametrization import nm_layers


def evaluate_checkpoint(
    checkpoint: Path,
    hr_dir: Path | None,
    scale: int | None,
    class_map_dir: Path | None = None,
    task: str | None = None,
) -> dict[str, Any]:
    """Per-image and mean PSNR/SSIM plus cost; the recipe's eval protocol (Y, crop = scale).

    A ClassPruning checkpoint is scored through its patch pipeline (route histogram, average MACs,
    a class map per image saved to ``class_map_dir``, by default ``<run>/class_maps``).
    """
    ckpt = load_any(checkpoint)  # a training or a packed checkpoint
    model, recipe = model_from_checkpoint(ckpt)
    model_scale = recipe.model.scale
    if task is not None:  # a multi-task (PNG) model: score this task
        from nmrestore.methods.png import activate_task

        model_scale = activate_task(model, task)
    if scale is not None and scale != model_scale:
        raise CheckpointError(f"{ckpt.path} is a x{model_scale} model; --scale {scale} does not match")
    if hr_dir is None:
        dataset = SREvalDataset(load_builtin("test"), model_scale)
    else:
        if not hr_dir.is_dir():
            raise DatasetError(f"{hr_dir} is not a folder")
        pairs = load_folder(hr_dir, model_scale)
        dataset = SREvalDataset(pairs.gt, model_scale, lr_images=pairs.lq)
    crop = recipe.eval.crop_border if recipe.eval.crop_border is not None else model_scale
    if recipe.sparsity is not None and recipe.sparsity.method == "classpruning":
        from nmrestore.engine.adaptive import adaptive_eval_payload

        return adaptive_eval_payload(ckpt, model, recipe, dataset, crop, class_map_dir)
    result = evaluate_model(model, dataset, crop, recipe.eval.test_y_channel, torch.device("cpu"))
    cost = count_cost(model)
    payload: dict[str, Any] = {
        "checkpoint": str(ckpt.path),
        "model": recipe.model.name,
        "scale": model_scale,
        "method": recipe.sparsity.method if recipe.sparsity else "dense",
        **result.to_dict(),
        "cost": cost.summary(),
        "layers": [
            {"name": name, "n": mask.n, "m": mask.m, "routes": [int(v) for v in mask.route_n]}
            for name, _, mask in nm_layers(model)
        ],
    }
    if recipe.sparsity is not None and recipe.sparsity.method == "sls":
        from nmrestore.methods.sls import achieved_budget, format_sls_table, sls_layer_table

        rows = sls_layer_table(model, cost)
        payload["sls_layers"] = rows
        payload["sls_achieved_budget"] = achieved_budget(model, recipe.sparsity)  # type: ignore[arg-type]
        payload["extra_lines"] = [
            format_sls_table(rows),
            f"SLS budget ({recipe.sparsity.budget_kind}): achieved {payload['sls_achieved_budget']:.4f}"  # type: ignore[attr-defined]
            f" <= {recipe.sparsity.budget:.4f}",  # type: ignore[attr-defined]
        ]
    if recipe.sparsity is not None and recipe.sparsity.method == "png":
        from nmrestore.methods.png import png_eval_extras

        payload.update(png_eval_extras(model, cost))
    return payload


@torch.no_grad()
def infer_images(
    checkpoint: Path,
    inputs: list[Path],
    out: Path,
    adaptive: bool = False,
    patch_size: int | None = None,
    stride: int | None = None,
    task: str | None = None,
) -> list[Path]:
    """Restore each LR image with the checkpoint's model; returns the written paths.

    ``adaptive``: a ClassPruning checkpoint runs its patch pipeline and writes a class map
    (``<stem>_classmap.png``) beside each output.
    """
    model, recipe = model_from_checkpoint(load_any(checkpoint))
    model.eval()
    if task is not None:  # a multi-task (PNG) model: run this task
        from nmrestore.methods.png import activate_task

        activate_task(model, task)
    images = [(path, read_image(path)) for path in inputs]  # read all first: fail before writing
    written = []
    if adaptive:
        from nmrestore.engine.adaptive import infer_adaptive

        return infer_adaptive(model, recipe, images, out, patch_size, stride)
    for path, image in images:
        output = model(to_tensor(image).unsqueeze(0)).clamp(0, 1)[0]
        written.append(write_image(out / f"{path.stem}.png", output))
    return written
