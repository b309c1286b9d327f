"""Deblurring and denoising benchmark: N:M methods against dense on synthetically degraded built-in photos.

The CPU-sized counterpart of the SLS paper's DMPHN deblurring table (Oh et al., CVPR 2022), through the
harness (:func:`nmrestore.bench.run_benchmark`) with ``BenchConfig.task`` set:

* **deblur**: ``dmphn_small`` (DMPHN 1-2, 32 channels) on the built-in training photos blurred on the
  fly by random motion kernels (a new 13x13 kernel per patch), scored on the built-in test photos
  blurred once with a fixed seed per image; rows: the blurry input, dense, dense fine-tuned for the
  same steps (the control for "fine-tuning alone"), one-shot 2:4, SR-STE and SLS at 8:32 (25% of
  the prunable MACs) and 2:32 (6.25%);
* **denoise**: ``edsr_small`` at scale 1, Gaussian noise sigma = 25; rows: the noisy input, dense,
  one-shot 2:4, SLS 8:32.

Every method is fine-tuned from the same cached dense model for the same number of steps; metrics
are RGB PSNR/SSIM without border crop; MACs for a 1280x720 input. The table goes to stdout and to
``docs/bench/restore.json``, from which the ``restore`` section of docs/BENCHMARKS.md (with a prose
comparison to the paper's relations) and the plots docs/bench_restore_{deblur,denoise}_psnr_macs.png
are drawn.

Run from the repository root::

    .venv/bin/python benchmarks/bench_restore.py            # about 15-25 minutes on 2 cores, 1 thread
    .venv/bin/python benchmarks/bench_restore.py --quick    # smoke run, a few minutes
    .venv/bin/python benchmarks/bench_restore.py --render   # redraw section and plots from the JSON
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import in_memory, load_results, publish, results_path, save_results  # noqa: E402
from nmrestore.bench.config import BenchConfig, Row  # noqa: E402
from nmrestore.bench.harness import check_rows, run_benchmark  # noqa: E402
from nmrestore.bench.report import (  # noqa: E402
    describe,
    format_table,
    markdown_table,
    plot_psnr_macs,
    plot_title,
    write_json,
)
from nmrestore.recipes.schema import BlurSpec  # noqa: E402

DOCS = ROOT / "docs"
SECTION = "restore"

#: (methods, budgets) of each harness call: the harness runs every method at every budget, so the
#: rows asked for (one-shot only at 2:4; SR-STE and SLS only at M = 32) take one call per group.
DEBLUR_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("dense_ft", "oneshot"), ("2:4",)),
    (("srste", "sls"), ("8:32", "2:32")),
)
DENOISE_GROUPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("oneshot",), ("2:4",)),
    (("sls",), ("8:32",)),
)

#: The paper's DMPHN/GoPro figures (Oh et al., CVPR 2022), for the prose only: never mixed into our table.
PAPER = {
    "dense": 31.22,
    "oneshot 2:4": 31.43,
    "sls 25%": 31.26,
    "srste 25%": 30.63,
    "sls 7%": 30.04,
    "srste 7%": 28.60,
}


def configs(quick: bool, threads: int) -> dict[str, BenchConfig]:
    """The deblur and denoise settings (CPU-sized; ``quick`` for a smoke run).

    Deblurring learns slowly (a new random kernel per patch): larger patches and a moderate lr;
    denoising converges within a few hundred steps at patch 32.
    """
    common: dict[str, Any] = {
        "batch_size": 8,
        "threads": threads,
        "device": "cpu",
        "timing_rounds": 3 if quick else 5,
        "timing_warmup": 1,
        "finetune_lr": 1e-4,
        "quick": quick,
    }
    if quick:
        deblur = {"dense_steps": 20, "finetune_steps": 6, "max_test_images": 1}
        denoise = {"dense_steps": 20, "finetune_steps": 6, "max_test_images": 1}
    else:
        deblur = {"dense_steps": 800, "finetune_steps": 200}
        denoise = {"dense_steps": 600, "finetune_steps": 200}
    return {
        "deblur": BenchConfig(
            task="deblur",
            model="dmphn_small",
            scale=1,
            blur=BlurSpec(kernel_size=13),
            patch_size=48,
            dense_lr=5e-4,
            **deblur,
            **common,
        ),
        "denoise": BenchConfig(
            task="denoise",
            model="edsr_small",
            scale=1,
            sigma=25.0,
            patch_size=32,
            dense_lr=1e-3,
            **denoise,
            **common,
        ),
    }


def run_task(config: BenchConfig, groups: Any, work_dir: Path, notes: list[str]) -> list[Row]:
    """The harness once per (methods, budgets) group; input and dense rows kept from the first call."""
    rows: list[Row] = []
    for i, (methods, budgets) in enumerate(groups):
        group = config.model_copy(
            update={"methods": methods, "budgets": budgets, "work_dir": work_dir / f"g{i}"}
        )
        made = run_benchmark(group, notes, echo=lambda line: print(line, file=sys.stderr, flush=True))
        rows.extend(made if i == 0 else [r for r in made if r["method"] not in ("input", "dense")])
    return rows


def _find(rows: list[Row], method: str, budget: str | float | None = None) -> Row | None:
    return next(
        (r for r in rows if r["method"] == method and (budget is None or r["budget"] == budget)), None
    )


#: PSNR differences below this are called ties: one seed, three test photos and a few hundred CPU
#: steps do not resolve them (the dense and dense_ft rows alone differ by a few hundredths of a dB).
TIE_DB = 0.02


def _relation(gap: float) -> str:
    return "ties with" if abs(gap) < TIE_DB else "beats" if gap > 0 else "trails"


def _versus(a: Row | None, b: Row | None, name_a: str, name_b: str) -> str:
    if a is None or b is None:
        return f"{name_a} or {name_b} missing"
    gap = a["psnr"] - b["psnr"]
    return (
        f"{name_a} {a['psnr']:.3f} dB {_relation(gap)} {name_b} {b['psnr']:.3f} dB ({gap:+.3f} dB) at "
        f"{100 * a['prunable_macs_fraction']:.2f}% / {100 * b['prunable_macs_fraction']:.2f}% of the prunable MACs"
    )


def comparison(deblur: list[Row], denoise: list[Row]) -> str:
    """Prose: our measured relations next to the paper's DMPHN/GoPro ones. Only measured numbers."""
    dense, inp, dense_ft = _find(deblur, "dense"), _find(deblur, "input"), _find(deblur, "dense_ft")
    one24 = _find(deblur, "oneshot", "2:4")
    lines = [
        "**Against the paper's deblurring table** (DMPHN on GoPro, Oh et al., CVPR 2022; GPU, 3000 epochs):",
        "",
    ]
    if dense and inp:
        lines.append(
            f"- Dense `dmphn_small` restores only {dense['psnr'] - inp['psnr']:+.3f} dB over the blurry input "
            f"({inp['psnr']:.3f} -> {dense['psnr']:.3f} dB) in {dense['note'].split(',')[0]}: deblurring random "
            "kernels is far from learned in CPU minutes, so every gap below is small. The paper's dense DMPHN "
            f"reaches {PAPER['dense']} dB on GoPro; absolute numbers are not comparable (synthetic kernels, 3 test "
            "photos, one seed)."
        )
    if dense and one24:
        gap = one24["psnr"] - dense["psnr"]
        text = (
            f"- One-shot 2:4 vs dense: {gap:+.3f} dB (paper: {PAPER['oneshot 2:4'] - PAPER['dense']:+.2f} dB; "
            f"2:4 'costs almost nothing'): {'reproduced' if gap >= -0.1 else 'not reproduced'} within 0.1 dB."
        )
        if dense_ft:
            ft_gap = one24["psnr"] - dense_ft["psnr"]
            text += (
                f" Against the dense model fine-tuned for the same {one24['finetune_steps']} steps (dense_ft, "
                f"{dense_ft['psnr']:.3f} dB) one-shot 2:4 {_relation(ft_gap)} it ({ft_gap:+.3f} dB): its gain over "
                "dense is the extra training, as the paper's 2:4 > dense may also be."
            )
        lines.append(text)
    for budget, key, label in (("8:32", "25%", "about 25%"), ("2:32", "7%", "about 7%")):
        sls, srste = _find(deblur, "sls", budget), _find(deblur, "srste", budget)
        paper = PAPER[f"sls {key}"] - PAPER[f"srste {key}"]
        measured = _versus(sls, srste, "SLS", "SR-STE")
        below = ""
        if sls is None or srste is None:
            verdict = "cannot be judged"
        else:
            gap = sls["psnr"] - srste["psnr"]
            verdict = (
                "reproduced"
                if gap >= TIE_DB
                else "not resolved (a tie)"
                if gap > -TIE_DB
                else "not reproduced"
            )
            if sls["prunable_macs_fraction"] < srste["prunable_macs_fraction"] - 1e-3:
                below = "; SLS ends below its budget, so it is compared at fewer MACs"
        lines.append(
            f"- {label} of the MACs ({budget}): {measured}; paper: SLS {PAPER[f'sls {key}']} vs SR-STE "
            f"{PAPER[f'srste {key}']} dB ({paper:+.2f} dB). Relation (learned layer-wise N beats uniform N:M at "
            f"equal MACs) {verdict} here{below}."
        )
    gaps = []
    for budget in ("8:32", "2:32"):
        sls, srste = _find(deblur, "sls", budget), _find(deblur, "srste", budget)
        if sls and srste:
            gaps.append(sls["psnr"] - srste["psnr"])
    if len(gaps) == 2:
        grows = gaps[1] - gaps[0] >= TIE_DB
        lines.append(
            f"- The SLS - SR-STE gap goes from {gaps[0]:+.3f} dB (8:32) to {gaps[1]:+.3f} dB (2:32): it "
            f"{'grows' if grows else 'does not grow'} as the budget shrinks (paper: +0.63 -> +1.44 dB)."
        )
    for budget in ("8:32", "2:32"):
        sls, srste = _find(deblur, "sls", budget), _find(deblur, "srste", budget)
        if sls and srste:
            more = sls["params_nonzero"] > srste["params_nonzero"]
            lines.append(
                f"- Non-zero parameters at {budget}: SLS {sls['params_nonzero']:,} vs SR-STE {srste['params_nonzero']:,} "
                f"({'SLS keeps more at fewer MACs, as in the paper: it prunes the layers that are expensive in MACs' if more else 'SLS does not keep more here'})."
            )
    d_dense, d_inp = _find(denoise, "dense"), _find(denoise, "input")
    d24, dsls = _find(denoise, "oneshot", "2:4"), _find(denoise, "sls", "8:32")
    if d_dense and d_inp:
        parts = [
            f"dense {d_dense['psnr']:.3f} dB ({d_dense['psnr'] - d_inp['psnr']:+.3f} dB over the noisy input)"
        ]
        if d24:
            parts.append(f"one-shot 2:4 {d24['psnr']:.3f} dB ({d24['psnr'] - d_dense['psnr']:+.3f} dB)")
        if dsls:
            parts.append(
                f"SLS 8:32 {dsls['psnr']:.3f} dB ({dsls['psnr'] - d_dense['psnr']:+.3f} dB at "
                f"{100 * dsls['macs_fraction']:.1f}% of the dense MACs)"
            )
        lines.append(f"- Denoising, sigma 25 (no paper figures to compare with): {'; '.join(parts)}.")
    return "\n".join(lines)


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved rows (``docs/bench/restore.json``)."""
    results = {task: part["rows"] for task, part in payload["tasks"].items()}
    parts = []
    for task, rows in results.items():
        config = BenchConfig(**payload["tasks"][task]["config"])
        parts += [f"### {task}", "", describe(config), "", markdown_table(rows), ""]
        checks = check_rows(rows)
        if checks:
            parts += ["Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {text}" for text, ok in checks] + [""]
        parts += [f"![PSNR against MACs, {task}]({_plot_path(task).name})", ""]
    parts += [comparison(results.get("deblur", []), results.get("denoise", [])), ""]
    notes = payload["notes"]
    if notes:
        parts += ["Notes:", ""] + [f"- {note}" for note in dict.fromkeys(notes)] + [""]
    parts.append(f"Wall time of the whole script: {payload['seconds'] / 60:.1f} min.")
    title = "Deblurring and denoising: N:M methods against dense" + (" (quick)" if payload["quick"] else "")
    return title, "\n".join(parts)


def _plot_path(task: str) -> Path:
    return DOCS / f"bench_restore_{task}_psnr_macs.png"


def draw(payload: dict[str, Any]) -> None:
    """The PSNR-against-MACs plot of each task, from the same rows."""
    for task, part in payload["tasks"].items():
        plot_psnr_macs(part["rows"], _plot_path(task), plot_title(BenchConfig(**part["config"])))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--only", choices=["deblur", "denoise"], default=None)
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows as JSON (one file per task)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=ROOT / "runs" / "bench-restore", help="fine-tune runs"
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from docs/bench/restore.json"
    )
    args = parser.parse_args(argv)
    key = SECTION + ("-quick" if args.quick else "")
    if args.render:
        draw(load_results(key))
        publish(key, render)
        return 0

    started = time.perf_counter()
    chosen = configs(args.quick, args.threads)
    groups = {"deblur": DEBLUR_GROUPS, "denoise": DENOISE_GROUPS}
    results: dict[str, list[Row]] = {}
    notes: list[str] = []
    for task, config in chosen.items():
        if args.only and task != args.only:
            continue
        results[task] = run_task(config, groups[task], args.work_dir / task, notes)
        print(f"\n{task} ({config.model}):")
        print(format_table(results[task]))
        if args.json:
            write_json(results[task], args.json.with_name(f"{args.json.stem}_{task}.json"), config, notes)
    seconds = time.perf_counter() - started
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    data = {
        "quick": args.quick,
        "tasks": {
            task: {"config": chosen[task].model_dump(mode="json"), "rows": rows}
            for task, rows in results.items()
        },
        "notes": notes,
        "seconds": seconds,
    }
    payload = in_memory(data) if args.no_write else save_results(key, data)
    print(f"\n{render(key, payload)[1]}")
    if not args.no_write:
        draw(payload)
        publish(key, render)
        print(f"{results_path(key).relative_to(ROOT)} and docs/BENCHMARKS.md section {key!r} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
