"""SR benchmark (the protocol of docs/ARCHITECTURE.md, section 6): every method against dense and bicubic on the built-in photos.

A thin script over :func:`nmrestore.bench.run_benchmark`: the dense model is trained once and cached
(``~/.cache/nmrestore/bench/<recipe hash>``, or ``$NMRESTORE_BENCH_CACHE``), every method is
fine-tuned from it for the same number of steps, and the table goes to stdout, to
``docs/bench/<key>.json`` and to the section rendered from it in ``docs/BENCHMARKS.md`` ("sr" for the
full x2 run, "sr-x4" for x4, "-quick" for ``--quick``), with a PSNR-against-MACs plot under ``docs/``.
The photo study (``bench_photos.py``) replaced these sections as the method comparison; this script
remains the quick protocol check.

Run from the repository root on an otherwise idle machine::

    .venv/bin/python benchmarks/bench_sr.py --quick             # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/bench_sr.py                      # edsr_small x2, < 60 minutes
    .venv/bin/python benchmarks/bench_sr.py --scale 4
    .venv/bin/python benchmarks/bench_sr.py --set finetune_steps=400 --json runs/bench_sr.json --no-write
    .venv/bin/python benchmarks/bench_sr.py --render             # redraw section "sr" from its JSON

``--set key=value`` changes any :class:`~nmrestore.bench.BenchConfig` field.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from _report import load_results, publish, results_path, save_results  # noqa: E402
from nmrestore.bench.config import BenchConfig, config_from_overrides  # noqa: E402
from nmrestore.bench.harness import run_benchmark  # noqa: E402
from nmrestore.bench.report import format_table, plot_psnr_macs, plot_title, report_body, write_json  # noqa: E402

DOCS = ROOT / "docs"


def section_key(scale: int, quick: bool) -> str:
    """``sr`` for the main (x2, full) run; scale and quick runs get their own sections."""
    return "sr" + ("" if scale == 2 else f"-x{scale}") + ("-quick" if quick else "")


def _plot_path(key: str) -> Path:
    return DOCS / f"bench_{key.replace('-', '_')}_psnr_macs.png"


def render(key: str, payload: dict[str, Any]) -> tuple[str, str]:
    """The section from the saved rows (``docs/bench/<key>.json``)."""
    config = BenchConfig(**payload["config"])
    title = f"SR: every method against dense, {config.model} x{config.scale}" + (
        " (quick)" if config.quick else ""
    )
    return title, report_body(payload["rows"], config, payload["notes"], _plot_path(key).name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the smoke-sized preset")
    parser.add_argument("--model", default=None, help="model name (default edsr_small)")
    parser.add_argument("--scale", type=int, default=None, help="SR scale (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--set", action="append", default=[], help="a BenchConfig field, e.g. finetune_steps=50"
    )
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench-sr", help="fine-tune runs")
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/")
    parser.add_argument(
        "--render", action="store_true", help="only redraw the section from its docs/bench JSON"
    )
    args = parser.parse_args(argv)

    overrides = list(args.set)
    if args.model:
        overrides.append(f"model={args.model}")
    if args.scale:
        overrides.append(f"scale={args.scale}")
    config = config_from_overrides(args.quick, overrides)
    key = section_key(config.scale, config.quick)
    if args.render:
        payload = load_results(key)
        plot_psnr_macs(payload["rows"], _plot_path(key), plot_title(BenchConfig(**payload["config"])))
        publish(key, render)
        return 0
    if config.work_dir is None:
        config = config.model_copy(update={"work_dir": args.work_dir / f"x{config.scale}"})
    notes: list[str] = []
    rows = run_benchmark(config, notes, echo=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(rows))
    for note in notes:
        print(f"note: {note}")
    if args.json:
        write_json(rows, args.json, config, notes)
        print(f"rows written to {args.json}")
    if not args.no_write:
        save_results(key, {"config": config.model_dump(mode="json"), "notes": notes, "rows": rows})
        plot = plot_psnr_macs(rows, _plot_path(key), plot_title(config))
        publish(key, render)
        print(f"{results_path(key).relative_to(ROOT)}, section {key!r} and {plot.relative_to(ROOT)} written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
