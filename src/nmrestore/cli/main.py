"""The ``nmrestore`` command line: thin wrappers over the library.

Every user mistake (bad image, bad recipe, wrong checkpoint...) ends with one line on stderr and
exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from nmrestore.cli.errors import clean_errors
from nmrestore.errors import NMRestoreError

app = typer.Typer(
    name="nmrestore",
    help="N:M structured sparsity for image-restoration networks: train, sparsify, evaluate, measure.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



class Tactic(str, Enum):
    """How `speed` runs each N:M layer: timed per layer (auto), always the sparse kernel, or dense."""

    auto = "auto"
    sparse = "sparse"
    dense = "dense"


class Precision(str, Enum):
    """What `speed`'s engine may run in: f32 only, bf16 or fp16 too (timed per layer), or every
    16-bit form the CPU has."""

    f32 = "f32"
    bf16 = "bf16"
    fp16 = "fp16"
    auto = "auto"


class Device(str, Enum):
    """Where eval/infer run the model."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# Options shared by the commands that load a model (one definition, one help text).
AllowLarge = Annotated[bool, typer.Option("--allow-large", help="load a model above the 1 GiB size limit for files")]
DeviceOption = Annotated[Device, typer.Option(help="where the model runs (auto: CUDA when available)")]
ProgressOption = Annotated[
    bool | None,
    typer.Option("--progress/--no-progress", help="a progress bar over the images (default: on a terminal)"),
]


def _show_progress(flag: bool | None) -> bool:
    """An explicit --progress/--no-progress, else a bar only when stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


class ExportFormat(str, Enum):
    """What `export` writes: a packed checkpoint (every route) or ONNX (one route, dense-with-zeros)."""

    packed = "packed"
    onnx = "onnx"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _parse_size(text: str | None) -> tuple[int, int] | None:
    """``320x180`` (width x height) -> (height, width), within :mod:`nmrestore.limits`."""
    from nmrestore.limits import parse_size

    return parse_size(text)


def _too_small(model: str, size: tuple[int, int] | None, exc: RuntimeError) -> NMRestoreError:
    """A model that cannot run at ``size`` (a kernel larger than the input...): one line."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = f"a {size[1]}x{size[0]} input" if size else "its default input"
    return NMRestoreError(f"{model} cannot run on {where} ({first})")


@app.command()
@clean_errors
def models() -> None:
    """List the registered models with their parameter counts at their default scale (x2 for SR)."""
    from nmrestore.models import create_model, list_models

    for name in list_models():
        model = create_model(name)  # the builder's default scale: x2 for SR, 1 for deblurring nets
        params = sum(p.numel() for p in model.parameters())
        typer.echo(f"{name:<24} {params:>12,} params (x{model.scale})")


@app.command()
@clean_errors
def cost(
    model: Annotated[str, typer.Argument(help="a registered model name (see `nmrestore models`)")],
    scale: Annotated[int | None, typer.Option(help="SR scale (default: the model's, x2 for SR, 1 otherwise)")] = None,
    sparsity: Annotated[str | None, typer.Option(help="uniform N:M, e.g. 2:4")] = None,
    input: Annotated[str | None, typer.Option(help="LR input WIDTHxHEIGHT (default: 1280x720 output)")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON with per-layer rows and totals")] = False,
) -> None:
    """Per-layer MACs, parameters and packed bytes of a model (dense or uniform N:M)."""
    from nmrestore.cost import count_cost
    from nmrestore.models import create_model
    from nmrestore.sparsity import NMConfig, parse_nm, sparsify_

    net = create_model(model, scale=scale)
    report = None
    if sparsity:
        n, m = parse_nm(sparsity)
        report = sparsify_(net, NMConfig(n=n, m=m))
    size = _parse_size(input)
    try:
        result = count_cost(net, size)
    except RuntimeError as exc:  # e.g. a 3x3 conv on a 1x1 input without padding
        raise _too_small(model, size, exc) from None
    if json_out:
        payload = result.to_dict()
        payload["model"] = {"name": model, "scale": getattr(net, "scale", scale), "sparsity": sparsity}
        if report is not None:
            payload["dense_layers"] = [{"name": d.name, "reason": d.reason} for d in report.dense]
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(result.table())
        if report is not None:
            for d in report.dense:
                typer.echo(f"dense: {d.name} ({d.reason})")


@app.command()
@clean_errors
def train(
    recipe: Annotated[str, typer.Argument(help="a YAML recipe, or the name of a built-in one")],
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. --set train.steps=100")] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="more key.path=value overrides")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Train (and sparsify) from a recipe; works under torchrun for DDP."""
    from nmrestore.engine.runner import train as run_training
    from nmrestore.recipes import load_recipe

    _setup_logging(verbose)
    parsed = load_recipe(recipe, [*(set_ or []), *(overrides or [])])
    run_dir = out or Path("runs") / parsed.name
    result = run_training(parsed, run_dir, resume=resume, show_progress=progress)
    if result.final is not None:
        typer.echo(
            f"{run_dir}: step {result.state.step}, val PSNR {result.final.psnr:.3f} dB, SSIM {result.final.ssim:.4f}"
        )


@app.command("eval")
@clean_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint (or a run folder)")],
    hr_dir: Annotated[Path | None, typer.Option(help="folder of HR images (LR made on the fly) or a paired set")] = None,
    scale: Annotated[int | None, typer.Option(help="must match the checkpoint's scale")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    class_maps: Annotated[
        Path | None, typer.Option(help="ClassPruning: folder for the class maps (default <run>/class_maps)")
    ] = None,
    task: Annotated[str | None, typer.Option(help="multi-task (PNG) model: the task to score, e.g. x3")] = None,
    sparse_engine: Annotated[
        bool, typer.Option("--sparse-engine", help="run the N:M layers on the sparse CPU kernel")
    ] = False,
    allow_large: AllowLarge = False,
    device: DeviceOption = Device.cpu,
    progress: ProgressOption = None,
) -> None:
    """PSNR/SSIM and cost of a checkpoint (SR: Y channel, crop = scale; deblur/denoise: RGB, no crop).

    Built-in test images by default, degraded as the checkpoint's task says; a folder is read in any
    known layout (pairs such as GoPro or lq/ + gt/ are used as they are)."""
    from nmrestore.cli.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(
        checkpoint,
        hr_dir,
        scale,
        class_maps,
        task=task,
        sparse_engine=sparse_engine,
        allow_large=allow_large,
        device=device.value,
        progress=_show_progress(progress),
    )
    if json_out:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    typer.echo(f"{'image':<24} {'PSNR':>8} {'SSIM':>8}")
    for row in result["per_image"]:
        typer.echo(f"{row['name']:<24} {row['psnr']:>8.3f} {row['ssim']:>8.4f}")
    typer.echo(f"{'mean':<24} {result['psnr']:>8.3f} {result['ssim']:>8.4f}")
    if "metric" in result:
        typer.echo(f"task {result['task_label']}; PSNR/SSIM on {result['metric']}, {result['crop_border']}-pixel border crop")
    c = result["cost"]
    typer.echo(
        f"MACs (1280x720 output): {c['macs_g']:.2f} G ({c['macs_fraction']:.1%} of dense); "
        f"params {c['params_nonzero']:,} non-zero of {c['params']:,}"
    )
    for line in result.get("extra_lines", []):
        typer.echo(line)


@app.command()
@clean_errors
def infer(
    checkpoint: Annotated[
        Path, typer.Argument(help="a .safetensors checkpoint (or a run folder) or a compiled file (`compile`)")
    ],
    inputs: Annotated[list[Path], typer.Argument(help="LR images")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("outputs"),
    adaptive: Annotated[
        bool | None,
        typer.Option(
            "--adaptive/--no-adaptive",
            help="ClassPruning: patch pipeline + a class map per image (default: on for ClassPruning checkpoints)",
        ),
    ] = None,
    patch: Annotated[int | None, typer.Option(help="--adaptive: LR patch size (default: the recipe's)")] = None,
    stride: Annotated[int | None, typer.Option(help="--adaptive: LR patch stride (default: the recipe's)")] = None,
    task: Annotated[str | None, typer.Option(help="multi-task (PNG) model: the task to run, e.g. x3")] = None,
    sparse_engine: Annotated[
        bool, typer.Option("--sparse-engine", help="run the N:M layers on the sparse CPU kernel")
    ] = False,
    allow_large: AllowLarge = False,
    device: DeviceOption = Device.cpu,
    progress: ProgressOption = None,
    tile: Annotated[
        int | None,
        typer.Option(help="LR tile side for large images (default ~1024 output px; 0: never tile)"),
    ] = None,
) -> None:
    """Restore images with a checkpoint or a compiled file (`nmrestore compile`); writes PNGs named after
    the inputs (never over an input)."""
    from nmrestore.cli.evaluation import infer_images
    from nmrestore.runtime import is_compiled

    if checkpoint.is_file() and is_compiled(checkpoint):  # the engine as saved: no --sparse-engine needed
        from nmrestore.cli.compiled import infer_compiled

        for written in infer_compiled(
            checkpoint, inputs, out, adaptive, task, allow_large, tile, device.value, _show_progress(progress)
        ):
            typer.echo(str(written))
        return
    for written in infer_images(
        checkpoint,
        inputs,
        out,
        adaptive,
        patch,
        stride,
        task=task,
        sparse_engine=sparse_engine,
        allow_large=allow_large,
        tile=tile,
        device=device.value,
        progress=_show_progress(progress),
    ):
        typer.echo(str(written))


@app.command()
@clean_errors
def speed(
    model: Annotated[
        str | None, typer.Argument(help="a registered model name (see `nmrestore models`); not needed with --checkpoint")
    ] = None,
    scale: Annotated[int, typer.Option(help="SR scale (1 for denoising/deblurring nets)")] = 2,
    sparsity: Annotated[
        str | None, typer.Option(help="uniform N:M magnitude masks on the fresh model, e.g. 4:32")
    ] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(help="time this checkpoint's model instead (any method, packed or not, or a compiled file)"),
    ] = None,
    input: Annotated[str, typer.Option(help="LR input WIDTHxHEIGHT")] = "320x180",
    threads: Annotated[int | None, typer.Option(help="intra-op threads (default: torch's)")] = None,
    repeats: Annotated[int, typer.Option(help="timed runs of each model, interleaved; medians")] = 5,
    route: Annotated[int | None, typer.Option(help="route to time (ClassPruning/PNG); default the active one")] = None,
    tactic: Annotated[Tactic, typer.Option(help="auto (time per layer), sparse or dense")] = Tactic.auto,
    tactic_cache: Annotated[Path | None, typer.Option(help="JSON file of per-layer timings to reuse")] = None,
    precision: Annotated[
        Precision,
        typer.Option(
            help="f32; bf16 (convs may also run in bf16, timed per layer); fp16 (the sparse kernel may also "
            "run in fp16, on AVX512-FP16); auto (every 16-bit form the CPU has)"
        ),
    ] = Precision.f32,
    vs: Annotated[
        str | None,
        typer.Option(
            "--vs",
            help="also time deployment runtimes on the same model and input: onnxruntime, openvino "
            "(comma-separated) or all (missing ones skipped)",
        ),
    ] = None,
    dense_runtime: Annotated[
        str,
        typer.Option(
            help="none, or openvino: the engine also times the whole dense model on OpenVINO (f32, or its "
            "default precision for a bf16 or fp16 engine) and runs it there when faster"
        ),
    ] = "none",
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
    allow_large: AllowLarge = False,
) -> None:
    """Dense PyTorch vs the N:M sparse CPU engine (and, with --vs, ONNX Runtime and OpenVINO): latencies,
    speed-ups and each layer's choice."""
    from pydantic import ValidationError

    from nmrestore.cli.speed import run_speed
    from nmrestore.runtime import EngineConfig

    _setup_logging(verbose)
    size = _parse_size(input)
    assert size is not None
    if dense_runtime not in ("none", "openvino"):
        raise NMRestoreError(f"--dense-runtime must be none or openvino, got {dense_runtime!r}")
    if dense_runtime != "none" and tactic.value != "auto":
        raise NMRestoreError("--dense-runtime is a timed choice: it needs --tactic auto")
    try:
        config = EngineConfig(
            tactic=tactic.value,  # type: ignore[arg-type]
            cache_file=tactic_cache,
            precision=precision.value,  # type: ignore[arg-type]
            dense_runtime=dense_runtime,  # type: ignore[arg-type]
        )
    except ValidationError:
        raise NMRestoreError(f"--tactic must be auto, sparse or dense, got {tactic!r}") from None
    try:
        report = run_speed(
            model,
            scale,
            sparsity,
            checkpoint,
            size,
            threads,
            repeats,
            route,
            config,
            allow_large=allow_large,
            vs=vs,
        )
    except RuntimeError as exc:
        raise _too_small(model or str(checkpoint), size, exc) from None
    if json_out:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.table())


@app.command("compile")
@clean_errors
def compile_(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint (or a run folder) or a packed file")],
    out: Annotated[
        Path | None, typer.Option(help="output file (default: beside the checkpoint, NAME.nmc.safetensors)")
    ] = None,
    inputs: Annotated[
        list[str] | None,
        typer.Option("--input", "--shape", help="LR input WIDTHxHEIGHT to decide the tactics on (repeatable)"),
    ] = None,
    tactic: Annotated[Tactic, typer.Option(help="auto (time per layer), sparse or dense")] = Tactic.auto,
    precision: Annotated[
        Precision,
        typer.Option(help="f32; bf16 or fp16 (convs may also run in 16 bits, timed per layer); auto (every 16-bit form the CPU has)"),
    ] = Precision.f32,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="print each layer's tactic choice")] = False,
    allow_large: AllowLarge = False,
) -> None:
    """Save a checkpoint's model compiled for the sparse CPU engine (packed weights + tactic decisions);
    `infer` and nmrestore.load run the file without re-packing, and without re-timing the given sizes."""
    from nmrestore.cli.compiled import compile_checkpoint
    from nmrestore.runtime import EngineConfig, format_decisions

    _setup_logging(verbose)
    sizes = [size for size in (_parse_size(text) for text in inputs or []) if size is not None]
    config = EngineConfig(tactic=tactic.value, precision=precision.value)  # type: ignore[arg-type]
    report = compile_checkpoint(checkpoint, out, sizes, config, allow_large=allow_large)
    if verbose and report.decisions:
        typer.echo(format_decisions(report.decisions))
    typer.echo(report.summary())


@app.command()
@clean_errors
def demo(
    out: Annotated[Path, typer.Option(help="report folder")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="a much shorter run (tests, smoke checks)")] = False,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
) -> None:
    """The main job: train a small EDSR x2 on the built-in photos, sparsify it, evaluate, report."""
    from nmrestore.cli.demo import run_demo

    report = run_demo(out, quick=quick, show_progress=progress)
    typer.echo(report.read_text())
    typer.echo(f"report written to {report}")


@app.command()
@clean_errors
def bench(
    quick: Annotated[bool, typer.Option(help="the smoke-sized preset (minutes, not an hour)")] = False,
    json_stdout: Annotated[bool, typer.Option("--json", help="print rows, config and checks as JSON (only)")] = False,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="also write rows, config and checks as JSON")] = None,
    out: Annotated[Path, typer.Option(help="folder for the Markdown table, plot and runs")] = Path("runs/bench"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="a setting, e.g. --set finetune_steps=50")] = None,
    progress: Annotated[bool, typer.Option(help="show training progress bars")] = False,
) -> None:
    """Benchmark every method against dense and bicubic on the built-in photos (protocol: docs/ARCHITECTURE.md)."""
    from nmrestore.bench import config_from_overrides, format_table, run_benchmark, write_json, write_report
    from nmrestore.bench.config import copy_config
    from nmrestore.bench.report import json_payload

    config = config_from_overrides(quick, set_ or [])
    config = copy_config(config, show_progress=progress, work_dir=config.work_dir or out / "runs")
    notes: list[str] = []
    rows = run_benchmark(config, notes, echo=lambda line: typer.echo(line, err=True))
    say = (lambda line: typer.echo(line, err=True)) if json_stdout else typer.echo  # --json: stdout is JSON
    say(format_table(rows))
    for note in notes:
        say(f"note: {note}")
    command = "nmrestore " + " ".join(sys.argv[1:])
    page = write_report(rows, config, out, notes, command=command)
    say(f"report written to {page}")
    if json_out is not None:
        write_json(rows, json_out, config, notes, command=command)
        say(f"rows written to {json_out}")
    if json_stdout:
        typer.echo(json.dumps(json_payload(rows, config, notes, command), default=str))


@app.command("export")
@clean_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="a .safetensors checkpoint, a run folder or a packed file")],
    fmt: Annotated[
        ExportFormat, typer.Option("--format", help="packed (kept values + indices) or onnx")
    ] = ExportFormat.packed,
    out: Annotated[Path | None, typer.Option(help="output file (default: beside the checkpoint)")] = None,
    route: Annotated[int | None, typer.Option(help="onnx: the route to export (default: the active one)")] = None,
    task: Annotated[str | None, typer.Option(help="onnx: the task of a multi-task model, e.g. x3")] = None,
    opset: Annotated[int, typer.Option(help="onnx: opset version (17 or newer)")] = 18,
    allow_large: AllowLarge = False,
) -> None:
    """Write a deployable file: a packed checkpoint (every route) or ONNX (one route, dense-with-zeros)."""
    from nmrestore.export import export_checkpoint

    report = export_checkpoint(checkpoint, fmt.value, out, route, task, opset, allow_large=allow_large)
    typer.echo(report.summary())


@app.command("recipes")
@clean_errors
def recipes() -> None:
    """List the built-in recipes (`nmrestore train NAME` runs one), each with its first comment line."""
    from nmrestore.recipes.schema import BUILTIN_DIR, builtin_recipes

    for name in builtin_recipes():
        lines = (BUILTIN_DIR / f"{name}.yaml").read_text().splitlines()
        about = next((line.lstrip("# ").strip() for line in lines if line.startswith("#")), "")
        typer.echo(f"{name:<40} {about[:90]}")


def _add_subcommands() -> None:
    from nmrestore.cli.data import data_app

    app.add_typer(data_app, name="data")


_add_subcommands()


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
