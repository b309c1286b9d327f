"""MATLAB-style bicubic imresize against resize_right, plus invariants and mod_crop.

The independent reference is ``resize_right.resize`` (Shocher et al.), which implements the same
continuous model: the projected grid ``x / s + (in - 1) / 2 - (out - 1) / (2 s)`` equals MATLAB's
``u = x / s + 0.5 (1 - 1 / s)`` when ``out = in * s``, the kernel is Keys' cubic with a = -0.5,
antialiasing stretches it by 1/s, and weights are normalised per output pixel. Its default
``pad_mode='constant'`` pads with zeros *after* normalising, which darkens the border (by up to
~0.33 on [0, 1] images here), so it differs from MATLAB there. MATLAB mirrors out-of-range taps
symmetrically (edge pixel repeated), which is exactly numpy's ``np.pad(mode='symmetric')``; with
``pad_mode='symmetric'`` on numpy input resize_right matches MATLAB on the whole image, and we
compare everywhere. The default mode is also checked, on the interior only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from resize_right import interp_methods, resize

from nmrestore.errors import ImageError
from nmrestore.metrics import imresize, imresize_uint8, mod_crop

# Float comparisons are on [0, 1] images; 1/255 is the brief's bound, we measure far below it
# (the two implementations agree to float64 round-off).
FLOAT_TOL = 1e-9
SCALES = [0.5, 0.25, 2.0]


def photo4(name: str) -> np.ndarray:
    """A photo shipped with scikit-image, cropped to multiples of 4."""
    arr = getattr(skimage.data, name)()
    return arr[: arr.shape[0] // 4 * 4, : arr.shape[1] // 4 * 4]


def ours_hwc(arr: np.ndarray, scale: float, antialias: bool = True) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
    return imresize(x, scale=scale, antialias=antialias).permute(1, 2, 0).numpy()


def reference_hwc(
    arr: np.ndarray, scale: float, antialias: bool = True, pad_mode: str = "symmetric"
) -> np.ndarray:
    return resize(
        arr,
        scale_factors=[scale, scale],
        interp_method=interp_methods.cubic,
        antialiasing=antialias,
        pad_mode=pad_mode,
    )


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: photo4(name) for name in ["astronaut", "chelsea", "coffee"]}


# ---------------------------------------------------------------- against resize_right


@pytest.mark.parametrize("name", ["astronaut", "chelsea", "coffee"])
@pytest.mark.parametrize("scale", SCALES)
def test_matches_resize_right_symmetric(photos: dict[str, np.ndarray], name: str, scale: float) -> None:
    x = photos[name].astype(np.float64) / 255.0
    ours = ours_hwc(x, scale)
    ref = reference_hwc(x, scale)
    assert ours.shape == ref.shape == (round(x.shape[0] * scale), round(x.shape[1] * scale), 3)
    assert np.abs(ours - ref).max() < FLOAT_TOL


@pytest.mark.parametrize("scale", SCALES)
def test_matches_resize_right_default_padding_in_the_interior(
    photos: dict[str, np.ndarray], scale: float
) -> None:
    x = photos["chelsea"].astype(np.float64) / 255.0
    ours = ours_hwc(x, scale)
    ref = reference_hwc(x, scale, pad_mode="constant")
    # The zero padding reaches 2 input pixels (the cubic support) beyond the border: 2 output
    # pixels when downscaling with antialias (support 2/s input = 2 output pixels), 2*s when
    # upscaling. 8 output pixels is a safe margin for all three scales.
    m = 8
    assert np.abs(ours - ref)[m:-m, m:-m].max() < FLOAT_TOL
    assert np.abs(ours - ref).max() > 1e-3  # ...but they do differ at the border (see module doc)


def test_no_antialias_matches_resize_right(photos: dict[str, np.ndarray]) -> None:
    x = photos["coffee"][:100, :120].astype(np.float64) / 255.0
    ours = ours_hwc(x, 0.5, antialias=False)
    assert np.abs(ours - reference_hwc(x, 0.5, antialias=False)).max() < FLOAT_TOL
    assert np.abs(ours - ours_hwc(x, 0.5)).max() > 1e-2  # antialiasing does change the result


@pytest.mark.parametrize("scale", SCALES)
def test_uint8_within_one_level_of_resize_right(photos: dict[str, np.ndarray], scale: float) -> None:
    for arr in photos.values():
        ours = imresize_uint8(arr, scale)
        ref = np.clip(np.floor(reference_hwc(arr.astype(np.float64), scale) + 0.5), 0, 255)
        assert ours.dtype == np.uint8 and ours.shape == ref.shape
        assert np.abs(ours.astype(np.int64) - ref.astype(np.int64)).max() <= 1


def test_float32_is_close_to_float64(photos: dict[str, np.ndarray]) -> None:
    x64 = torch.from_numpy(photos["astronaut"]).permute(2, 0, 1).double() / 255
    y64 = imresize(x64, scale=0.25)
    y32 = imresize(x64.float(), scale=0.25)
    assert y32.dtype == torch.float32
    assert (y32.double() - y64).abs().max() < 1e-5


# ---------------------------------------------------------------- analytic properties


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    scale=st.one_of(st.sampled_from([0.25, 1 / 3, 0.5, 2.0, 3.0, 4.0]), st.floats(0.15, 5.0)),
    value=st.floats(-2.0, 2.0),
    antialias=st.booleans(),
)
def test_constant_image_stays_constant(h: int, w: int, scale: float, value: float, antialias: bool) -> None:
    out_h, out_w = math.floor(h * scale + 0.5), math.floor(w * scale + 0.5)
    img = torch.full((2, h, w), value, dtype=torch.float64)
    if out_h == 0 or out_w == 0:
        with pytest.raises(ImageError):
            imresize(img, scale=scale)
        return
    out = imresize(img, scale=scale, antialias=antialias)
    assert out.shape == (2, out_h, out_w)
    assert torch.allclose(out, torch.full_like(out, value), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 30), w=st.integers(1, 30), out_h=st.integers(1, 60), out_w=st.integers(1, 60))
def test_size_argument_gives_that_size(h: int, w: int, out_h: int, out_w: int) -> None:
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * 100 + w))
    out = imresize(img, size=(out_h, out_w))
    assert out.shape == (1, 3, out_h, out_w)
    assert torch.isfinite(out).all()


def test_size_equals_scale_when_consistent() -> None:
    img = torch.rand(3, 24, 36, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(imresize(img, scale=0.5), imresize(img, size=(12, 18)))
    assert torch.equal(imresize(img, scale=2.0), imresize(img, size=(48, 72)))


def test_scale_one_is_identity() -> None:
    img = torch.rand(3, 17, 23, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(imresize(img, scale=1.0), img)
    # an axis whose size does not change is left as is, whatever the other axis does
    out = imresize(img, size=(17, 46))
    assert torch.equal(out, imresize(img.transpose(1, 2), size=(46, 17)).transpose(1, 2))


@pytest.mark.parametrize("scale", [0.5, 0.25, 2.0, 4.0])
def test_linear_ramp_is_reproduced_in_the_interior(scale: float) -> None:
    # Keys' a = -0.5 kernel reproduces linear functions; for integer down-factors the sample
    # phases are symmetric, so the stretched kernel does too. Output pixel x (0-based) must be the
    # ramp at u0 = (x + 0.5) / s - 0.5. Borders are excluded (mirroring bends the ramp).
    n = 64
    ramp = torch.arange(n, dtype=torch.float64).view(1, 1, n).expand(1, 8, n).contiguous()
    out = imresize(ramp, size=(8, round(n * scale)), antialias=True)[0, 0]
    x = torch.arange(out.shape[0], dtype=torch.float64)
    expected = (x + 0.5) / scale - 0.5
    # taps reach 2 input pixels (2 / s when downscaling) = 2 output pixels down, 2 * s up
    margin = math.ceil(2 * max(scale, 1.0)) + 1
    assert torch.allclose(out[margin:-margin], expected[margin:-margin], atol=1e-9)


def test_batch_equals_per_image_and_keeps_device_dtype() -> None:
    imgs = torch.rand(3, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    out = imresize(imgs, scale=0.5)
    assert out.shape == (3, 3, 10, 14) and out.dtype == torch.float32
    for i in range(3):
        assert torch.allclose(out[i], imresize(imgs[i], scale=0.5), atol=0, rtol=0)


def test_gradients_flow() -> None:
    img = torch.rand(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    imresize(img, scale=0.5).sum().backward()
    assert img.grad is not None and torch.isfinite(img.grad).all()


def test_uint8_is_round_half_up_of_float(photos: dict[str, np.ndarray]) -> None:
    arr = photos["coffee"][:64, :80]
    x = torch.from_numpy(arr).permute(2, 0, 1).double()
    expected = (
        torch.floor(imresize(x, scale=0.5).clamp(0, 255) + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()
    )
    assert np.array_equal(imresize_uint8(arr, 0.5), expected)
    gray = imresize_uint8(arr[..., 0], 0.5)
    assert gray.shape == (32, 40) and np.array_equal(gray, expected[..., 0])


def test_bad_arguments() -> None:
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError):
        imresize(img)
    with pytest.raises(ValueError):
        imresize(img, scale=0.5, size=(4, 4))
    with pytest.raises(ValueError):
        imresize(img, scale=-1.0)
    with pytest.raises(ImageError):
        imresize(torch.zeros(3, 8, 8, dtype=torch.uint8), scale=0.5)
    with pytest.raises(ImageError):
        imresize(torch.rand(8, 8), scale=0.5)
    with pytest.raises(ImageError):
        imresize_uint8(np.zeros((8, 8, 3), np.float32), 0.5)


# ---------------------------------------------------------------- mod_crop


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 50), w=st.integers(1, 50), scale=st.integers(1, 8))
def test_mod_crop_torch_and_numpy(h: int, w: int, scale: int) -> None:
    t = torch.arange(2 * h * w).view(1, 2, h, w)
    a = np.arange(h * w * 3).reshape(h, w, 3)
    hh, ww = h - h % scale, w - w % scale
    ct, ca = mod_crop(t, scale), mod_crop(a, scale)
    assert ct.shape == (1, 2, hh, ww) and ca.shape == (hh, ww, 3)
    assert hh % scale == 0 and ww % scale == 0
    assert torch.equal(ct, t[..., :hh, :ww]) and np.array_equal(ca, a[:hh, :ww])
    assert mod_crop(a[..., 0], scale).shape == (hh, ww)


def test_mod_crop_rejects_bad_scale() -> None:
    with pytest.raises(ValueError):
        mod_crop(torch.zeros(3, 8, 8), 0)
    with pytest.raises(ValueError):
        mod_crop(torch.zeros(3, 8, 8), 2.0)  # type: ignore[arg-type]
