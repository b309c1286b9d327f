"""``bench_speed.py --quality``: what bf16 and fp16 cost in PSNR, on trained checkpoints and real photos.

Each checkpoint's model is run on the test images four ways: the f32 engine, the bf16 engine with
every conv forced onto its bf16 sparse kernel (first/last convs: PyTorch's bf16 conv), the bf16
engine forced dense (every conv PyTorch's bf16 conv), and, where the kernel has its fp16 form, the
fp16 engine with every conv forced onto it (fp16 sums). The forced tactics make the rows independent
of timing noise; an ``auto`` engine mixes these, so its PSNR lies within their range. Each image
runs twice and the second output is scored: an engine settles its hand-offs (16-bit chains) and its
fused AMX residual blocks only once a shape's tactics are decided, in the first forward. PSNR follows
the project's SR protocol (Y channel, crop = scale, 8-bit grid; ``metrics/psnr_ssim.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from nmrestore.data.datasets import SREvalDataset, load_folder
from nmrestore.engine.evaluate import evaluate_model
from nmrestore.engine.loading import load
from nmrestore.runtime import EngineConfig, compile_sparse, load_kernel

VARIANTS = {
    "f32 engine": EngineConfig(tactic="sparse", precision="f32"),
    "bf16 engine, sparse kernels": EngineConfig(tactic="sparse", precision="bf16"),
    "bf16 engine, dense (oneDNN)": EngineConfig(tactic="dense", precision="bf16"),
    "fp16 engine, sparse kernels": EngineConfig(tactic="sparse", precision="fp16"),
}


class SettledForward(nn.Module):
    """The engine's second forward of each input (the first decides the tactics of its shape)."""

    def __init__(self, engine: nn.Module) -> None:
        super().__init__()
        self.engine = engine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.engine(x)
        return self.engine(x)


def run_quality(checkpoints: list[Path], photos: Path, split: str = "test") -> list[dict[str, object]]:
    """One row per checkpoint: each variant's mean PSNR over the images and its per-image PSNRs."""
    rows: list[dict[str, object]] = []
    for path in checkpoints:
        model, recipe = load(path)
        scale = int(recipe.model.scale)
        pairs = load_folder(photos, scale, split=split)
        samples = list(SREvalDataset(pairs.gt, scale, pairs.lq))
        row: dict[str, object] = {"checkpoint": f"{path.parent.parent.name}/{path.name}", "scale": scale}
        per_image: dict[str, list[float]] = {}
        lib = load_kernel()
        for label, config in VARIANTS.items():
            if config.precision == "fp16" and (lib is None or not lib.has_f16):
                continue  # no fp16 kernel on this CPU: the row would repeat the f32 engine
            engine = compile_sparse(model.eval(), config)
            result = evaluate_model(SettledForward(engine), samples, crop_border=scale, with_ssim=False)
            per_image[label] = [float(r["psnr"]) for r in result.per_image]
        row["images"] = [str(r["name"]) for r in result.per_image]
        row["psnr"] = per_image
        rows.append(row)
        print({"checkpoint": row["checkpoint"], **{k: sum(v) / len(v) for k, v in per_image.items()}}, flush=True)
    return rows
