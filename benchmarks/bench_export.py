"""Export benchmark: packed checkpoint sizes and ONNX/PyTorch agreement.

1. **Packed size.** EDSR-baseline x2 with magnitude one-shot masks at 2:4 and at 2:32 (sizes do not
   depend on training, so a freshly built model serves), packed with ``pack_checkpoint``; the file
   is compared with the dense fp32 checkpoint file of the same network (``save_checkpoint``
   without optimizer or RNG state) and with the theoretical value: fp32 values plus
   ``ceil(log2 M)``-bit indices for pruned layers, dense fp32 elsewhere. Multi-route models are
   packed too (ClassPruning routes 8/16/32 of 32; a PNG model with three tasks), and every packed
   file is loaded back and checked bit-exact (every route's outputs equal the original's).
2. **ONNX.** One route/task of each of five models is exported (opset 18, dynamic axes) and run in
   onnxruntime on CPU against PyTorch on a 48x64 LR input; the table gives the max abs difference.

Run from the repository root::

    .venv/bin/python benchmarks/bench_export.py            # docs/bench/export.json + section "export"
    .venv/bin/python benchmarks/bench_export.py --no-write # print only
    .venv/bin/python benchmarks/bench_export.py --render   # redraw the section from the JSON
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, markdown_table, publish, results_path, save_results  # noqa: E402
from nmrestore.engine.checkpoint import save_checkpoint  # noqa: E402
from nmrestore.export import export_onnx, load_packed, pack_checkpoint, verify_onnx  # noqa: E402
from nmrestore.export.onnx import deployable_copy  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.recipes import load_recipe  # noqa: E402
from nmrestore.sparsity import NMConfig, dense_weight, set_route, sparsify_  # noqa: E402

SECTION = "export"
TITLE = "Export: packed checkpoints and ONNX"
PROBE = (48, 64)  # LR input (height, width) for the ONNX check


def _recipe_meta(sparsity: dict[str, object] | None) -> dict[str, object]:
    """A real checkpoint's metadata: the EDSR-baseline x2 recipe (with this sparsity) embedded."""
    overrides = [] if sparsity is None else [f"sparsity.{k}={v}" for k, v in sparsity.items()]
    recipe = load_recipe("edsr_baseline_x2_div2k", overrides)
    return {
        "recipe": recipe.model_dump(mode="json"),
        "model": {"name": recipe.model.name, "scale": recipe.model.scale},
        "step": 0,
    }


def _same_outputs(a: nn.Module, b: nn.Module, routes: int, select: Callable[[nn.Module, int], None]) -> bool:
    x = torch.rand(1, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for route in range(routes):
            select(a, route)
            select(b, route)
            if not torch.equal(a(x), b(x)):
                return False
    return True


def _set_route(model: nn.Module, route: int) -> None:
    set_route(model, route)


def packed_rows(folder: Path) -> list[dict[str, object]]:
    torch.manual_seed(0)
    dense = create_model("edsr_baseline", scale=2)
    dense_path = save_checkpoint(folder / "dense.safetensors", dense, _recipe_meta(None), with_rng=False)
    dense_file = dense_path.stat().st_size
    rows: list[dict[str, object]] = [
        {"model": "EDSR-baseline x2", "sparsity": "dense", "file bytes": dense_file, "% of dense file": 100.0}
    ]
    import nmrestore.methods  # noqa: F401 - registers every method
    from nmrestore.methods.classpruning import ClassPruningConfig
    from nmrestore.methods.oneshot import OneShotConfig

    cases: list[tuple[str, dict[str, object], int]] = [
        (f"one-shot {n}:{m}", {"method": "oneshot", "n": n, "m": m}, 1) for n, m in ((2, 4), (2, 32))
    ]
    cases.append(("ClassPruning 8/16/32 of 32 (3 routes)", {"method": "classpruning"}, 3))
    for label, sparsity, routes in cases:
        torch.manual_seed(0)
        model = create_model("edsr_baseline", scale=2)
        if sparsity["method"] == "oneshot":
            sparsify_(model, OneShotConfig(n=int(sparsity["n"]), m=int(sparsity["m"])))  # type: ignore[call-overload]
        else:
            sparsify_(model, ClassPruningConfig())
        training = save_checkpoint(
            folder / "sparse.safetensors", model, _recipe_meta(sparsity), with_rng=False
        )
        start = time.perf_counter()
        report = pack_checkpoint(training, folder / "packed.safetensors")
        pack_s = time.perf_counter() - start
        start = time.perf_counter()
        restored = load_packed(report.path)
        load_s = time.perf_counter() - start
        exact = _same_outputs(model, restored, routes, _set_route)
        encodings = sorted({layer.encoding for layer in report.layers})
        rows.append(
            {
                "model": "EDSR-baseline x2",
                "sparsity": label,
                "file bytes": report.file_bytes,
                "% of dense file": 100 * report.file_bytes / dense_file,
                "theory %": 100 * report.theory_ratio,
                "training ckpt bytes": training.stat().st_size,
                "encoding": "/".join(encodings),
                "pack s / load s": f"{pack_s:.2f} / {load_s:.2f}",
                "every route exact": "yes" if exact else "NO",
            }
        )
    rows.append(_png_row(folder))
    return rows


def _png_model(seed: int) -> tuple[nn.Module, object]:
    from nmrestore.methods.png import PNGConfig

    torch.manual_seed(seed)
    model = create_model("edsr_baseline_multiscale", scale=2)
    config = PNGConfig(m=32, ns=(8, 12, 16), max_grow=8)
    sparsify_(model, config)
    return model, config


def _png_row(folder: Path) -> dict[str, object]:
    """PNG x2/x3/x4 on the EDSR-baseline trunk, masks from magnitude (prune step only)."""
    from nmrestore.export import save_packed
    from nmrestore.methods.png.mask import prune_choice
    from nmrestore.methods.png.tasks import png_masks, select_task

    model, config = _png_model(0)
    for task, n in enumerate(config.ns):  # type: ignore[attr-defined]
        for _, module, mask in png_masks(model):
            cap = config.grow_cap(task)  # type: ignore[attr-defined]
            mask.set_task_mask(task, prune_choice(mask, dense_weight(module), task, n, cap), n)
    dense_path = save_checkpoint(
        folder / "png_dense.safetensors", deployable_copy(model)[0], {}, with_rng=False
    )
    dense_file = dense_path.stat().st_size
    report = save_packed(model, folder / "png.safetensors")
    restored, _ = _png_model(1)
    load_packed(report.path, model=restored)
    exact = _same_outputs(model, restored, 3, lambda mdl, t: select_task(mdl, t))
    return {
        "model": "EDSR-baseline x2/x3/x4 (PNG, one trunk)",
        "sparsity": "PNG 8/12/16 of 32, max_grow 8",
        "file bytes": report.file_bytes,
        "% of dense file": 100 * report.file_bytes / dense_file,
        "theory %": 100 * report.theory_ratio,
        "training ckpt bytes": "",
        "encoding": "/".join(sorted({layer.encoding for layer in report.layers})),
        "every route exact": "yes" if exact else "NO",
    }


def _onnx_models() -> list[tuple[str, Callable[[], nn.Module], int | None, str | None]]:
    from nmrestore.methods.classpruning import ClassPruningConfig
    from nmrestore.methods.png.mask import prune_choice
    from nmrestore.methods.png.tasks import png_masks

    def uniform(name: str, n: int, m: int) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            torch.manual_seed(0)
            model = create_model(name, scale=2)
            sparsify_(model, NMConfig(n=n, m=m))
            return model

        return build

    def classpruning() -> nn.Module:
        torch.manual_seed(0)
        model = create_model("edsr_small", scale=2)
        sparsify_(model, ClassPruningConfig(m=16, routes=(4, 8, 16)))
        return model

    def png() -> nn.Module:
        from nmrestore.methods.png import PNGConfig

        torch.manual_seed(0)
        model = create_model("edsr_small_multiscale", scale=2)
        config = PNGConfig(m=16, ns=(4, 6, 8), max_grow=4)
        sparsify_(model, config)
        for task, n in enumerate(config.ns):
            for _, module, mask in png_masks(model):
                keep = prune_choice(mask, dense_weight(module), task, n, config.grow_cap(task))
                mask.set_task_mask(task, keep, n)
        return model

    return [
        ("edsr_small x2, 2:4", uniform("edsr_small", 2, 4), None, None),
        ("carn_small x2, 2:4", uniform("carn_small", 2, 4), None, None),
        ("rcan_small x2, 2:4", uniform("rcan_small", 2, 4), None, None),
        ("edsr_small x2, ClassPruning 4/8/16 of 16, route 0", classpruning, 0, None),
        ("edsr_small_multiscale, PNG 4/6/8 of 16, task x3", png, None, "x3"),
    ]


def onnx_rows(folder: Path) -> list[dict[str, object]]:
    rows = []
    for label, build, route, task in _onnx_models():
        model = build()
        start = time.perf_counter()
        report = export_onnx(model, folder / "model.onnx", route=route, task=task)
        export_s = time.perf_counter() - start
        deployable, _ = deployable_copy(model, route, task)
        probe = torch.rand(1, 3, *PROBE, generator=torch.Generator().manual_seed(1))
        diff = verify_onnx(report.path, deployable, probe)
        pruned = sum(1 for n, m in report.patterns.values() if n < m)
        rows.append(
            {
                "model / route": label,
                "N:M layers": pruned,
                "opset": report.opset,
                "max abs diff (17x23)": f"{report.max_abs_diff:.2e}",
                f"max abs diff ({PROBE[0]}x{PROBE[1]})": f"{diff:.2e}",
                "within 1e-4": "yes" if max(diff, report.max_abs_diff or 0.0) <= 1e-4 else "NO",
                "ONNX bytes": report.file_bytes,
                "export s": round(export_s, 1),
            }
        )
        print(rows[-1], flush=True)
    return rows


PACKED_COLUMNS = [
    "model",
    "sparsity",
    "file bytes",
    "% of dense file",
    "theory %",
    "training ckpt bytes",
    "encoding",
    "every route exact",
]


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved rows (``docs/bench/export.json``)."""
    packed_table = markdown_table(payload["packed"], PACKED_COLUMNS)
    onnx_table = markdown_table(payload["onnx"], list(payload["onnx"][0]))
    body = f"""
Packed checkpoints (`nmrestore export CKPT --format packed`) against the dense fp32 checkpoint file of
the same network (`save_checkpoint`, no optimizer/RNG state). *theory %* = fp32 values + ceil(log2 M)-bit
indices for pruned layers, dense fp32 elsewhere, over the dense fp32 tensor bytes; the file adds the
safetensors/JSON header (recipe, per-layer N:M). *training ckpt bytes*: the masked model's own checkpoint
(dense weights + one uint8 rank per weight). Masks are magnitude one-shot on a freshly built model (sizes do
not depend on training). Multi-route rows: ClassPruning's largest route keeps all 32 of 32, so its layers
store every value plus a 2-bit band id per weight (`banded`: which route first keeps it) -- the price of
switching routes per patch; its file also holds the route classifier (ClassSR's 128-channel net), which the
plain EDSR dense file does not. PNG's shared layers store the union of the tasks' kept values with a 1-bit
union map (`union`; its task-owned upsamplers are `ranked`); *theory %* counts those, the file adds the
per-task mask bits (3 bits per shared weight) and 1-bit rank bands. The PNG dense file is the dense
three-upsampler model (three separate dense EDSR-baseline models would be about 3x). "every route exact":
the packed file, loaded back, gives bit-identical outputs on every route/task.

{packed_table}

ONNX export (`nmrestore export CKPT --format onnx [--route K] [--task T]`): dense-with-zeros weights,
opset 18, dynamic batch/height/width, run in onnxruntime (CPU) against PyTorch at two input sizes.
*export s* is wall time, most of it PyTorch's exporter rebuilding its operator registry on every call,
measured on a shared machine under load.

{onnx_table}
"""
    return TITLE, body


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--no-write", action="store_true", help="print only; leave docs/ (JSON and BENCHMARKS.md) alone"
    )
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from docs/bench/export.json"
    )
    args = parser.parse_args()
    if args.render:
        publish(SECTION, render)
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        packed = packed_rows(folder)
        print(markdown_table(packed, PACKED_COLUMNS), flush=True)
        onnx = onnx_rows(folder)
    data = {"packed": packed, "onnx": onnx}
    if args.no_write:
        print(render(SECTION, in_memory(data))[1])
        return
    save_results(SECTION, data)
    publish(SECTION, render)
    print(f"wrote {results_path(SECTION).relative_to(ROOT)} and section {SECTION!r} of docs/BENCHMARKS.md")


if __name__ == "__main__":
    main()
