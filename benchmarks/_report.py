"""Shared output for benchmark scripts: every section of docs/BENCHMARKS.md is rendered from committed JSON.

A script measures, saves what it measured (rows, notes, its command, the date and the machine) to
``docs/bench/<key>.json`` (committed) and renders its section from that file only, through its own
``render(key, payload) -> (title, body)``: a pure function of the JSON, so ``--render`` redraws a
section without computing anything and ``tests/bench/test_benchmarks_doc.py`` re-renders every
section and fails on a hand edit. Each section is delimited by HTML comments and rewritten alone,
so scripts run at different times never clobber each other's figures.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
RESULTS = ROOT / "docs" / "bench"
HEADER = "# Benchmarks\n\nEvery figure below was printed by a script in `benchmarks/`; each section says how to rerun it.\n"
_SECTION = re.compile(r"<!-- section:(?P<key>[\w.-]+) -->.*?<!-- end:(?P=key) -->", re.S)

#: ``render(key, payload) -> (title, body)``: a section from its JSON, nothing else.
Renderer = Callable[[str, dict[str, Any]], tuple[str, str]]


def machine() -> str:
    """One line describing where the figures were measured."""
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def command(argv: list[str] | None = None) -> str:
    """This run's command line, as run from the repository root (``python benchmarks/NAME.py ...``)."""
    argv = list(sys.argv if argv is None else argv)
    return "python " + " ".join([f"benchmarks/{Path(argv[0]).name}", *argv[1:]])


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def results_path(key: str) -> Path:
    """``docs/bench/<key>.json`` (dashes as underscores, as the photo study's files are named)."""
    return RESULTS / f"{key.replace('-', '_')}.json"


def save_results(key: str, data: dict[str, Any], command_line: str | None = None) -> dict[str, Any]:
    """Write ``data`` with this run's command, date and machine to :func:`results_path`; returns it as read back.

    Read back so that what is rendered now is exactly what a later ``--render`` sees (tuples become
    lists, other objects their ``str``)."""
    payload = {
        "command": command_line or command(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        **data,
    }
    path = results_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return load_results(key)


def in_memory(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as :func:`save_results` would store it, written nowhere (``--no-write`` runs)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    payload = {"command": command(), "date": stamp, "machine": machine(), **data}
    return json.loads(json.dumps(payload, default=str))  # type: ignore[no-any-return]


def load_results(key: str) -> dict[str, Any]:
    return json.loads(results_path(key).read_text())  # type: ignore[no-any-return]


def script_of(payload: dict[str, Any]) -> str:
    """The script that measured a payload (the module whose ``render`` draws its section), from its command."""
    match = re.search(r"benchmarks/(\w+)\.py", str(payload.get("command", "")))
    if match is None:
        raise ValueError(f"no benchmarks/<script>.py in the recorded command {payload.get('command')!r}")
    return match.group(1)


def section_text(key: str, title: str, body: str, payload: dict[str, Any]) -> str:
    """The whole ``<!-- section:key -->`` block: title, the recorded command/date/machine, body."""
    return (
        f"<!-- section:{key} -->\n## {title}\n\n"
        f"Command: `{payload['command']}`  \nDate: {payload['date']}  \n"
        f"Machine: {payload['machine']}\n\n{body.strip()}\n"
        f"<!-- end:{key} -->"
    )


def render_section(key: str, render: Renderer | None = None, payload: dict[str, Any] | None = None) -> str:
    """Section ``key`` drawn from its committed JSON by ``render`` (default: that of the script that measured it)."""
    payload = load_results(key) if payload is None else payload
    if render is None:
        if str(ROOT / "benchmarks") not in sys.path:
            sys.path.insert(0, str(ROOT / "benchmarks"))
        render = importlib.import_module(script_of(payload)).render
    title, body = render(key, payload)
    return section_text(key, title, body, payload)


def doc_sections(text: str) -> dict[str, str]:
    """Every section block of a BENCHMARKS.md text, by key."""
    return {match["key"]: match[0] for match in _SECTION.finditer(text)}


def publish(key: str, render: Renderer | None = None, doc: Path = DOC) -> None:
    """Replace (or append) section ``key`` of docs/BENCHMARKS.md with its rendering from ``docs/bench/<key>.json``."""
    if not results_path(key).is_file():
        raise SystemExit(
            f"{results_path(key).relative_to(ROOT)} does not exist: run the benchmark without --render"
        )
    section = render_section(key, render)
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(key)} -->.*?<!-- end:{re.escape(key)} -->", re.S)
    text = (
        pattern.sub(lambda _: section, text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section + "\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def section_main(
    section: str,
    render: Renderer,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    parser: argparse.ArgumentParser,
    argv: list[str] | None = None,
) -> int:
    """The ``main`` of a one-section benchmark: ``parser`` (its own options) gains ``--render`` (redraw
    the section from its JSON, measure nothing) and ``--no-write`` (print, leave docs/ alone); otherwise
    ``measure(args)`` runs, its data is saved with the command, date and machine, and the section is
    printed and published."""
    parser.add_argument("--render", action="store_true", help="only redraw the section from its JSON")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/ alone")
    args = parser.parse_args(argv)
    if args.render:
        publish(section, render)
        return 0
    data = measure(args)
    payload = in_memory(data) if args.no_write else save_results(section, data)
    title, body = render(section, payload)
    print(f"## {title}\n\n{body}")
    if not args.no_write:
        publish(section, render)
    return 0
