"""Checkpoints: round trip, atomic writes, tamper detection, foreign models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nmrestore.engine.checkpoint import check_compatible, load_checkpoint, load_model_state, save_checkpoint
from nmrestore.errors import CheckpointError
from nmrestore.models import create_model
from nmrestore.sparsity import NMConfig, sparsify_


def _sparse_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    sparsify_(model, NMConfig(n=2, m=4))
    return model


def test_round_trip_gives_the_same_outputs_and_optimizer(tmp_path: Path) -> None:
    model = _sparse_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 6, 6)).mean().backward()
    opt.step()
    path = save_checkpoint(tmp_path / "c.safetensors", model, {"model": {"name": "edsr_small", "scale": 2}}, opt)
    ckpt = load_checkpoint(path)
    fresh = create_model("edsr_small", scale=2, n_feats=8, n_blocks=1)
    sparsify_(fresh, NMConfig(n=2, m=4))
    load_model_state(fresh, ckpt.model_state)
    x = torch.rand(1, 3, 7, 5)
    assert torch.equal(fresh(x), model(x))
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ckpt.optimizer_state)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert ckpt.is_sparse
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["model"] == {"name": "edsr_small", "scale": 2} and len(sidecar["sha256"]) == 64
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_tampered_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _sparse_model(), {})
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "])
def test_garbage_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_checkpoint_of_another_model_or_scale(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "c.safetensors", _sparse_model(), {"model": {"name": "edsr_small", "scale": 2}})
    ckpt = load_checkpoint(path)
    with pytest.raises(CheckpointError, match="'edsr_small' x2, not 'carn_small' x2"):
        check_compatible(ckpt, "carn_small", 2)
    with pytest.raises(CheckpointError, match="not 'edsr_small' x4"):
        check_compatible(ckpt, "edsr_small", 4)
    other = create_model("edsr_small", scale=4, n_feats=8, n_blocks=1)
    sparsify_(other, NMConfig(n=2, m=4))
    with pytest.raises(CheckpointError, match="does not fit this model: missing"):
        load_model_state(other, ckpt.model_state)
