"""A benchmark's outputs: the text and Markdown tables, the PSNR/MACs plot, the JSON and the report body."""

from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from nmrestore.bench.config import BenchConfig, Row, dense_recipe
from nmrestore.bench.evidence import ablation_lines, format_delta
from nmrestore.bench.harness import check_rows
from nmrestore.io_atomic import atomic_open, atomic_write_text


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


#: The columns of the printed/markdown table.
TABLE_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("method", "method", 0),
    ("budget", "budget", 0),
    ("psnr", "PSNR", 5),
    ("ssim", "SSIM", 4),
    ("macs_g", "GMACs", 4),
    ("macs_fraction", "MACs %", 0),
    ("prunable_macs_fraction", "prunable %", 0),
    ("params_nonzero", "params (nz)", 0),
    ("packed_bytes", "packed B", 0),
    ("step_time_ratio", "step x", 3),
    ("vs_dense", "Δ vs dense, 95% CI", 0),
)


def _cell(row: Row, key: str, digits: int) -> str:
    value = row.get(key)
    if key == "budget" and row.get("method") in ("dense", "dense_ft"):
        return "-"
    if key in ("macs_fraction", "prunable_macs_fraction") and isinstance(value, float):
        return f"{100 * value:.2f}"
    if key == "psnr" and isinstance(value, float):
        return f"{value:.3f}"
    if key == "ssim" and isinstance(value, float):
        return f"{value:.4f}"
    if key == "vs_dense":
        return format_delta(value)
    return _fmt(value, digits or 4)


def format_table(rows: list[Row]) -> str:
    """A plain-text table for the terminal."""
    header = [title for _, title, _ in TABLE_COLUMNS]
    body = [[_cell(row, key, digits) for key, _, digits in TABLE_COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    for r in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The same table in Markdown."""
    lines = [
        "| " + " | ".join(title for _, title, _ in TABLE_COLUMNS) + " |",
        "|" + "---|" * len(TABLE_COLUMNS),
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row, key, digits) for key, _, digits in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def _model_label(config: BenchConfig) -> str:
    """The model's name with its non-default keywords, e.g. ``edsr_baseline (n_blocks=8, global_skip=True)``."""
    if not config.model_kwargs:
        return config.model
    return f"{config.model} ({', '.join(f'{k}={v}' for k, v in config.model_kwargs.items())})"


def describe(config: BenchConfig) -> str:
    """One paragraph: what was trained how long, on what."""
    train = "all" if config.max_train_images is None else str(config.max_train_images)
    test = "all" if config.max_test_images is None else str(config.max_test_images)
    if config.data_root is None:
        train_set, test_set = f"{train} built-in training images", f"{test} built-in test images"
        val_set = "the held-out bottom strips of the training images"
    else:
        train_set = f"{train} training images of {config.data_root} (train split)"
        test_set = f"{test} images of its test split"
        val_set = "its valid split"
    ci = (
        f" 'Δ vs dense': mean paired difference of the PSNR of fixed {config.ci_tile}x{config.ci_tile} HR tiles"
        " with its 95% bootstrap interval (BCa, 10,000 resamples, seed 0)."
        if config.ci_tile
        else ""
    )
    if config.task == "sr":
        what, patch, metric = f"{_model_label(config)} x{config.scale}", "LR patch", f"Y-channel PSNR/SSIM, crop {config.scale}"
    else:
        degradation = dense_recipe(config).task.degradation()
        assert degradation is not None
        what = f"{config.model}, {config.task} ({degradation.describe()}, made on the fly; test inputs with a fixed seed per image)"
        patch, metric = "patch", "RGB PSNR/SSIM, no border crop"
    return (
        f"{what}; dense: {config.dense_steps} steps at lr {config.dense_lr:g}; every method "
        f"fine-tuned {config.finetune_steps} steps at lr {config.finetune_lr:g} from it (batch {config.batch_size}, "
        f"{patch} {config.patch_size}, {train_set}; validated at the end only, on {val_set}); scored on "
        f"{test_set}, {metric}; last checkpoints. MACs for a 1280x720 output; 'MACs %' of the dense whole "
        f"network, 'prunable %' of the layers N:M prunes; 'step x' = training-step time / dense, measured "
        f"interleaved in the same process (median of {config.timing_rounds}).{ci}"
    )


def machine() -> str:
    """Where the figures were measured (one line)."""
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def plot_psnr_macs(rows: list[Row], path: str | Path, title: str | None = None) -> Path:
    """PSNR against effective GMACs: one line per method, bicubic and dense(-ft) as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = {
        "bicubic": ("k", "x", 80),
        "input": ("k", "x", 80),
        "dense": ("k", "*", 160),
        "dense_ft": ("tab:grey", "D", 40),
    }
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        selected = sorted((r for r in rows if r["method"] == method), key=lambda r: r["macs_g"])
        xs = [r["macs_g"] for r in selected]
        ys = [r["psnr"] for r in selected]
        if method in points:
            color, marker, size = points[method]
            ax.scatter(
                xs,
                ys,
                color=color,
                marker=marker,
                s=size,
                label=method,
                zorder=4 if method == "dense_ft" else 3,
            )
            if method in ("bicubic", "input"):
                ax.axhline(ys[0], color="k", linestyle=":", linewidth=0.8)
        else:
            ax.plot(xs, ys, marker="o", label=method)
            for r in selected:
                ax.annotate(
                    str(r["budget"]),
                    (r["macs_g"], r["psnr"]),
                    fontsize=7,
                    xytext=(3, 3),
                    textcoords="offset points",
                )
    ax.set_xlabel("effective GMACs (1280x720 output)")
    sr = all(str(r.get("task") or "sr").startswith("sr") for r in rows)
    ax.set_ylabel("PSNR (dB, Y channel)" if sr else "PSNR (dB, RGB)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    return path


def json_payload(
    rows: list[Row], config: BenchConfig | None = None, notes: list[str] | None = None, command: str | None = None
) -> dict[str, Any]:
    """The rows with the config, notes, checks, command, date and machine: what ``--json`` prints."""
    from datetime import datetime, timezone

    return {
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "config": None if config is None else config.model_dump(mode="json"),
        "machine": machine(),
        "notes": list(notes or []),
        "checks": [{"check": text, "ok": ok} for text, ok in check_rows(rows)],
        "rows": rows,
    }


def write_json(
    rows: list[Row],
    path: str | Path,
    config: BenchConfig | None = None,
    notes: list[str] | None = None,
    command: str | None = None,
) -> Path:
    """:func:`json_payload` written to ``path`` (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(json_payload(rows, config, notes, command), indent=2, default=str))
    return path


def write_report(
    rows: list[Row],
    config: BenchConfig,
    out_dir: str | Path,
    notes: Sequence[str] = (),
    command: str | None = None,
) -> Path:
    """``out_dir``/bench_<task>.md (table, checks, notes) beside its plot ``bench_<task>_psnr_macs.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_psnr_macs(rows, out_dir / f"bench_{config.task}_psnr_macs.png", plot_title(config))
    page = out_dir / f"bench_{config.task}.md"
    header = f"# Benchmark: {config.task}\n\n"
    if command:
        header += f"Command: `{command}`  \n"
    header += f"Machine: {machine()}\n\n"
    atomic_write_text(page, header + report_body(rows, config, notes, plot.name) + "\n")
    return page


def plot_title(config: BenchConfig) -> str:
    what = f"x{config.scale}" if config.task == "sr" else config.task
    return f"{config.model} {what}: PSNR vs MACs ({'quick' if config.quick else 'full'} run)"


def report_body(rows: list[Row], config: BenchConfig, notes: Sequence[str], plot: str | None = None) -> str:
    """The Markdown body shared by the CLI report and docs/BENCHMARKS.md: setup, table, checks, plot."""
    parts = [describe(config), "", markdown_table(rows), ""]
    checks = check_rows(rows)
    if checks:
        parts += ["Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks] + [""]
    ablation = ablation_lines(rows)
    if ablation:
        parts += ["Ablation (paired 95% intervals; findings, not claims):", ""] + [f"- {a}" for a in ablation] + [""]
    if notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in notes] + [""]
    if plot:
        parts += [f"![PSNR against MACs]({plot})", ""]
    return "\n".join(parts)
