"""Pictures and tables people read: PSNR-vs-MACs plots, side-by-side crops, Markdown reports."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on machines without a display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw

from nmrestore.data.io import write_image
from nmrestore.io_atomic import atomic_open, atomic_write_text


def plot_psnr_vs_macs(rows: Sequence[dict[str, Any]], path: Path, title: str = "PSNR against MACs") -> Path:
    """One line per method (points sorted by MACs); single points for bicubic/dense."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(str(row["method"]), []).append(row)
    for method, items in methods.items():
        items = sorted(items, key=lambda r: float(r["macs_g"]))
        xs = [float(r["macs_g"]) for r in items]
        ys = [float(r["psnr"]) for r in items]
        ax.plot(xs, ys, marker="o", label=method, linestyle="-" if len(items) > 1 else "none")
        for r, x, y in zip(items, xs, ys, strict=True):
            if r.get("budget") not in (None, "", "-"):
                ax.annotate(str(r["budget"]), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("GMACs (1280x720 output)")
    ax.set_ylabel("PSNR (dB, Y channel)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def side_by_side(
    panels: Sequence[tuple[str, np.ndarray]], path: Path, box: tuple[int, int, int, int] | None = None, zoom: int = 3
) -> Path:
    """Crops of several HxWx3 uint8 images next to each other, labelled, enlarged ``zoom`` times."""
    height, width = panels[0][1].shape[:2]
    if box is None:
        size = min(64, height, width)
        top, left = (height - size) // 2, (width - size) // 2
        box = (top, left, size, size)
    top, left, h, w = box
    tiles = []
    for label, image in panels:
        crop = Image.fromarray(image[top : top + h, left : left + w]).resize((w * zoom, h * zoom), Image.NEAREST)
        canvas = Image.new("RGB", (crop.width, crop.height + 16), "white")
        canvas.paste(crop, (0, 16))
        ImageDraw.Draw(canvas).text((3, 2), label, fill="black")
        tiles.append(canvas)
    strip = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), tiles[0].height), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + 4
    return write_image(path, np.asarray(strip))


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, spec in columns:
            value = row.get(key, "")
            cells.append(format(value, spec) if isinstance(value, int | float) and spec else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: Any) -> Path:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str))
    return path
