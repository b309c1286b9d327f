"""``nmrestore demo``: the main job on the built-in photos, end to end, with a report.

1. train a small EDSR x2 densely (recipe ``demo_dense``);
2. sparsify it: one-shot 2:4 + fine-tune (``demo_oneshot``), SLS at a 25% budget (``demo_sls``)
   when that method is installed;
3. evaluate bicubic, dense and every sparse model on the built-in test images (Y PSNR/SSIM,
   crop = scale), count MACs for a 1280x720 output;
4. write ``report.md``, ``report.json``, a PSNR-against-MACs plot, side-by-side crops and, for
   SLS, the N-per-layer chart; checkpoints stay in the run folders.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from nmrestore.cli.report import markdown_table, plot_psnr_vs_macs, side_by_side, write_json
from nmrestore.cost import count_cost
from nmrestore.data.builtin import load_builtin
from nmrestore.data.datasets import SREvalDataset
from nmrestore.data.io import to_uint8
from nmrestore.engine.evaluate import bicubic_restorer, evaluate_fn, evaluate_model
from nmrestore.engine.hooks import method_hooks
from nmrestore.engine.runner import model_from_checkpoint, train
from nmrestore.io_atomic import atomic_write_text
from nmrestore.recipes.schema import Recipe, load_recipe

#: Overrides that turn every demo recipe into a smoke-test-sized run.
QUICK = ["train.steps=12", "train.val_every=12", "train.ckpt_every=6", "train.log_every=6", "data.train.batch_size=4"]


def _recipe(name: str, quick: bool, extra: list[str]) -> Recipe:
    return load_recipe(name, [*(QUICK if quick else []), *extra])


def _has_method(name: str) -> bool:
    importlib.import_module("nmrestore.methods")
    from nmrestore.sparsity.api import list_methods

    return name in list_methods()


def run_demo(out: Path, quick: bool = False, show_progress: bool = True) -> Path:
    """Run the whole main job into ``out``; returns the path of ``report.md``."""
    console = Console(stderr=True, quiet=not show_progress)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    runs: list[tuple[str, str, Path]] = []  # (label, budget, final checkpoint)

    def run(name: str, label: str, budget: str, extra: list[str]) -> Path:
        recipe = _recipe(name, quick, extra)
        run_dir = out / "runs" / recipe.name
        console.rule(f"[bold]{label}[/bold] ({recipe.name})")
        resume = (run_dir / "checkpoints" / "last.safetensors").exists() or any(
            run_dir.glob("stage_*/**/last.safetensors")  # a ClassPruning run killed mid-stage
        )
        train(recipe, run_dir, resume=resume, show_progress=show_progress)
        # the last checkpoint: the report compares runs as they ended, nothing picked on any score
        final = run_dir / "checkpoints" / "last.safetensors"
        runs.append((label, budget, final))
        return final

    dense_ckpt = run("demo_dense", "dense", "-", [])
    run("demo_oneshot", "oneshot", "2:4", [f"train.init_from={dense_ckpt}"])
    if _has_method("sls"):
        run("demo_sls", "sls", "25%", [f"train.init_from={dense_ckpt}"])
    if _has_method("classpruning"):
        cp_quick = ["sparsity.classifier_steps=6", "sparsity.joint_steps=6", "sparsity.label_stride=32"]
        run("demo_classpruning", "classpruning", "adaptive", [f"train.init_from={dense_ckpt}", *(cp_quick if quick else [])])

    console.rule("[bold]evaluation")
    scale = 2
    test_set = SREvalDataset(load_builtin("test"), scale)
    rows: list[dict[str, Any]] = []
    bicubic = evaluate_fn(bicubic_restorer(scale), test_set, crop_border=scale)
    rows.append({"method": "bicubic", "budget": "-", "psnr": bicubic.psnr, "ssim": bicubic.ssim, "macs_g": 0.0,
                 "macs_fraction": 0.0, "params_nonzero": 0, "packed_bytes": 0, "per_image": bicubic.per_image})
    models: dict[str, torch.nn.Module] = {}
    restorers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    dense_macs = None
    for label, budget, ckpt in runs:
        model, recipe = model_from_checkpoint(ckpt)
        model.eval()
        models[label] = model
        hooks = method_hooks(recipe.sparsity)
        restorers[label] = hooks.restorer(model)
        # a method scored its own way (ClassPruning: patch by patch, class maps saved)
        own = hooks.report_row(model, test_set, scale, float(dense_macs or 1), out / "class_maps")
        if own is not None:
            rows.append({**own, "checkpoint": str(ckpt)})
            continue
        result = evaluate_model(model, test_set, scale, True, torch.device("cpu"))
        cost = count_cost(model).summary()
        dense_macs = dense_macs or cost["dense_macs"]
        rows.append({
            "method": label, "budget": budget, "psnr": result.psnr, "ssim": result.ssim,
            "macs_g": cost["macs_g"], "macs_fraction": cost["macs"] / dense_macs,
            "prunable_macs_fraction": cost["prunable_macs"] / max(cost["prunable_dense_macs"], 1),
            "params_nonzero": cost["params_nonzero"], "packed_bytes": cost["packed_bytes"],
            "checkpoint": str(ckpt), "per_image": result.per_image,
        })

    plot = plot_psnr_vs_macs(rows, out / "psnr_vs_macs.png", "edsr_small x2, built-in test photos")
    pictures = _crops(out, test_set, restorers, scale)
    extra_md = []
    if "sls" in models:
        from nmrestore.methods.sls.report import plot_n_per_layer, sls_layer_table

        chart = plot_n_per_layer(models["sls"], out / "sls_n_per_layer.png")
        table = [r for r in sls_layer_table(models["sls"]) if r.get("n") is not None]
        extra_md.append(f"## SLS: N per layer\n\n![N per layer]({chart.name})\n")
        extra_md.append(
            markdown_table(
                [{**r, "nm": f"{r['n']}:{r['m']}"} for r in table],
                [("name", "layer", ""), ("shape", "shape", ""), ("share_of_macs", "share of MACs", ".1%"),
                 ("nm", "N:M", "")],
            )
        )

    if "classpruning" in models:  # the demo's own ClassPruning run: its routes and class maps
        cp = {row["method"]: row for row in rows}["classpruning"]
        shares = ", ".join(f"route {k}: {n}" for k, n in enumerate(cp["route_histogram"]))
        extra_md.append(
            f"\n## ClassPruning: routes {cp['routes']} per 32x32 patch\n\nPatches per route ({shares}); "
            f"{cp['macs_fraction']:.1%} of the dense net run once on each whole image (patch overlap, classifier "
            f"and blending included; {cp['macs_fraction_per_patch']:.1%} of the dense net on the same patches, "
            "ClassSR's per-patch convention). Class maps (green = cheapest route, red = full):\n"
        )
        extra_md += [f"![class map {r['name']}](class_maps/{r['name']}_classmap.png)" for r in cp["per_image"]]
    elapsed = time.perf_counter() - started
    columns = [("method", "method", ""), ("budget", "budget", ""), ("psnr", "PSNR (dB)", ".3f"),
               ("ssim", "SSIM", ".4f"), ("macs_g", "GMACs @720p", ".2f"), ("macs_fraction", "MACs vs dense", ".1%"),
               ("params_nonzero", "non-zero params", ","), ("packed_bytes", "packed bytes", ",")]
    dense_row = next(r for r in rows if r["method"] == "dense")
    lines = [
        "# nmrestore demo report",
        "",
        f"edsr_small x2 trained on the built-in photos ({', '.join(n for n, _ in load_builtin('train'))}), "
        f"evaluated on {', '.join(n for n, _ in load_builtin('test'))} (Y-channel PSNR/SSIM, {scale}-pixel border "
        f"crop). MACs for a 1280x720 output. {'QUICK smoke run: numbers are not meaningful. ' if quick else ''}"
        f"Total time {elapsed / 60:.1f} min.",
        "",
        markdown_table(rows, columns),
        "",
        f"Dense is {dense_row['psnr'] - rows[0]['psnr']:+.2f} dB over bicubic.",
        "",
        "![PSNR against MACs](psnr_vs_macs.png)",
        "",
        "## Crops (bicubic | dense | sparse ... | ground truth)",
        "",
        *[f"![{p.stem}]({p.name})" for p in pictures],
        "",
        *extra_md,
    ]
    report = out / "report.md"
    atomic_write_text(report, "\n".join(lines) + "\n")
    write_json(out / "report.json", {"rows": rows, "elapsed_s": elapsed, "quick": quick, "plot": str(plot)})
    return report


@torch.no_grad()
def _crops(
    out: Path, test_set: SREvalDataset, restorers: dict[str, Callable[[torch.Tensor], torch.Tensor]], scale: int
) -> list[Path]:
    pictures = []
    for index in range(len(test_set)):
        sample = test_set[index]
        lq = sample["lq"].unsqueeze(0)  # type: ignore[union-attr]
        panels = [("bicubic", to_uint8(bicubic_restorer(scale)(lq)[0].clamp(0, 1)))]
        for label, restore in restorers.items():  # (an adaptive model restores patch by patch)
            panels.append((label, to_uint8(restore(lq)[0].clamp(0, 1))))
        panels.append(("ground truth", to_uint8(sample["gt"])))  # type: ignore[arg-type]
        pictures.append(side_by_side(panels, out / f"crops_{sample['name']}.png"))
    return pictures
