"""Class maps: each patch's route painted over the image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nmrestore.data.io import to_uint8, write_image
from nmrestore.methods.classpruning.pipeline import AdaptiveResult


def route_colors(k: int) -> list[tuple[int, int, int]]:
    """K colours from green (cheapest route) through yellow to red (full route)."""
    anchors = np.array([[26, 152, 80], [254, 224, 139], [215, 48, 39]], dtype=np.float64)
    out = []
    for i in range(k):
        x = 0.0 if k == 1 else 2 * i / (k - 1)
        j = min(int(x), 1)
        c = anchors[j] + (anchors[j + 1] - anchors[j]) * (x - j)
        out.append((int(c[0]), int(c[1]), int(c[2])))
    return out


def class_map(result: AdaptiveResult) -> np.ndarray:
    """Route per LR pixel (h, w): patches painted in order, so each pixel shows its last patch."""
    h, w = result.lr_size
    ph, pw = result.patch
    grid = np.zeros((h, w), dtype=np.int64)
    for route, (t, s) in zip(result.routes.tolist(), result.positions, strict=True):
        grid[t : t + ph, s : s + pw] = route
    return grid


def save_class_map(result: AdaptiveResult, path: str | Path, alpha: float = 0.45) -> Path:
    """The restored image with each patch tinted by its route, and a legend strip below."""
    from PIL import Image, ImageDraw

    image = to_uint8(result.output[0].clamp(0, 1)).astype(np.float64)
    grid = class_map(result).repeat(result.scale, axis=0).repeat(result.scale, axis=1)
    colors = np.array(route_colors(result.costs.num_routes), dtype=np.float64)
    tinted = (1 - alpha) * image + alpha * colors[grid]
    h, w = grid.shape
    for t, s in result.positions:  # thin patch borders
        ph, pw = result.patch[0] * result.scale, result.patch[1] * result.scale
        tinted[t * result.scale, s * result.scale : s * result.scale + pw] *= 0.7
        tinted[t * result.scale : t * result.scale + ph, s * result.scale] *= 0.7
    picture = Image.fromarray(np.clip(tinted, 0, 255).round().astype(np.uint8))
    lines = [
        f"route {k}: {n} patches, {f:.0%} MACs"
        for k, (n, f) in enumerate(zip(result.histogram, result.costs.fractions(), strict=True))
    ]
    lines.append(
        f"{result.macs_fraction:.1%} of whole-image dense MACs ({result.macs_fraction_per_patch:.1%} per patch)"
    )
    legend_h = 14 * len(lines) + 6
    canvas = Image.new("RGB", (max(w, 260), h + legend_h), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        y = h + 4 + 14 * i
        if i < len(colors):
            draw.rectangle([4, y + 1, 14, y + 11], fill=tuple(int(v) for v in colors[i]))
        draw.text((20, y), line, fill="black")
    return write_image(path, np.asarray(canvas))
