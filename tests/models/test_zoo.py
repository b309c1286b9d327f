"""The model zoo: every registered model builds, upsamples by its scale (scale-1 restorers keep the
size), and matches published sizes."""

from __future__ import annotations

import functools
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from nmrestore.errors import NMRestoreError
from nmrestore.models import count_params, create_model, is_model, list_models
from nmrestore.models.rfdn import ESA

SCALES = (2, 3, 4)
EXPECTED_MODELS = {
    "carn",
    "carn_small",
    "dmphn",
    "dmphn_1_2_4_8",
    "dmphn_small",
    "edsr",
    "edsr_baseline",
    "edsr_small",
    "fsrcnn",
    "fsrcnn_small",
    "msrresnet",
    "msrresnet_small",
    "rcan",
    "rcan_small",
    "rfdn",
    "rfdn_small",
    "unet",
    "unet_small",
}
#: Published models too large to run at every scale on CPU in a unit test.
BIG = {"edsr", "rcan"}
#: Scale-1 deblurring nets run at full resolution: their CPU presets get a larger parameter budget.
SCALE1_SMALL_PARAMS = 400_000
PARAM_TYPES = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.PReLU)


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every test here runs on one thread (see ``one_thread`` in tests/conftest.py)."""


@functools.cache
def _meta_model(name: str, scale: int | None, n_colors: int | None = None) -> nn.Module:
    """Build without allocating weights (shapes and counts only); cached, so never mutate the result.

    ``scale=None``: the model's default scale."""
    kwargs = {} if n_colors is None else {"n_colors": n_colors}
    with torch.device("meta"):
        return create_model(name, scale=scale, **kwargs)


def _scales(name: str) -> tuple[int, ...]:
    """The scales a model is tested at: x2/x3/x4 where supported, plus 1 (denoising) where supported."""
    supported = _meta_model(name, None).supported_scales
    return tuple(s for s in (1, *SCALES) if s in supported)


def _default_scale(name: str) -> int:
    return int(_meta_model(name, None).scale)


def test_every_expected_model_is_registered() -> None:
    assert set(list_models()) >= EXPECTED_MODELS
    assert all(is_model(name) for name in EXPECTED_MODELS)


@pytest.mark.parametrize("name", list_models())
def test_builds_at_every_scale_with_the_right_output_shape(name: str) -> None:
    """9x7 is divisible by no downsampling factor: U-Net/DMPHN pad and crop inside the model."""
    for scale in _scales(name):
        model = _meta_model(name, scale)
        assert model.scale == scale
        assert model.model_name == name
        out = model(torch.empty(2, 3, 9, 7, device="meta"))
        assert tuple(out.shape) == (2, 3, 9 * scale, 7 * scale)


def test_scale1_models_keep_the_size_and_reject_other_scales() -> None:
    for name in ("unet_small", "dmphn_small", "edsr_small", "rcan_small"):
        model = create_model(name, scale=1).eval()
        for h, w in ((13, 21), (16, 16), (5, 3)):
            with torch.no_grad():
                assert model(torch.rand(1, 3, h, w)).shape == (1, 3, h, w), (name, h, w)
    assert create_model("unet_small").scale == 1 and create_model("edsr_small").scale == 2
    assert isinstance(create_model("edsr_small", scale=1).tail[0], nn.Identity)
    for name in ("unet_small", "dmphn_small"):
        with pytest.raises(NMRestoreError, match="supports scale 1"):
            create_model(name, scale=2)


@pytest.mark.parametrize("name", list_models())
def test_forward_is_finite_and_upsamples(name: str) -> None:
    torch.manual_seed(0)
    scales = (_default_scale(name),) if name in BIG else _scales(name)
    size = 12 if name.endswith("_small") else 8
    for scale in scales:
        model = create_model(name, scale=scale).eval()
        x = torch.rand(1, 3, size, size)
        with torch.no_grad():
            y = model(x)
        assert y.shape == (1, 3, size * scale, size * scale)
        assert y.dtype == torch.float32
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_small")])
def test_small_presets_are_fast_on_cpu(name: str) -> None:
    model = create_model(name, scale=max(_scales(name))).eval()
    x = torch.rand(1, 3, 24, 24)
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):  # best of 3: robust to a busy machine
            start = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - start)
    assert best < 0.5, f"{name} took {best:.3f}s on a 24x24 input"


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_small")])
def test_small_presets_train(name: str) -> None:
    """Gradients reach every parameter (no detached branch, no in-place op breaking autograd)."""
    torch.manual_seed(0)
    scale = _default_scale(name)
    model = create_model(name, scale=scale)
    loss = F.l1_loss(model(torch.rand(2, 3, 12, 12)), torch.rand(2, 3, 12 * scale, 12 * scale))
    loss.backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname


# --- published parameter counts -------------------------------------------------------------------
# Exact figures are our own count of the published architecture (sum of p.numel());
# the tolerance is the rounding of the published figure.


@pytest.mark.parametrize(
    ("scale", "published"),
    [(2, 1.37e6), (3, 1.55e6), (4, 1.52e6)],  # EDSR paper / EDSR-PyTorch README, EDSR-baseline
)
def test_edsr_baseline_params(scale: int, published: float) -> None:
    n = count_params(_meta_model("edsr_baseline", scale))
    assert n == pytest.approx(published, rel=0.01)
    assert n == {2: 1_369_859, 3: 1_554_499, 4: 1_517_571}[scale]


def test_edsr_params() -> None:
    # EDSR paper: 43M (x4); EDSR-PyTorch README: 40.7M (x2), 43.7M (x3), 43.1M (x4)
    published = {2: 40.7e6, 3: 43.7e6, 4: 43.1e6}
    for scale, value in published.items():
        assert count_params(_meta_model("edsr", scale)) == pytest.approx(value, rel=0.005)


def test_rcan_params() -> None:
    # RCAN paper reports ~16M; the official model has 15.44M (x2) and 15.59M (x4)
    assert count_params(_meta_model("rcan", 2)) == pytest.approx(15.44e6, rel=0.005)
    assert count_params(_meta_model("rcan", 4)) == pytest.approx(15.59e6, rel=0.005)


def test_carn_params() -> None:
    """Single-scale CARN x4: 1.11M. The paper's 1,592K counts the official multi-scale model,
    i.e. the shared trunk plus the x2, x3 and x4 upsamplers; we rebuild that sum exactly."""
    x4 = count_params(_meta_model("carn", 4))
    assert x4 == pytest.approx(1.11e6, rel=0.005)

    def upsampler(scale: int) -> int:
        return count_params(_meta_model("carn", scale).upsample)

    multi_scale = x4 + upsampler(2) + upsampler(3)
    assert multi_scale == pytest.approx(1.592e6, rel=0.001)


def test_rfdn_params() -> None:
    """The released RFDN (nf=50, 4 RFDBs; AIM 2020 report: 0.433M at x4). The 3-digit figure
    bounds the error to 0.12%; 0.5% leaves room for nothing but rounding."""
    assert count_params(_meta_model("rfdn", 4)) == pytest.approx(0.433e6, rel=0.005)


def test_msrresnet_params() -> None:
    assert count_params(_meta_model("msrresnet", 4)) == pytest.approx(1.52e6, rel=0.005)  # BasicSR


def test_fsrcnn_params() -> None:
    """The paper counts weights only, on the Y channel: 12,464 for (d, s, m) = (56, 12, 4)."""
    model = _meta_model("fsrcnn", 3, n_colors=1)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d))
    assert weights == 12_464
    assert count_params(model) == pytest.approx(12e3, rel=0.1)  # + biases and PReLU slopes
    assert count_params(_meta_model("fsrcnn", 3)) == pytest.approx(24.7e3, rel=0.01)  # RGB default


def test_small_presets_are_small() -> None:
    for name in (n for n in list_models() if n.endswith("_small")):
        limit = SCALE1_SMALL_PARAMS if _scales(name) == (1,) else 250_000
        assert count_params(_meta_model(name, max(_scales(name)))) < limit, name


def test_deblurring_nets_match_published_sizes() -> None:
    """DMPHN: the official per-level encoder/decoder (1.81M each); 1-2-4-8 is the paper's 7.2M.
    U-Net: Ronneberger et al.'s 64..1024 widths (31.0M with same padding and a 1x1 output conv)."""
    assert count_params(_meta_model("dmphn_1_2_4_8", 1)) == pytest.approx(7.2e6, rel=0.005)
    assert count_params(_meta_model("dmphn", 1)) == pytest.approx(3 / 4 * 7.2e6, rel=0.005)
    assert count_params(_meta_model("unet", 1)) == pytest.approx(31.03e6, rel=0.001)


# --- structure -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_nm_dense_layers_are_the_first_and_last_convs(name: str) -> None:
    for scale in _scales(name):
        model = _meta_model(name, scale)
        assert isinstance(model.nm_dense_layers, tuple)
        modules = dict(model.named_modules())
        first, last = model.nm_dense_layers
        assert isinstance(modules[first], nn.Conv2d)
        assert modules[first].in_channels == 3
        assert isinstance(modules[last], nn.Conv2d | nn.ConvTranspose2d)
        assert modules[last].out_channels in (3, 3 * scale**2)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)]
        assert convs[0] == first and convs[-1] == last
        reads_image = [n for n in convs if modules[n].in_channels == 3]
        if name.startswith("dmphn"):
            # every level's encoder reads the (residual-corrected) image: 3 input channels, never N:M-eligible
            assert reads_image[0] == first and len(reads_image) == len(model.patches)
        else:
            assert reads_image == [first]


@pytest.mark.parametrize("name", list_models())
def test_parameters_live_only_in_plain_layers(name: str) -> None:
    """N:M masks attach to nn.Conv2d/ConvTranspose2d/Linear; nothing else may hide weights."""
    model = _meta_model(name, _default_scale(name))
    for mod_name, module in model.named_modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert type(module) in PARAM_TYPES, f"{mod_name}: {type(module).__name__}"
    assert all(p.requires_grad for p in model.parameters())


def test_mean_shift_is_a_constant_not_a_layer() -> None:
    model = create_model("edsr_small")
    assert not any(k.startswith(("sub_mean", "add_mean")) for k in model.state_dict())
    assert not any(True for _ in model.sub_mean.parameters())
    # [0, 1] inputs: the shift is the DIV2K mean itself, not 255 times it
    assert torch.allclose(model.sub_mean.shift.flatten(), -torch.tensor([0.4488, 0.4371, 0.4040]))


class _HalfMask(nn.Module):
    """A stand-in for an N:M mask: zero every other input channel."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        mask = torch.ones_like(weight)
        mask[:, ::2] = 0
        return weight * mask


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_small")])
def test_masks_attach_with_parametrize(name: str) -> None:
    scale = _default_scale(name)
    model = create_model(name, scale=scale)
    for _, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels % 2 == 0:
            parametrize.register_parametrization(module, "weight", _HalfMask())
    y = model(torch.rand(1, 3, 12, 12))
    y.mean().backward()
    assert y.shape == (1, 3, 12 * scale, 12 * scale)


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_models())
def test_unsupported_scale_raises(name: str) -> None:
    supported = _meta_model(name, None).supported_scales
    for scale in [*(s for s in (1, 2, 5, 8) if s not in supported), 2.0, True, "2"]:
        with pytest.raises(NMRestoreError, match="scale"):
            create_model(name, scale=scale)  # type: ignore[arg-type]


def test_overrides_are_applied() -> None:
    model = create_model("edsr_small", scale=2, n_feats=16, n_blocks=2)
    assert model.head[0].out_channels == 16
    assert len(model.body) == 3
    model = create_model("rcan_small", n_groups=1, n_blocks=3)
    assert len(model.body) == 2 and len(model.body[0].body) == 4
    model = create_model("carn_small", n_feats=16, n_blocks=1, n_units=1)
    assert model.entry.out_channels == 16 and hasattr(model, "b1") and not hasattr(model, "b2")
    model = create_model("rfdn_small", n_feats=16, n_blocks=3)
    assert model.fea_conv.out_channels == 16 and hasattr(model, "B3")
    model = create_model("msrresnet_small", n_feats=8, n_blocks=1)
    assert model.conv_first.out_channels == 8 and len(model.body) == 1
    model = create_model("fsrcnn_small", d=16, s=4, m=0)
    assert model.first_part[0].out_channels == 16
    for model in (create_model("rcan_small", n_groups=1), create_model("fsrcnn", m=0)):
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("edsr_small", {"n_feats": 0}),
        ("edsr_small", {"n_blocks": -1}),
        ("edsr_small", {"res_scale": 0.0}),
        ("edsr_small", {"rgb_range": float("nan")}),
        ("rcan_small", {"reduction": 0}),
        ("carn_small", {"n_units": 1.5}),
        ("rfdn_small", {"n_feats": 3}),
        ("msrresnet_small", {"n_blocks": True}),
        ("fsrcnn_small", {"m": -1}),
    ],
)
def test_bad_overrides_raise(name: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(NMRestoreError):
        create_model(name, **kwargs)


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(NMRestoreError, match="edsr_baseline"):
        create_model("edsr_tiny")


# --- architecture details --------------------------------------------------------------------------


def test_esa_matches_the_official_formula_on_large_maps() -> None:
    """From 15 pixels up ESA is the official one (7x7/3 max-pool); smaller maps shrink the window."""
    torch.manual_seed(0)
    esa = ESA(16).eval()
    x = torch.randn(1, 16, 32, 29)
    with torch.no_grad():
        c1_ = esa.conv1(x)
        c1 = esa.conv2(c1_)
        v = F.relu(esa.conv_max(F.max_pool2d(c1, kernel_size=7, stride=3)))
        c3 = esa.conv3_(F.relu(esa.conv3(v)))
        c3 = F.interpolate(c3, (32, 29), mode="bilinear", align_corners=False)
        expected = x * torch.sigmoid(esa.conv4(c3 + esa.conv_f(c1_)))
        assert torch.allclose(esa(x), expected, atol=1e-6)
        assert esa(torch.randn(1, 16, 3, 3)).shape == (1, 16, 3, 3)


def test_msrresnet_adds_the_bilinear_upsampled_input() -> None:
    model = create_model("msrresnet_small", scale=3)
    with torch.no_grad():
        model.conv_last.weight.zero_()
        model.conv_last.bias.zero_()
        x = torch.rand(1, 3, 8, 8)
        expected = F.interpolate(x, scale_factor=3, mode="bilinear", align_corners=False)
        assert torch.allclose(model(x), expected)


@pytest.mark.parametrize("name", ["edsr_small", "rcan_small", "carn_small"])
def test_mean_shift_round_trips_a_zero_network(name: str) -> None:
    """With a zero last conv the output is exactly add_mean's mean: the shift is for [0, 1] inputs."""
    model = create_model(name, scale=2)
    last = dict(model.named_modules())[model.nm_dense_layers[1]]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        y = model(torch.rand(1, 3, 8, 8))
    mean = torch.tensor([0.4488, 0.4371, 0.4040]).view(1, 3, 1, 1).expand_as(y)
    assert torch.allclose(y, mean)


def test_models_move_with_to() -> None:
    model = create_model("edsr_small").to(torch.float64)
    y = model(torch.rand(1, 3, 8, 8, dtype=torch.float64))
    assert y.dtype == torch.float64
    assert model.sub_mean.shift.dtype == torch.float64
