"""Official checkpoint layouts load into the zoo's models.

The state dicts here are synthetic: the key names and shapes are written out from the official
code (EDSR-PyTorch ``edsr.py``/``rcan.py``/``common.py``, ``nmhkahn/CARN``, ``njulj/RFDN``,
BasicSR ``edsr_arch``/``rcan_arch``/``srresnet_arch``, mmsr ``SRResNet_arch``), independently of
our modules, and filled with random tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import CheckpointError, NMRestoreError
from nmrestore.models import EDSR, convert_official_state_dict, create_model, load_official

MEAN = torch.tensor([0.4488, 0.4371, 0.4040])
Shapes = dict[str, tuple[int, ...]]


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one thread (see ``one_thread`` in tests/conftest.py)."""


def _conv(shapes: Shapes, name: str, cin: int, cout: int, k: int) -> None:
    shapes[f"{name}.weight"] = (cout, cin, k, k)
    shapes[f"{name}.bias"] = (cout,)


def _upsampler(shapes: Shapes, prefix: str, nf: int, scale: int, step: int) -> None:
    """EDSR-PyTorch ``Upsampler`` (step 2: conv, shuffle) or CARN's (step 3: conv, relu, shuffle)."""
    if scale == 3:
        _conv(shapes, f"{prefix}.0", nf, 9 * nf, 3)
    else:
        for j in range(int(math.log2(scale))):
            _conv(shapes, f"{prefix}.{step * j}", nf, 4 * nf, 3)


def edsr_pytorch_shapes(nf: int, n_blocks: int, scale: int) -> Shapes:
    shapes: Shapes = {}
    _conv(shapes, "head.0", 3, nf, 3)
    for i in range(n_blocks):
        _conv(shapes, f"body.{i}.body.0", nf, nf, 3)
        _conv(shapes, f"body.{i}.body.2", nf, nf, 3)
    _conv(shapes, f"body.{n_blocks}", nf, nf, 3)
    _upsampler(shapes, "tail.0", nf, scale, 2)
    _conv(shapes, "tail.1", nf, 3, 3)
    return shapes


def basicsr_edsr_shapes(nf: int, n_blocks: int, scale: int) -> Shapes:
    shapes: Shapes = {}
    _conv(shapes, "conv_first", 3, nf, 3)
    for i in range(n_blocks):
        _conv(shapes, f"body.{i}.conv1", nf, nf, 3)
        _conv(shapes, f"body.{i}.conv2", nf, nf, 3)
    _conv(shapes, "conv_after_body", nf, nf, 3)
    _upsampler(shapes, "upsample", nf, scale, 2)
    _conv(shapes, "conv_last", nf, 3, 3)
    return shapes


@dataclass(frozen=True)
class RCANKeys:
    """Where one RCAN layout puts each layer (``{g}``: group, ``{b}``: block, ``{n}``: count)."""

    first: str
    rcab: str
    attention: tuple[str, str]
    group_conv: str
    after_body: str
    upsample: str
    last: str


RCAN_OFFICIAL = RCANKeys(
    "head.0",
    "body.{g}.body.{b}.body",
    ("3.conv_du.0", "3.conv_du.2"),
    "body.{g}.body.{n}",
    "body.{n}",
    "tail.0",
    "tail.1",
)
RCAN_BASICSR = RCANKeys(
    "conv_first",
    "body.{g}.residual_group.{b}.rcab",
    ("3.attention.1", "3.attention.3"),
    "body.{g}.conv",
    "conv_after_body",
    "upsample",
    "conv_last",
)


def rcan_shapes(keys: RCANKeys, nf: int, n_groups: int, n_blocks: int, reduction: int, scale: int) -> Shapes:
    shapes: Shapes = {}
    _conv(shapes, keys.first, 3, nf, 3)
    for g in range(n_groups):
        for b in range(n_blocks):
            p = keys.rcab.format(g=g, b=b)
            _conv(shapes, f"{p}.0", nf, nf, 3)
            _conv(shapes, f"{p}.2", nf, nf, 3)
            _conv(shapes, f"{p}.{keys.attention[0]}", nf, nf // reduction, 1)
            _conv(shapes, f"{p}.{keys.attention[1]}", nf // reduction, nf, 1)
        _conv(shapes, keys.group_conv.format(g=g, n=n_blocks), nf, nf, 3)
    _conv(shapes, keys.after_body.format(n=n_groups), nf, nf, 3)
    _upsampler(shapes, keys.upsample, nf, scale, 2)
    _conv(shapes, keys.last, nf, 3, 3)
    return shapes


def rcan_official_shapes(nf: int, n_groups: int, n_blocks: int, reduction: int, scale: int) -> Shapes:
    return rcan_shapes(RCAN_OFFICIAL, nf, n_groups, n_blocks, reduction, scale)


def basicsr_rcan_shapes(nf: int, n_groups: int, n_blocks: int, reduction: int, scale: int) -> Shapes:
    return rcan_shapes(RCAN_BASICSR, nf, n_groups, n_blocks, reduction, scale)


def carn_official_shapes(nf: int, n_blocks: int, n_units: int, scales: tuple[int, ...]) -> Shapes:
    """``multi_scale=True`` gives ``upsample.up2/up3/up4``; one scale given as (0,) means ``up``."""
    shapes: Shapes = {
        "sub_mean.shifter.weight": (3, 3, 1, 1),
        "sub_mean.shifter.bias": (3,),
        "add_mean.shifter.weight": (3, 3, 1, 1),
        "add_mean.shifter.bias": (3,),
    }
    _conv(shapes, "entry", 3, nf, 3)
    for i in range(1, n_blocks + 1):
        for j in range(1, n_units + 1):
            _conv(shapes, f"b{i}.b{j}.body.0", nf, nf, 3)
            _conv(shapes, f"b{i}.b{j}.body.2", nf, nf, 3)
            _conv(shapes, f"b{i}.c{j}.body.0", nf * (j + 1), nf, 1)
        _conv(shapes, f"c{i}.body.0", nf * (i + 1), nf, 1)
    for s in scales:
        _upsampler(shapes, f"upsample.up{s}.body", nf, s, 3)
    _conv(shapes, "exit", nf, 3, 3)
    return shapes


def rfdn_official_shapes(nf: int, n_blocks: int, scale: int) -> Shapes:
    shapes: Shapes = {}
    dc, f = nf // 2, nf // 4
    _conv(shapes, "fea_conv", 3, nf, 3)
    for i in range(1, n_blocks + 1):
        p = f"B{i}"
        for j in (1, 2, 3):
            _conv(shapes, f"{p}.c{j}_d", nf, dc, 1)
            _conv(shapes, f"{p}.c{j}_r", nf, nf, 3)
        _conv(shapes, f"{p}.c4", nf, dc, 3)
        _conv(shapes, f"{p}.c5", 4 * dc, nf, 1)
        _conv(shapes, f"{p}.esa.conv1", nf, f, 1)
        _conv(shapes, f"{p}.esa.conv_f", f, f, 1)
        for name in ("conv_max", "conv2", "conv3", "conv3_"):
            _conv(shapes, f"{p}.esa.{name}", f, f, 3)
        _conv(shapes, f"{p}.esa.conv4", f, nf, 1)
    _conv(shapes, "c.0", nf * n_blocks, nf, 1)
    _conv(shapes, "LR_conv", nf, nf, 3)
    _conv(shapes, "upsampler.0", nf, 3 * scale**2, 3)
    return shapes


def msrresnet_shapes(nf: int, n_blocks: int, scale: int, mmsr: bool = False) -> Shapes:
    shapes: Shapes = {}
    trunk, hr = ("recon_trunk", "HRconv") if mmsr else ("body", "conv_hr")
    _conv(shapes, "conv_first", 3, nf, 3)
    for i in range(n_blocks):
        _conv(shapes, f"{trunk}.{i}.conv1", nf, nf, 3)
        _conv(shapes, f"{trunk}.{i}.conv2", nf, nf, 3)
    if scale == 4:
        _conv(shapes, "upconv1", nf, 4 * nf, 3)
        _conv(shapes, "upconv2", nf, 4 * nf, 3)
    else:
        _conv(shapes, "upconv1", nf, nf * scale**2, 3)
    _conv(shapes, hr, nf, nf, 3)
    _conv(shapes, "conv_last", nf, 3, 3)
    return shapes


def random_state(shapes: Shapes, rgb_range: float | None = None, seed: int = 0) -> dict[str, Tensor]:
    """Random tensors; with ``rgb_range``, EDSR-PyTorch's frozen MeanShift convs for that range."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(shape, generator=gen) * 0.05 for k, shape in shapes.items()}
    for key in [k for k in state if ".shifter." in k]:
        state[key] = _mean_shift(key.replace(".shifter", ""), 1.0)
    if rgb_range is not None:
        for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
            state[key] = _mean_shift(key, rgb_range)
    return state


def _mean_shift(key: str, rgb_range: float) -> Tensor:
    if key.endswith("weight"):
        return torch.eye(3).view(3, 3, 1, 1)
    sign = -1.0 if key.startswith("sub_mean") else 1.0
    return sign * rgb_range * MEAN


def assert_loaded(model: nn.Module, expected: dict[str, Tensor]) -> None:
    """``model``'s state dict holds exactly ``expected`` (our names)."""
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# --- EDSR -----------------------------------------------------------------------------------------


def test_edsr_pytorch_layout_loads_by_name() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 4), rgb_range=1.0)
    model = create_model("edsr_small", scale=4)
    assert load_official(model, official) is model
    assert_loaded(model, {k: v for k, v in official.items() if "mean" not in k})


def test_edsr_published_preset_matches_the_official_layout() -> None:
    with torch.device("meta"):
        model = create_model("edsr_baseline", scale=4)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == edsr_pytorch_shapes(64, 16, 4)


def test_dataparallel_prefix_is_stripped() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    model = load_official(create_model("edsr_small"), {f"module.{k}": v for k, v in official.items()})
    assert_loaded(model, {k: v for k, v in official.items() if "mean" not in k})


def test_rgb_range_255_biases_are_rescaled() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=255.0)
    model = load_official(create_model("edsr_small"), official)
    state = model.state_dict()
    for key, value in state.items():
        expected = official[key] / 255 if key.endswith("bias") else official[key]
        assert torch.allclose(value, expected), key
    # a model that keeps the official [0, 255] convention takes the tensors as they are
    as_is = load_official(create_model("edsr_small", rgb_range=255.0), official)
    assert_loaded(as_is, {k: v for k, v in official.items() if "mean" not in k})


def test_other_wrappers_and_prefixes() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    expected = {k: v for k, v in official.items() if "mean" not in k}
    for checkpoint in (
        {"state_dict": {f"model.{k}": v for k, v in official.items()}, "epoch": 3},
        {f"_orig_mod.{k}": v for k, v in official.items()},
        {"params": {f"module.module.{k}": v for k, v in official.items()}},
    ):
        assert_loaded(load_official(create_model("edsr_small"), checkpoint), expected)


@pytest.mark.parametrize("name", ["edsr_small", "rcan_small"])
def test_rgb_range_conversion_is_exact(name: str) -> None:
    """The converted [0, 1] model computes f_255(255 x) / 255 (RCAN: through its sigmoid gates)."""
    torch.manual_seed(0)
    reference = create_model(name, scale=2, rgb_range=255.0).eval()  # EDSR-PyTorch convention
    official = dict(reference.state_dict())
    for key in ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias"):
        official[key] = _mean_shift(key, 255.0)
    model = load_official(create_model(name, scale=2), official).eval()
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        expected = reference(255 * x) / 255
        got = model(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model.state_dict()["head.0.bias"], official["head.0.bias"])


def test_basicsr_edsr_layout_is_renamed() -> None:
    basicsr = random_state(basicsr_edsr_shapes(32, 4, 4))
    converted = convert_official_state_dict("edsr_small", {"params": basicsr}, rgb_range=1.0)
    assert converted.keys() == edsr_pytorch_shapes(32, 4, 4).keys()
    assert torch.equal(converted["body.4.weight"], basicsr["conv_after_body.weight"])
    assert torch.equal(converted["body.2.body.2.bias"], basicsr["body.2.conv2.bias"])
    assert torch.equal(converted["tail.0.2.weight"], basicsr["upsample.2.weight"])
    assert torch.equal(converted["tail.1.weight"], basicsr["conv_last.weight"])
    # BasicSR's EDSR uses img_range=255 and stores no mean shift: the default range applies
    model = load_official(create_model("edsr_small", scale=4), {"params": basicsr})
    assert torch.allclose(model.head[0].bias, basicsr["conv_first.bias"] / 255)
    assert torch.equal(model.head[0].weight, basicsr["conv_first.weight"])


def test_given_rgb_range_must_agree_with_the_checkpoint() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=255.0)
    with pytest.raises(CheckpointError, match="mean shift says 255"):
        load_official(create_model("edsr_small"), official, rgb_range=1.0)


def test_foreign_mean_shift_is_refused() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    official["sub_mean.bias"] = -torch.tensor([0.5, 0.5, 0.5])
    with pytest.raises(CheckpointError, match="DIV2K mean"):
        load_official(create_model("edsr_small"), official)


# --- scale and key mismatches ---------------------------------------------------------------------


def test_x4_checkpoint_into_x2_model_names_the_extra_upsampler() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 4), rgb_range=255.0)
    with pytest.raises(CheckpointError) as info:
        load_official(create_model("edsr_small", scale=2), official)
    message = str(info.value)
    assert "edsr_small (scale 2)" in message
    assert "unexpected keys: tail.0.2.bias, tail.0.2.weight" in message
    assert "looks like a x4 model" in message


def test_x3_checkpoint_into_x2_model_names_the_shape_mismatch() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 3), rgb_range=255.0)
    with pytest.raises(CheckpointError) as info:
        load_official(create_model("edsr_small", scale=2), official)
    message = str(info.value)
    assert "shape mismatches: tail.0.0.bias: checkpoint (288,) vs model (128,)" in message
    assert "tail.0.0.weight: checkpoint (288, 32, 3, 3) vs model (128, 32, 3, 3)" in message
    assert "looks like a x3 model" in message


@pytest.mark.parametrize(
    ("name", "shapes", "fragment"),
    [
        ("rfdn_small", rfdn_official_shapes(32, 2, 4), "upsampler.0.weight: checkpoint (48, 32, 3, 3)"),
        ("msrresnet_small", msrresnet_shapes(32, 4, 4), "unexpected keys: upconv2.bias, upconv2.weight"),
        ("rcan_small", rcan_official_shapes(32, 2, 2, 8, 4), "unexpected keys: tail.0.2.bias"),
    ],
)
def test_x4_checkpoints_into_x2_models(name: str, shapes: Shapes, fragment: str) -> None:
    with pytest.raises(CheckpointError) as info:
        load_official(create_model(name, scale=2), random_state(shapes))
    assert fragment in str(info.value)
    assert "looks like a x4 model" in str(info.value)


def test_missing_and_unexpected_keys_are_listed() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    del official["body.1.body.0.weight"]
    official["body.9.body.0.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"missing keys: body\.1\.body\.0\.weight; unexpected keys: body\.9"
    ):
        load_official(create_model("edsr_small"), official)


def test_failed_load_leaves_the_model_untouched() -> None:
    model = create_model("edsr_small", scale=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError):
        load_official(model, random_state(edsr_pytorch_shapes(32, 4, 4), rgb_range=255.0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- RCAN -----------------------------------------------------------------------------------------


def test_rcan_official_layout_loads_by_name() -> None:
    official = random_state(rcan_official_shapes(32, 2, 2, 8, 3), rgb_range=1.0)
    model = load_official(create_model("rcan_small", scale=3), official)
    assert_loaded(model, {k: v for k, v in official.items() if "mean" not in k})


def test_rcan_published_preset_matches_the_official_layout() -> None:
    with torch.device("meta"):
        model = create_model("rcan", scale=2)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == rcan_official_shapes(
        64, 10, 20, 16, 2
    )


def test_basicsr_rcan_layout_is_renamed() -> None:
    basicsr = random_state(basicsr_rcan_shapes(32, 2, 3, 8, 2))
    model = load_official(create_model("rcan_small", n_blocks=3), {"params_ema": basicsr}, rgb_range=1.0)
    state = model.state_dict()
    pairs = {
        "head.0.weight": "conv_first.weight",
        "body.1.body.2.body.0.weight": "body.1.residual_group.2.rcab.0.weight",
        "body.0.body.1.body.2.bias": "body.0.residual_group.1.rcab.2.bias",
        "body.1.body.0.body.3.conv_du.0.weight": "body.1.residual_group.0.rcab.3.attention.1.weight",
        "body.0.body.2.body.3.conv_du.2.bias": "body.0.residual_group.2.rcab.3.attention.3.bias",
        "body.1.body.3.weight": "body.1.conv.weight",
        "body.2.bias": "conv_after_body.bias",
        "tail.0.0.weight": "upsample.0.weight",
        "tail.1.bias": "conv_last.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], basicsr[theirs]), ours
    assert len(state) == len(basicsr)


# --- CARN -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_carn_multi_scale_checkpoint_keeps_the_upsampler_of_the_scale(scale: int) -> None:
    official = random_state(carn_official_shapes(32, 2, 2, (2, 3, 4)))
    model = load_official(create_model("carn_small", scale=scale), official)
    state = model.state_dict()
    assert torch.equal(state["upsample.up.body.0.weight"], official[f"upsample.up{scale}.body.0.weight"])
    if scale == 4:
        assert torch.equal(state["upsample.up.body.3.bias"], official["upsample.up4.body.3.bias"])
    assert torch.equal(state["b2.c2.body.0.weight"], official["b2.c2.body.0.weight"])
    assert torch.equal(state["entry.bias"], official["entry.bias"])  # range 1: no rescaling


def test_carn_published_preset_matches_the_official_layout() -> None:
    with torch.device("meta"):
        model = create_model("carn", scale=4)
    official = carn_official_shapes(64, 3, 3, (4,))
    official = {k.replace("up4", "up"): v for k, v in official.items() if "shifter" not in k}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official


def test_carn_multi_scale_needs_a_scale() -> None:
    official = random_state(carn_official_shapes(32, 2, 2, (2, 4)))
    with pytest.raises(CheckpointError, match="pass scale="):
        convert_official_state_dict("carn_small", official)
    with pytest.raises(CheckpointError, match="not for x3"):
        load_official(create_model("carn_small", scale=3), official)


# --- RFDN -----------------------------------------------------------------------------------------


def test_rfdn_official_layout_loads_by_name() -> None:
    official = random_state(rfdn_official_shapes(50, 4, 4))
    model = load_official(create_model("rfdn", scale=4), official)
    assert_loaded(model, official)


def test_rfdn_rgb_range_conversion_is_exact_through_esa() -> None:
    torch.manual_seed(0)
    reference = create_model("rfdn_small", scale=2).eval()
    model = load_official(create_model("rfdn_small", scale=2), reference.state_dict(), rgb_range=255.0).eval()
    x = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(255 * x) / 255, rtol=1e-4, atol=1e-5)


# --- MSRResNet / BasicSR wrappers -------------------------------------------------------------------


def test_basicsr_params_ema_is_preferred() -> None:
    ema = random_state(msrresnet_shapes(32, 4, 4), seed=1)
    plain = random_state(msrresnet_shapes(32, 4, 4), seed=2)
    model = load_official(create_model("msrresnet_small", scale=4), {"params": plain, "params_ema": ema})
    assert_loaded(model, ema)
    model = load_official(
        create_model("msrresnet_small", scale=4), {"params": plain, "params_ema": ema}, param_key="params"
    )
    assert_loaded(model, plain)


def test_basicsr_params_with_module_prefix() -> None:
    plain = random_state(msrresnet_shapes(32, 4, 3))
    checkpoint = {"params": {f"module.{k}": v for k, v in plain.items()}}
    assert_loaded(load_official(create_model("msrresnet_small", scale=3), checkpoint), plain)


def test_msrresnet_published_preset_matches_basicsr() -> None:
    with torch.device("meta"):
        model = create_model("msrresnet", scale=4)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == msrresnet_shapes(64, 16, 4)


def test_mmsr_msrresnet_layout_is_renamed() -> None:
    old = random_state(msrresnet_shapes(32, 4, 4, mmsr=True))
    model = load_official(create_model("msrresnet_small", scale=4), old)
    assert torch.equal(model.body[3].conv2.weight, old["recon_trunk.3.conv2.weight"])
    assert torch.equal(model.conv_hr.bias, old["HRconv.bias"])


def test_single_channel_fsrcnn_does_not_fit_the_rgb_model() -> None:
    y_only = {k: v.clone() for k, v in create_model("fsrcnn", n_colors=1).state_dict().items()}
    with pytest.raises(CheckpointError, match=r"first_part\.0\.weight: checkpoint \(56, 1, 5, 5\)"):
        load_official(create_model("fsrcnn"), y_only)
    assert_loaded(load_official(create_model("fsrcnn", n_colors=1), y_only), y_only)


# --- files ----------------------------------------------------------------------------------------


class _NotATensor:
    """Anything torch.load(weights_only=True) must refuse to unpickle."""


def test_files_load_with_torch_load_and_safetensors(tmp_path: Path) -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    expected = {k: v for k, v in official.items() if "mean" not in k}
    torch.save(official, tmp_path / "edsr.pt")
    assert_loaded(load_official(create_model("edsr_small"), tmp_path / "edsr.pt"), expected)
    save_file(official, str(tmp_path / "edsr.safetensors"))
    assert_loaded(load_official(create_model("edsr_small"), str(tmp_path / "edsr.safetensors")), expected)


def test_unsafe_pickles_are_refused(tmp_path: Path) -> None:
    torch.save({"head.0.weight": _NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        load_official(create_model("edsr_small"), tmp_path / "evil.pt")


def test_unreadable_files_raise_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official(create_model("edsr_small"), tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError):
        load_official(create_model("edsr_small"), tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_official(create_model("edsr_small"), tmp_path / "junk.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a dict"):
        load_official(create_model("edsr_small"), tmp_path / "list.pt")


def test_non_tensor_entries_are_refused() -> None:
    with pytest.raises(CheckpointError, match="non-tensor entries: iter"):
        load_official(create_model("edsr_small"), {"head.0.weight": torch.zeros(1), "iter": 3})


# --- odds and ends ----------------------------------------------------------------------------------


def test_loading_fills_the_originals_under_parametrized_masks() -> None:
    official = random_state(edsr_pytorch_shapes(32, 4, 2), rgb_range=1.0)
    model = create_model("edsr_small")
    parametrize.register_parametrization(model.body[0].body[0], "weight", _ZeroFirstChannel())
    load_official(model, official)
    conv = model.body[0].body[0]
    assert torch.equal(conv.parametrizations.weight.original, official["body.0.body.0.weight"])
    assert torch.equal(conv.weight[:, 0], torch.zeros_like(conv.weight[:, 0]))
    assert torch.equal(conv.bias, official["body.0.body.0.bias"])


class _ZeroFirstChannel(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        mask = torch.ones_like(weight)
        mask[:, 0] = 0
        return weight * mask


def test_a_model_built_without_the_registry_uses_its_arch() -> None:
    official = random_state(edsr_pytorch_shapes(16, 2, 2), rgb_range=1.0)
    model = load_official(EDSR(scale=2, n_feats=16, n_blocks=2), official)
    assert torch.equal(model.tail[1].weight, official["tail.1.weight"])


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(NMRestoreError, match="no official checkpoint layout"):
        convert_official_state_dict("swinir", {})
