"""ClassPruning's eval/infer hooks: its models run through the patch pipeline (``ClassPruningConfig.eval_hooks``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from nmrestore.engine.checkpoint import Checkpoint
from nmrestore.engine.hooks import MethodHooks
from nmrestore.methods.classpruning.pipeline import AdaptivePipeline, adaptive_engine
from nmrestore.methods.classpruning.program.evaluation import (
    adaptive_eval_payload,
    adaptive_report_row,
    infer_adaptive,
)
from nmrestore.recipes.schema import Recipe


class ClassPruningHooks(MethodHooks):
    """Scored, restored and inferred patch by patch, each patch on the route its classifier picks."""

    adaptive_by_default = True

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
        return adaptive_eval_payload(ckpt, model, recipe, dataset, crop, class_map_dir, engine=engine)

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
        return infer_adaptive(model, recipe, images, out, patch_size, stride, engine=engine)

    def sparse_engine(self, model: nn.Module) -> nn.Module:
        return adaptive_engine(model)

    def restorer(self, model: nn.Module) -> Callable[[Tensor], Tensor]:
        return AdaptivePipeline(model).restore

    def report_row(
        self,
        model: nn.Module,
        dataset: Iterable[dict[str, object]],
        crop: int,
        dense_macs: float,
        class_map_dir: Path | None,
    ) -> dict[str, Any] | None:
        row, _ = adaptive_report_row(model, dataset, crop, dense_macs, class_map_dir)
        return row
