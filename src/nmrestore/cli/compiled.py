"""``compile`` and ``infer`` on a compiled file: the sparse engine saved once, run without rebuilding.

``nmrestore compile CKPT`` loads a checkpoint (training or packed), compiles it for the sparse CPU
kernel, runs it once on each ``--input`` size so every layer chooses its tactic there, and saves
the engine (:func:`~nmrestore.runtime.save_compiled`). ``nmrestore infer FILE`` detects such a
file and runs it as saved: an image of a compiled size takes no tactic timing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from nmrestore.errors import NMRestoreError
from nmrestore.runtime import EngineConfig, LayerDecision

#: Suffix of compiled files (the default ``--out`` is ``<checkpoint stem>.nmc.safetensors``).
SUFFIX = ".nmc.safetensors"


@dataclass(frozen=True)
class CompileReport:
    path: Path
    model: str
    sizes: list[tuple[int, int]]
    sparse_layers: int
    decisions: list[LayerDecision]
    kernel: str

    def summary(self) -> str:
        shapes = ", ".join(f"{w}x{h}" for h, w in self.sizes) or "none (tactics are timed at first use)"
        chosen = sum(d.choice == "sparse" for d in self.decisions)
        return (
            f"{self.path}: {self.model}, {self.sparse_layers} sparse layer(s); tactics decided for {shapes}: "
            f"{chosen} of {len(self.decisions)} choice(s) on the sparse kernel ({self.kernel}); "
            f"{self.path.stat().st_size / 1e6:.2f} MB"
        )


def default_out(checkpoint: Path) -> Path:
    name = checkpoint.name.removesuffix(".safetensors")
    return checkpoint.with_name(name + SUFFIX)


@torch.no_grad()
def compile_checkpoint(
    checkpoint: Path,
    out: Path | None,
    sizes: list[tuple[int, int]],
    config: EngineConfig,
    allow_large: bool = False,
) -> CompileReport:
    """Compile ``checkpoint`` for the sparse engine, decide its tactics on ``sizes`` (LR height,
    width), write it to ``out``. ClassPruning checkpoints are refused (their routes change per patch)."""
    from nmrestore.engine.loading import load_any
    from nmrestore.engine.runner import model_from_checkpoint
    from nmrestore.limits import check_speed_size
    from nmrestore.runtime import compile_sparse, engine_state, save_compiled, sparse_layers

    ckpt = load_any(checkpoint)
    sparsity = ckpt.meta.get("sparsity")
    if isinstance(sparsity, dict) and sparsity.get("method") in ("classpruning", "png"):
        raise NMRestoreError(
            f"{checkpoint} is a {sparsity['method']} model: its routes change per patch or task, and a "
            "compiled file holds one; run it with `nmrestore infer CKPT --sparse-engine`"
        )
    model, recipe = model_from_checkpoint(ckpt, allow_large=allow_large)
    for size in sizes:
        check_speed_size(size, recipe.model.scale)  # before any work
    target = out if out is not None else default_out(Path(ckpt.path or checkpoint))
    engine = compile_sparse(model.eval(), config)
    channels = int(getattr(model, "n_colors", 3) or 3)
    for height, width in sizes:
        x = torch.rand(1, channels, height, width, generator=torch.Generator().manual_seed(0))
        engine(x)  # every layer chooses its tactic for this shape
        engine(x)  # and the hand-off pairs found on the first run are in place
    save_compiled(engine, target, recipe=recipe.model_dump(mode="json"))
    state = engine_state(engine)
    assert state is not None
    return CompileReport(
        target,
        f"{recipe.model.name} x{recipe.model.scale}",
        sizes,
        len(sparse_layers(engine)),
        state.table(),
        state.kernel_id if state.kernel is not None else f"kernel unavailable: {state.kernel_reason}",
    )


@torch.no_grad()
def infer_compiled(
    path: Path,
    inputs: list[Path],
    out: Path,
    adaptive: bool | None,
    task: str | None,
    allow_large: bool,
    tile: int | None,
    device: str,
    progress: bool,
) -> list[Path]:
    """``infer`` with a compiled file (see :func:`nmrestore.cli.evaluation.infer_images`)."""
    from nmrestore.cli.evaluation import _device, _image_size, plan_outputs, restore_images
    from nmrestore.data.io import read_image
    from nmrestore.engine.loading import load
    from nmrestore.limits import check_infer_size

    if tile is not None and tile < 0:
        raise NMRestoreError(f"--tile must be 0 (no tiling) or a positive LR size, got {tile}")
    if adaptive:
        raise NMRestoreError(f"{path} is a compiled file: it runs one route, --adaptive needs the checkpoint")
    if task is not None:
        raise NMRestoreError(f"{path} is a compiled file of one task: --task needs the checkpoint")
    target = _device(device, sparse_engine=True)  # the engine runs on the CPU
    plans = plan_outputs(inputs, out)
    runner, recipe = load(path, allow_large=allow_large)
    scale = recipe.model.scale
    for image_path in inputs:  # header sizes first: refuse a huge output before decoding anything
        size = _image_size(image_path)
        if size is not None:
            check_infer_size(str(image_path), size, scale)
    images = [read_image(p) for p in inputs]  # read all first: fail before writing
    return restore_images(runner, images, plans, scale, tile, target, progress)
