"""SLS (layer-wise N:M under a MAC budget) against one-shot and SR-STE at 8:32, 4:32, 2:32 (issue #5).

The paper's relation: at 25% of the MACs and below, SLS's learned layer-wise N beats uniform N:M
(one-shot, SR-STE) at equal MACs, and the gap grows as the budget shrinks. This script measures
whether that holds at CPU size and what explains the outcome. Every fine-tune goes through the
benchmark harness (:func:`nmrestore.bench.run_benchmark`, cached dense models, the same data and
steps for every method); rows are scored on the built-in test photos, and *nothing* is selected on
them: the SLS settings come from the harness (:func:`nmrestore.bench.sls.sls_settings`, scaled
a priori and checked on the training run only, see part ``search``).

Parts (``--only PART``, repeatable; every fine-tune's row is cached under ``runs/bench-sls/rows``
by its recipe hash, so a part interrupted or rerun costs only the rows it lacks):

* ``costs``  -- MACs per layer and per weight of the nets (no training): where can a MAC-aware
  allocation gain anything?
* ``search`` -- the SLS search alone on the *training* batches (edsr_small x2, 2:32): the
  harness's anneal schedule before and after scaling it to the run length (budget met or not,
  training L1). No test image is touched.
* ``x2``     -- edsr_small x2, 300 fine-tune steps: oneshot, srste, sls (the paper's: hard
  gradients, masks fixed after N is frozen) and sls_srste (SR-STE gradients, ranks refreshed every
  step, during the search and after N is frozen: SR-STE's training at the learned N).
* ``long``   -- the same net with 600 fine-tune steps (search 300): srste and sls_srste.
* ``x4``     -- edsr_small x4 (its second upsampler conv runs at 2x the LR resolution: 4x the MACs
  per weight of every other layer), cached 600-step dense model: srste and sls_srste.

Run from the repository root (every part uses one thread)::

    .venv/bin/python benchmarks/bench_sls.py --only search      # ~4 min (1 thread, shared machine)
    .venv/bin/python benchmarks/bench_sls.py --only x2          # ~14 min (oneshot/srste reused, below)
    .venv/bin/python benchmarks/bench_sls.py --only long        # ~18 min
    .venv/bin/python benchmarks/bench_sls.py --only x4          # ~10 min
    .venv/bin/python benchmarks/bench_sls.py                    # all parts (cached rows reused); docs 'sls'
    .venv/bin/python benchmarks/bench_sls.py --render           # redraw section 'sls' from docs/bench/sls.json

The section was removed from docs/BENCHMARKS.md when SLS's defaults moved to the published code's
(annealing on the last epoch, masks refreshed after the freeze): its rows, and the reading of them
that :func:`analysis` prints, were measured with the earlier defaults. A full run measures and
renders it again with the current code.

The uniform oneshot/srste rows of part ``x2`` are the same recipes as the ``sr`` benchmark's
(``benchmarks/bench_sr.py``): when ``runs/bench-sr/x2/<label>/recipe.yaml`` hashes to the recipe
this script would train, the row in ``runs/bench_sr_x2.json`` is reused and marked so
(``--no-reuse-sr`` retrains them).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, publish, results_path, save_results  # noqa: E402
from _sls_report import BUDGETS, METHODS, report  # noqa: E402
from nmrestore.bench.config import BenchConfig, Row, data_section, ensure_dense, recipe_digest, train_section  # noqa: E402
from nmrestore.bench.context import BenchContext, register_row_producer  # noqa: E402
from nmrestore.bench.harness import run_benchmark  # noqa: E402
from nmrestore.bench.sls import sls_settings  # noqa: E402
from nmrestore.cost import count_cost  # noqa: E402
from nmrestore.data.loader import build_train_loader  # noqa: E402
from nmrestore.engine.runner import (  # noqa: E402
    apply_sparsity,
    base_model,
    build_train_dataset,
    load_weights_from,
    seed_everything,
)
from nmrestore.engine.task import RestorationTask  # noqa: E402
from nmrestore.engine.trainer import Trainer  # noqa: E402
from nmrestore.methods.sls.controller import SLSController  # noqa: E402
from nmrestore.methods.sls.report import sls_layer_table  # noqa: E402
from nmrestore.models import create_model  # noqa: E402
from nmrestore.recipes.schema import recipe_from_dict  # noqa: E402
from nmrestore.sparsity.api import eligible_layers, parse_nm  # noqa: E402

SECTION = "sls"
TITLE = "SLS: layer-wise N:M under a MAC budget against uniform N:M (one-shot, SR-STE)"
OUT = ROOT / "runs" / "bench-sls"
ROWS = OUT / "rows"
SR_JSON = ROOT / "runs" / "bench_sr_x2.json"
SR_RUNS = ROOT / "runs" / "bench-sr" / "x2"
PARTS = ("costs", "search", "x2", "long", "x4")


# -- what each method trains -----------------------------------------------------------------------
def sparsity_for(method: str, steps: int, budget: str) -> dict[str, Any]:
    """The recipe ``sparsity`` mapping of ``method`` at ``budget`` for a ``steps``-step fine-tune."""
    n, m = parse_nm(budget)
    if method in ("oneshot", "srste"):
        return {"method": method, "n": n, "m": m}
    settings = sls_settings(steps, n / m)
    if method == "sls":  # the paper's: hard gradients, masks fixed once N is frozen
        return settings
    if method == "sls_srste":  # SR-STE's training (dense gradient + decay, refresh every step) at learned N
        return {**settings, "grad_mode": "srste", "refresh_every": 1, "refresh_after_freeze": True}
    raise ValueError(f"unknown method {method!r}")


# -- cached row producers ----------------------------------------------------------------------------
class Options:
    fresh = False
    reuse_sr = True


def _row_path(method: str, budget: str, digest: str) -> Path:
    return ROWS / f"{method}-{budget.replace(':', 'of')}-{digest}.json"


def _sls_details(row: Row, model: torch.nn.Module, controller: Any) -> None:
    if not isinstance(controller, SLSController):
        return
    row["sls_message"] = controller.message
    row["sls_projected"] = controller.projected
    row["sls_frozen_at"] = controller.frozen_at
    row["layers"] = [
        {
            "name": r["name"],
            "shape": list(r["shape"]),
            "share_of_macs": r["share_of_macs"],
            "dense_macs": r["dense_macs"],
            "n": r["n"],
            "m": r["m"],
        }
        for r in sls_layer_table(model)
    ]


def _uniform_layers(context: BenchContext, budget: str) -> list[dict[str, Any]]:
    n, m = parse_nm(budget)
    names = set(context.nm_prunable_names(m))
    return [
        {
            "name": layer.name,
            "shape": list(layer.shape),
            "share_of_macs": layer.dense_macs / context.dense_cost.dense_macs,
            "dense_macs": layer.dense_macs,
            "n": n if layer.name in names else None,
            "m": m if layer.name in names else None,
        }
        for layer in context.dense_cost.layers
    ]


def _reused_sr_row(method: str, budget: str, digest: str) -> Row | None:
    """The ``sr`` benchmark's row for the same recipe (same hash), if it is on disk."""
    if not Options.reuse_sr or method not in ("oneshot", "srste") or not SR_JSON.is_file():
        return None
    recipe_file = SR_RUNS / f"{method}-{budget.replace(':', 'of')}" / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    saved = recipe_from_dict(yaml.safe_load(recipe_file.read_text()), str(recipe_file))
    if recipe_digest(saved) != digest:
        return None
    payload = json.loads(SR_JSON.read_text())
    for row in payload["rows"]:
        if row["method"] == method and row["budget"] == budget:
            row = dict(row)
            row["note"] = f"same recipe (hash {digest}) as {SR_JSON.relative_to(ROOT)}, reused"
            row["seconds"] = None
            return row
    return None


def _producer(method: str) -> Callable[[BenchContext, str | None], Row | None]:
    def produce(context: BenchContext, budget: str | None) -> Row | None:
        assert budget is not None
        steps = context.config.finetune_steps
        sparsity = sparsity_for(method, steps, budget)
        label = f"{method}-{budget}"
        digest = recipe_digest(context.finetune_recipe(label, sparsity))
        path = _row_path(method, budget, digest)
        if path.is_file() and not Options.fresh:
            context.say(f"{label}: cached row {path.relative_to(ROOT)}")
            return json.loads(path.read_text())["row"]
        row = None if Options.fresh else _reused_sr_row(method, budget, digest)
        if row is not None:
            context.say(f"{label}: reusing the sr benchmark's row (same recipe hash {digest})")
            row["layers"] = _uniform_layers(context, budget)
        else:
            started = time.perf_counter()
            result = context.finetune(label, sparsity)
            assert result.final is not None
            row = context.row(method, budget, result.model, result.final, timed=False)
            row["finetune_steps"] = steps
            row["seconds"] = time.perf_counter() - started
            row["layers"] = _uniform_layers(context, budget)
            _sls_details(row, result.model, result.controller)
            row["note"] = row.get("sls_message", "")
        row["recipe_digest"] = digest
        row["sparsity"] = sparsity
        ROWS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        path.write_text(json.dumps({"row": row, "written": stamp}, indent=2, default=str))
        return row

    return produce


for _method in METHODS:
    register_row_producer(_method, replace=True)(_producer(_method))


def bench_config(part: str) -> BenchConfig:
    common: dict[str, Any] = {
        "threads": 1,
        "timing_rounds": 1,  # step times are not part of this comparison
        "timing_warmup": 0,
        "work_dir": OUT / part,
    }
    if part == "x2":
        return BenchConfig(methods=METHODS, budgets=BUDGETS, **common)
    if part == "long":
        return BenchConfig(
            finetune_steps=600, methods=("srste", "sls_srste"), budgets=("4:32", "2:32"), **common
        )
    if part == "x4":
        # the 600-step x4 dense model is the one bench_png.py trains (cached); x4 steps cost ~3x x2's
        return BenchConfig(
            scale=4, dense_steps=600, methods=("srste", "sls_srste"), budgets=("2:32",), **common
        )
    raise ValueError(part)


def run_part(part: str) -> dict[str, Any]:
    config = bench_config(part)
    notes: list[str] = []
    started = time.perf_counter()
    rows = run_benchmark(config, notes, echo=lambda line: print(line, file=sys.stderr, flush=True))
    return {
        "config": config.model_dump(mode="json"),
        "rows": rows,
        "notes": notes,
        "seconds": time.perf_counter() - started,
    }


# -- part costs --------------------------------------------------------------------------------------
def layer_costs(model_name: str, scale: int, m: int = 32) -> list[dict[str, Any]]:
    model = create_model(model_name, scale=scale)
    report = count_cost(model)
    layers, _ = eligible_layers(model, m)
    prunable = {layer.name for layer in layers}
    total = sum(layer.dense_macs for layer in report.layers if layer.name in prunable)
    return [
        {
            "name": layer.name,
            "shape": "x".join(str(s) for s in layer.shape),
            "prunable": layer.name in prunable,
            "share": layer.dense_macs / total if layer.name in prunable else None,
            "macs_per_weight": layer.dense_macs / layer.weight_params,
        }
        for layer in report.layers
    ]


def costs_part() -> dict[str, Any]:
    nets = [("edsr_small", 2), ("carn_small", 2), ("rfdn_small", 2), ("edsr_small", 4)]
    out = []
    for name, scale in nets:
        rows = [r for r in layer_costs(name, scale) if r["prunable"]]
        per_weight = sorted({round(r["macs_per_weight"]) for r in rows})
        shares = [r["share"] for r in rows]
        out.append(
            {
                "model": f"{name} x{scale}",
                "layers": len(rows),
                "share_min": min(shares),
                "share_max": max(shares),
                "macs_per_weight": per_weight,
                "top": max(rows, key=lambda r: r["share"])["name"],
            }
        )
    return {"nets": out, "x2": layer_costs("edsr_small", 2), "x4": layer_costs("edsr_small", 4)}


# -- part search (training batches only) --------------------------------------------------------------
class _SearchDone(Exception):
    pass


class _Tracer:
    """Wraps the SLS controller: records the cost fraction and coef after every step, stops the
    run when N is frozen (no fine-tuning, no validation: this looks at training batches only)."""

    def __init__(self, controller: SLSController) -> None:
        self.inner = controller
        self.trace: list[tuple[int, float, float]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def regularizer(self) -> dict[str, torch.Tensor]:
        return self.inner.regularizer()

    def step(self, step: int) -> None:
        self.inner.step(step)
        self.trace.append((step, self.inner.fraction(), self.inner.coef))
        if self.inner.frozen:
            raise _SearchDone

    def finalize(self) -> None:
        pass


def search_trace(config: BenchConfig, budget: str, sparsity: dict[str, Any]) -> dict[str, Any]:
    """The SLS search from the cached dense model, on the harness's training batches, until N freezes."""
    dense = ensure_dense(config)
    steps = config.finetune_steps
    train = {**train_section(config, steps, config.finetune_lr, [0.67]), "init_from": str(dense.path)}
    recipe = recipe_from_dict(
        {
            "name": f"sls-search-{budget}",
            "seed": config.seed,
            "model": {"name": config.model, "scale": config.scale, "kwargs": dict(config.model_kwargs)},
            "data": data_section(config),
            "train": train,
            "sparsity": sparsity,
        },
        "sls search trace",
    )
    torch.set_num_threads(config.threads or torch.get_num_threads())
    seed_everything(recipe.seed)
    model = base_model(recipe)
    load_weights_from(model, recipe, Path(train["init_from"]))
    report = apply_sparsity(model, recipe)
    assert report is not None and isinstance(report.controller, SLSController)
    tracer = _Tracer(report.controller)
    loader = build_train_loader(
        build_train_dataset(recipe),
        recipe.data.train.batch_size,
        recipe.data.train.num_workers,
        recipe.seed,
        distributed=False,
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            model,
            RestorationTask(recipe.train.loss),
            loader,
            recipe.train,
            Path(tmp),
            {},
            controller=tracer,  # type: ignore[arg-type]
            validate=None,
            show_progress=False,
        )
        with contextlib.suppress(_SearchDone):
            trainer.fit()
        l1 = [r["l1"] for r in trainer.state.history if "l1" in r]
    controller = tracer.inner
    above = re.search(r"above budget \(([\d.]+) >", controller.message)
    return {
        "budget": budget,
        "sparsity": sparsity,
        "met_at": None if controller.projected else controller.frozen_at,
        "fraction_at_deadline": float(above.group(1)) if above else None,
        "projected": controller.projected,
        "final_fraction": controller.fraction(),
        "coef": controller.coef,
        "ns": controller.ns(),
        "message": controller.message,
        "train_l1_last_logged": l1[-1] if l1 else None,
        "trace": tracer.trace[:: max(1, len(tracer.trace) // 15)] + tracer.trace[-1:],
        "seconds": time.perf_counter() - started,
    }


def search_part() -> dict[str, Any]:
    config = BenchConfig(threads=1)
    steps = config.finetune_steps
    old = {"anneal_interval": max(1, steps // 24), "anneal_threshold": 0.2}  # the harness before issue #5
    runs = []
    for label, change in (("paper constants (interval 1/24 run, threshold 0.2)", old), ("harness now", {})):
        for budget in ("4:32", "2:32"):
            sparsity = {**sparsity_for("sls", steps, budget), **change}
            key = hashlib.sha256(
                json.dumps([ensure_dense(config).digest, steps, sparsity], sort_keys=True).encode()
            ).hexdigest()[:16]
            path = ROWS / f"search-{budget.replace(':', 'of')}-{key}.json"
            if path.is_file() and not Options.fresh:
                result = json.loads(path.read_text())
            else:
                print(f"search trace {label} {budget}", file=sys.stderr, flush=True)
                result = search_trace(config, budget, sparsity)
                ROWS.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=2))
            runs.append({"settings": label, **result})
    return {"runs": runs}


# -- report -------------------------------------------------------------------------------------------
def old_anneal_rows() -> list[Row]:
    """The ``sr`` run's SLS rows (the harness before the anneal rescaling), renamed, if on disk."""
    if not SR_JSON.is_file():
        return []
    rows = []
    for row in json.loads(SR_JSON.read_text())["rows"]:
        if row["method"] == "sls" and row["budget"] in BUDGETS:
            row = dict(row)
            row["method"] = "sls_old_anneal"
            row["sls_projected"] = "projected" in str(row.get("note", ""))
            row["sls_message"] = row.get("note", "")
            match = re.search(r"budget met at step (\d+)", str(row.get("note", "")))
            row["sls_frozen_at"] = int(match.group(1)) if match else None
            rows.append(row)
    return rows


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved parts (``docs/bench/sls.json``)."""
    return TITLE, report(payload["parts"], payload["wall_s"], payload["old_anneal_rows"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=PARTS, help="run only these parts")
    parser.add_argument("--fresh", action="store_true", help="retrain every row (ignore the row cache)")
    parser.add_argument(
        "--no-reuse-sr", action="store_true", help="retrain the oneshot/srste rows of part x2"
    )
    parser.add_argument("--json", type=Path, default=OUT / "bench_sls.json", help="all rows and traces")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from docs/bench/sls.json"
    )
    args = parser.parse_args(argv)
    if args.render:
        publish(SECTION, render)
        return 0
    Options.fresh = args.fresh
    Options.reuse_sr = not args.no_reuse_sr
    wanted = tuple(args.only or PARTS)
    parts: dict[str, Any] = {}
    wall: dict[str, float] = {}
    for part in wanted:
        started = time.perf_counter()
        if part == "costs":
            parts[part] = costs_part()
        elif part == "search":
            parts[part] = search_part()
        else:
            parts[part] = run_part(part)
        wall[part] = time.perf_counter() - started
        print(f"part {part}: {wall[part] / 60:.1f} min", file=sys.stderr, flush=True)
    trained = [
        r.get("seconds")
        for p in parts.values()
        if isinstance(p, dict) and "rows" in p
        for r in p["rows"]
        if r.get("seconds")
    ]
    if "search" in parts:
        trained += [run["seconds"] for run in parts["search"]["runs"]]
    if trained:
        wall["compute of the cached rows and traces when first run"] = sum(trained)  # type: ignore[arg-type]
        print(f"median fine-tune {statistics.median(trained):.0f} s", file=sys.stderr)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"parts": parts, "wall_s": wall}, indent=2, default=str))
    complete = all(p in parts for p in PARTS)
    if complete:
        # the sr run's rows are read now: a section never reads runs/ (git-ignored) when rendered
        data = {"parts": parts, "wall_s": wall, "old_anneal_rows": old_anneal_rows()}
        payload = in_memory(data) if args.no_write else save_results(SECTION, data)
        print(render(SECTION, payload)[1])
        if not args.no_write:
            publish(SECTION, render)
            print(f"{results_path(SECTION).relative_to(ROOT)} and section 'sls' written", file=sys.stderr)
    else:
        for part in wanted:
            for row in parts[part].get("rows", []) if isinstance(parts[part], dict) else []:
                if row.get("psnr") is not None:
                    print(
                        f"{part:6s} {row['method']:10s} {row['budget']!s:6s} {row['psnr']:.3f}  {row.get('note', '')}"
                    )
        print(json.dumps({k: v for k, v in parts.items() if k in ("search",)}, indent=1, default=str)[:4000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
