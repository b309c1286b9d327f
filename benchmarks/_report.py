"""Shared output for benchmark scripts: a section of docs/BENCHMARKS.md per benchmark.

Each benchmark owns one section, delimited by HTML comments, and rewrites only that section, so
scripts run at different times never clobber each other's figures.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nEvery figure below was printed by a script in `benchmarks/`; each section says how to rerun it.\n"


def machine() -> str:
    """One line describing where the figures were measured."""
    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python {platform.python_version()}"
    )


def command() -> str:
    return "python " + " ".join(Path(a).as_posix() if i == 0 else a for i, a in enumerate(sys.argv))


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    def fmt(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    key: str,
    title: str,
    body: str,
    doc: Path = DOC,
    command_line: str | None = None,
    date: str | None = None,
    machine_line: str | None = None,
) -> None:
    """Replace (or append) the section ``key`` of docs/BENCHMARKS.md.

    ``command_line``, ``date`` and ``machine_line`` default to this process's; a section rendered from
    committed JSON rows passes the ones recorded with them.
    """
    stamp = date or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = (
        f"<!-- section:{key} -->\n## {title}\n\n"
        f"Command: `{command_line or command()}`  \nDate: {stamp}  \n"
        f"Machine: {machine_line or machine()}\n\n{body.strip()}\n"
        f"<!-- end:{key} -->"
    )
    text = doc.read_text() if doc.exists() else HEADER
    pattern = re.compile(rf"<!-- section:{re.escape(key)} -->.*?<!-- end:{re.escape(key)} -->", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
