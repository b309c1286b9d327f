"""Untrusted files: no code path unpickles, and pickles disguised as checkpoints are refused.

tests/models/test_official_keys.py already checks that ``load_official`` refuses a ``torch.save``
of a non-tensor object (``evil.pt``). Here: a static scan of the whole source tree for unsafe
loaders, and *working* exploit pickles (their ``__reduce__`` creates a marker file when
unpickled) named ``*.pth`` / ``*.pt`` / ``*.safetensors`` fed to every entry point that opens a
checkpoint: nothing runs, and each refuses with the project's own error (CLI: exit 2, one line).
"""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from typer.testing import CliRunner

import nmrestore
from nmrestore.cli.main import app
from nmrestore.engine.checkpoint import load_checkpoint
from nmrestore.engine.loading import load_any
from nmrestore.errors import CheckpointError
from nmrestore.models import create_model, load_official
from nmrestore.models.official import read_checkpoint
from tests.conftest import tiny_recipe_dict

SRC = Path(nmrestore.__file__).resolve().parent
runner = CliRunner()


# ----------------------------------------------------------------------------- static scan


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _kw_true(call: ast.Call, name: str) -> bool:
    return any(
        k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True for k in call.keywords
    )


def _unsafe_calls(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module in {"pickle", "dill", "cloudpickle", "joblib", "marshal"}
            and any(alias.name in {"load", "loads", "Unpickler"} for alias in node.names)
        ):
            found.append((node.lineno, f"from {node.module} import load/loads/Unpickler"))
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        last = name.rsplit(".", 1)[-1]
        if name in {"torch.load", "torch.serialization.load"} and not _kw_true(node, "weights_only"):
            found.append((node.lineno, f"{name}(...) without weights_only=True"))
        elif name.split(".")[0] in {
            "pickle",
            "dill",
            "cloudpickle",
            "joblib",
            "marshal",
            "shelve",
        } and last in {"load", "loads", "Unpickler", "open"}:
            found.append((node.lineno, name))
        elif name in {"np.load", "numpy.load"} and any(
            k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
            for k in node.keywords
        ):
            found.append((node.lineno, f"{name}(..., allow_pickle=...)"))
        elif name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}:
            found.append((node.lineno, name))
    return found


def test_no_source_file_uses_an_unpickling_loader() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    offenders = []
    for path in files:
        for line, what in _unsafe_calls(ast.parse(path.read_text(), str(path))):
            offenders.append(f"{path.relative_to(SRC)}:{line}: {what}")
    assert not offenders, "\n".join(offenders)


def test_the_scanner_catches_what_it_looks_for() -> None:
    bad = (
        "import pickle, torch, numpy as np, yaml\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\npickle.loads(b)\n"
        "np.load(p, allow_pickle=True)\nyaml.load(s)\nfrom pickle import loads\n"
    )
    assert len(_unsafe_calls(ast.parse(bad))) == 7
    good = "torch.load(p, map_location='cpu', weights_only=True)\nnp.load(p)\nyaml.safe_load(s)\n"
    assert _unsafe_calls(ast.parse(good)) == []


def test_official_loader_uses_weights_only() -> None:
    source = (SRC / "models" / "official.py").read_text()
    calls = [
        n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call) and _dotted(n.func) == "torch.load"
    ]
    assert calls and all(_kw_true(call, "weights_only") for call in calls)


# ----------------------------------------------------------------------------- exploit files


class _Exploit:
    """Unpickling this creates ``marker`` (an ``open(marker, 'w')`` call): proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def _exploits(folder: Path) -> dict[str, Path]:
    marker = folder / "PWNED"
    payload = {"head.0.weight": _Exploit(marker)}
    files = {}
    for name in ("evil.pth", "evil.pt", "evil.safetensors"):  # torch's zip format
        torch.save(payload, folder / name)
        files[name] = folder / name
    raw = folder / "legacy.pth"  # a bare pickle stream (torch's legacy format)
    raw.write_bytes(pickle.dumps(payload, protocol=2))
    files["legacy.pth"] = raw
    return files


def test_the_exploit_really_runs_when_unpickled(tmp_path: Path) -> None:
    files = _exploits(tmp_path)
    pickle.loads(files["legacy.pth"].read_bytes())  # the unsafe way, on purpose, once
    assert (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["evil.pth", "evil.pt", "evil.safetensors", "legacy.pth"])
def test_library_loaders_refuse_pickles(tmp_path: Path, name: str) -> None:
    path = _exploits(tmp_path)[name]
    for load in (
        read_checkpoint,
        load_checkpoint,
        load_any,
        lambda p: load_official(create_model("edsr_small"), p),
    ):
        with pytest.raises(CheckpointError):
            load(path)
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", ["evil.pth", "evil.safetensors", "legacy.pth"])
def test_cli_refuses_pickles_with_one_line(tmp_path: Path, name: str) -> None:
    path = _exploits(tmp_path)[name]
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict()))
    commands = [
        ["eval", str(path)],
        ["infer", str(path), str(image), "--out", str(tmp_path / "out")],
        ["export", str(path), "--format", "packed", "--out", str(tmp_path / "p.safetensors")],
        [
            "train",
            str(recipe),
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"train.init_from={path}",
            "--no-progress",
        ],
    ]
    for args in commands:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args[0], result.output, result.exception)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], (args[0], lines)
        print(f"[{args[0]}] exit 2: {lines[0]}")
    assert not (tmp_path / "PWNED").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
