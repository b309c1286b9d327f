"""``nmrestore speed --vs``: ONNX Runtime and OpenVINO timed next to PyTorch and the sparse engine."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nmrestore.cli.main import app
from nmrestore.errors import NMRestoreError
from nmrestore.export.peers import available_peers, open_peers, parse_peers
from nmrestore.models import create_model
from nmrestore.runtime import EngineConfig
from nmrestore.runtime.cpu_features import cpu_features, describe_features
from nmrestore.runtime.speed import measure_speed
from nmrestore.sparsity import NMConfig, sparsify_

runner = CliRunner()
SHAPE = (1, 3, 12, 16)  # input 16x12
TOLERANCE = {"f32": 1e-4, "bf16": 1e-1}


def _needs_export() -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")


def _tiny_model() -> object:
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    return model.eval()


@pytest.mark.parametrize(
    ("peer", "rows"), [("onnxruntime", {"onnxruntime"}), ("openvino", {"openvino f32", "openvino default"})]
)
def test_each_installed_peer_gives_a_timed_checked_row(peer: str, rows: set[str]) -> None:
    pytest.importorskip(peer)
    _needs_export()
    model = _tiny_model()
    with open_peers(model, [peer], threads=1, input_shape=SHAPE) as peers:
        assert {p.name for p in peers} == rows
        report = measure_speed(model, SHAPE, threads=1, repeats=1, config=EngineConfig(), peers=peers)
    assert {row.name for row in report.peers} == rows
    for row in report.peers:
        assert math.isfinite(row.ms) and row.ms > 0 and len(row.runs_ms) == 1
        assert math.isfinite(row.speedup) and math.isfinite(row.sparse_speedup)
        assert row.precision in TOLERANCE, row.precision
        assert row.max_abs_diff < TOLERANCE[row.precision], (row.name, row.max_abs_diff)
        assert row.version
    if peer == "openvino":
        f32 = next(row for row in report.peers if row.name == "openvino f32")
        assert f32.precision == "f32"
    table = report.table()
    for name in rows:
        assert name in table
    assert "CPU: avx512_bf16" in table


def test_the_temporary_onnx_file_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    _needs_export()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with open_peers(_tiny_model(), ["onnxruntime"], threads=1, input_shape=SHAPE) as peers:
        assert len(peers) == 1 and list(tmp_path.glob("nmrestore-peers-*/model.onnx"))
    assert list(tmp_path.iterdir()) == []


def test_speed_json_lists_the_peers() -> None:
    installed = [name for name in ("onnxruntime", "openvino") if _importable(name)]
    if not installed:
        pytest.skip("no peer runtime installed")
    _needs_export()
    args = ["speed", "edsr_small", "--sparsity", "2:4", "--input", "16x12", "--threads", "1"]
    result = runner.invoke(app, [*args, "--repeats", "1", "--vs", ",".join(installed), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    names = {row["name"] for row in payload["peers"]}
    assert ("onnxruntime" in names) == ("onnxruntime" in installed)
    assert ({"openvino f32", "openvino default"} <= names) == ("openvino" in installed)
    for row in payload["peers"]:
        assert row["ms"] > 0 and len(row["runs_ms"]) == 1
        assert row["max_abs_diff"] < TOLERANCE[row["precision"]]
        assert set(row) >= {"speedup_vs_pytorch", "sparse_engine_speedup", "version"}
    assert set(payload["cpu"]) == {"avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"}


def test_a_missing_peer_named_with_vs_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    args = ["speed", "edsr_small", "--sparsity", "2:4", "--input", "16x12", "--vs", "openvino"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: openvino is not installed; pip install 'nmrestore[openvino]'"]


def test_all_skips_a_missing_peer_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)
    chosen, notes = available_peers(*parse_peers("all"))
    assert "openvino" not in chosen
    ours = [note for note in notes if note.startswith("openvino skipped")]
    assert len(ours) == 1 and "nmrestore[openvino]" in ours[0]


def test_parse_peers() -> None:
    assert parse_peers(None) == ([], False)
    assert parse_peers("all") == (["onnxruntime", "openvino"], False)
    assert parse_peers("openvino, onnxruntime") == (["onnxruntime", "openvino"], True)
    with pytest.raises(NMRestoreError, match="unknown runtime 'tensorrt'"):
        parse_peers("onnxruntime,tensorrt")
    bad = runner.invoke(app, ["speed", "edsr_small", "--sparsity", "2:4", "--vs", "tvm"])
    assert bad.exit_code == 2 and "--vs" in bad.output and "Traceback" not in bad.output


def test_cpu_features_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile avx512_fp16\n")
    assert cpu_features(info) == {"avx512_bf16": True, "amx_bf16": False, "amx_tile": True, "avx512_fp16": True}
    assert cpu_features(tmp_path / "missing") == dict.fromkeys(("avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"))
    assert describe_features(cpu_features(tmp_path / "missing")).endswith("avx512_fp16 unknown")
    assert describe_features({"avx512_bf16": True, "amx_bf16": False, "amx_tile": None, "avx512_fp16": False}) == (
        "CPU: avx512_bf16 yes, amx_bf16 no, amx_tile unknown, avx512_fp16 no"
    )


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def test_benchmark_rows_for_the_peers() -> None:
    pytest.importorskip("onnxruntime")
    _needs_export()
    from nmrestore.export.peers import peer_rows

    model = _tiny_model()
    with open_peers(model, ["onnxruntime"], threads=1, input_shape=SHAPE) as peers:
        report = measure_speed(model, SHAPE, threads=1, repeats=1, config=EngineConfig(), peers=peers)
    rows = peer_rows(report, "edsr_small x2", "2:4")
    assert rows[0]["runtime"] == "PyTorch (dense)" and len(rows) == 2
    assert rows[1]["runtime"].startswith("onnxruntime ") and rows[1]["precision"] == "f32"
    assert peer_rows(measure_speed(model, SHAPE, threads=1, repeats=1), "m", "2:4") == []


def test_a_peer_that_cannot_load_the_export_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    _needs_export()
    from nmrestore.export import peers as peers_module

    def broken(path: Path, threads: int) -> object:
        raise RuntimeError("[ONNXRuntimeError] : 10 : INVALID_GRAPH\nmore detail")

    monkeypatch.setattr(peers_module, "_onnxruntime_peer", broken)
    with (
        pytest.raises(NMRestoreError, match=r"onnxruntime could not load the ONNX export \(RuntimeError: \["),
        open_peers(_tiny_model(), ["onnxruntime"], threads=1, input_shape=SHAPE),
    ):
        pass
