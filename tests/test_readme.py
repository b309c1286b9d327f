"""The README's Python example runs as written, and its CLI lines name real commands."""

from __future__ import annotations

import re
from pathlib import Path

from typer.testing import CliRunner

from nmrestore.cli.main import app

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), re.S)


def test_python_example_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    (code,) = _blocks("python")
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "head.0 stays dense: 3 input channels" in out
    assert "114.2 -> 58.0 GMACs" in out


def test_cli_example_commands_exist() -> None:
    commands = set()
    for block in _blocks("bash"):
        for line in block.splitlines():
            match = re.search(r"nmrestore(?:\.cli\.main)? (\w+)", line)
            if match and not line.startswith("make"):
                commands.add(match.group(1))
    assert commands >= {"models", "cost", "train", "eval", "infer", "demo"}
    runner = CliRunner()
    for command in commands:
        assert runner.invoke(app, [command, "--help"]).exit_code == 0, command
    result = runner.invoke(app, ["cost", "edsr_baseline", "--scale", "4", "--sparsity", "2:4"])
    assert result.exit_code == 0 and "57.96 effective" in result.output
