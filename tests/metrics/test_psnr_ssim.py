"""PSNR/SSIM against scikit-image, by hand, and across input types.

scikit-image is the independent reference. Its ``structural_similarity`` filters with 'reflect'
padding but then crops ``(win_size - 1) // 2`` pixels per side before averaging the SSIM map
(``crop(S, pad).mean()`` in skimage/metrics/_structural_similarity.py); with
``gaussian_weights=True, sigma=1.5`` the window has ``2 * int(3.5 * 1.5 + 0.5) + 1 = 11`` taps, so
exactly the 5-pixel strip whose windows touch the padding is dropped: its mean is the mean over
our valid region (windows entirely inside the image). So we compare like with like by feeding
skimage the same (cropped, Y-converted, float64) images; no extra cropping is needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nmrestore.errors import ImageError
from nmrestore.metrics import imresize_uint8, psnr, psnr_torch, rgb_to_y, ssim, ssim_torch

PSNR_TOL = 1e-4  # dB
SSIM_TOL = 1e-5


def sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=255))


def sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """skimage SSIM with Wang et al.'s settings; a/b are H x W or H x W x C (mean over channels)."""
    return float(
        structural_similarity(
            a.astype(np.float64),
            b.astype(np.float64),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=None if a.ndim == 2 else 2,
        )
    )


def y_of(arr: np.ndarray, crop: int) -> np.ndarray:
    y = rgb_to_y(arr)[..., 0]
    return y[crop : y.shape[0] - crop, crop : y.shape[1] - crop] if crop else y


def rgb_crop(arr: np.ndarray, crop: int) -> np.ndarray:
    return arr[crop : arr.shape[0] - crop, crop : arr.shape[1] - crop] if crop else arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def photo(name: str) -> np.ndarray:
    return getattr(skimage.data, name)()


def noisy(arr: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(arr + rng.normal(0.0, sigma, arr.shape)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------- colour conversion


def test_rgb_to_y_white_black_all_input_kinds() -> None:
    white8 = np.full((2, 3, 3), 255, np.uint8)
    black8 = np.zeros((2, 3, 3), np.uint8)
    assert np.allclose(rgb_to_y(white8), 235.0, atol=1e-12)
    assert np.allclose(rgb_to_y(black8), 16.0, atol=1e-12)
    assert rgb_to_y(white8).shape == (2, 3, 1) and rgb_to_y(white8).dtype == np.float64
    assert np.allclose(rgb_to_y(np.ones((2, 3, 3))), 235.0, atol=1e-12)
    yt = rgb_to_y(torch.ones(4, 3, 5, 6))
    assert yt.shape == (4, 1, 5, 6) and yt.dtype == torch.float64
    assert torch.allclose(yt, torch.tensor(235.0, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(
        rgb_to_y(torch.zeros(3, 2, 2, dtype=torch.uint8)), torch.tensor(16.0, dtype=torch.float64)
    )
    assert torch.allclose(
        rgb_to_y(torch.full((3, 2, 2), 255, dtype=torch.uint8)), torch.tensor(235.0, dtype=torch.float64)
    )


def test_rgb_to_y_numpy_and_torch_agree() -> None:
    arr = photo("chelsea")[:40, :50]
    y_np = rgb_to_y(arr)[..., 0]
    y_t = rgb_to_y(torch.from_numpy(arr).permute(2, 0, 1))[0].numpy()
    assert np.abs(y_np - y_t).max() < 1e-12
    # one pixel by hand: pure red → 16 + 65.481
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert rgb_to_y(red)[0, 0, 0] == pytest.approx(16.0 + 65.481, abs=1e-12)


def test_rgb_to_y_rejects_wrong_shape() -> None:
    with pytest.raises(ImageError):
        rgb_to_y(np.zeros((4, 4), np.uint8))
    with pytest.raises(ImageError):
        rgb_to_y(torch.zeros(4, 4, 4))


# ---------------------------------------------------------------- PSNR by hand


def test_psnr_one_level_apart_is_20_log10_255() -> None:
    a = np.full((16, 16, 3), 100, np.uint8)
    b = np.full((16, 16, 3), 101, np.uint8)
    assert psnr(a, b) == pytest.approx(20 * math.log10(255), abs=1e-12)
    # on Y a one-level RGB shift is a (65.481 + 128.553 + 24.966) / 255 = 219 / 255 luma shift
    assert psnr(a, b, test_y_channel=True) == pytest.approx(20 * math.log10(255 / (219 / 255)), abs=1e-10)


def test_identical_images_give_inf_psnr_and_unit_ssim() -> None:
    a = photo("coffee")[:64, :64]
    assert psnr(a, a) == math.inf
    assert psnr(a, a.copy(), crop_border=2, test_y_channel=True) == math.inf
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert torch.isinf(psnr_torch(to_tensor(a)[None], to_tensor(a)[None])).all()


def test_crop_border_ignores_the_border() -> None:
    a = photo("astronaut")[:64, :64].copy()
    b = a.copy()
    b[:3] = 0  # damage only the top 3 rows
    assert math.isfinite(psnr(a, b))
    assert psnr(a, b, crop_border=3) == math.inf
    assert ssim(a, b, crop_border=3) == pytest.approx(1.0, abs=1e-12)
    c = noisy(a, 5.0, 1)
    assert psnr(a, c, crop_border=4) == pytest.approx(sk_psnr(rgb_crop(a, 4), rgb_crop(c, 4)), abs=1e-10)


# ---------------------------------------------------------------- against scikit-image


@pytest.mark.parametrize("crop", [0, 2, 4])
@pytest.mark.parametrize("y_channel", [False, True])
def test_random_images_match_skimage(crop: int, y_channel: bool) -> None:
    rng = np.random.default_rng(crop * 2 + y_channel)
    a = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    if y_channel:
        ra, rb = y_of(a, crop), y_of(b, crop)
    else:
        ra, rb = rgb_crop(a, crop), rgb_crop(b, crop)
    assert abs(psnr(a, b, crop, y_channel) - sk_psnr(ra, rb)) < PSNR_TOL
    assert abs(ssim(a, b, crop, y_channel) - sk_ssim(ra, rb)) < SSIM_TOL


@settings(max_examples=30, deadline=None)
@given(
    h=st.integers(11, 40),
    w=st.integers(11, 40),
    channels=st.sampled_from([1, 3]),
    seed=st.integers(0, 2**32 - 1),
    sigma=st.floats(0.5, 60.0),
)
def test_ssim_psnr_match_skimage_any_size(h: int, w: int, channels: int, seed: int, sigma: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
    b = noisy(a, sigma, seed + 1)
    ref_a = a if channels == 3 else a[..., 0]
    ref_b = b if channels == 3 else b[..., 0]
    got_psnr = psnr(a, b)
    if math.isinf(got_psnr):
        assert np.array_equal(a, b)
    else:
        assert abs(got_psnr - sk_psnr(ref_a, ref_b)) < PSNR_TOL
    assert abs(ssim(a, b) - sk_ssim(ref_a, ref_b)) < SSIM_TOL


def _distorted_photos() -> list[object]:
    cases = []
    for i, name in enumerate(["astronaut", "chelsea", "coffee"]):
        hr = photo(name)
        hr = hr[: hr.shape[0] // 4 * 4, : hr.shape[1] // 4 * 4]
        cases.append(pytest.param(hr, noisy(hr, 8.0, i), id=f"{name}-noise"))
        # bicubic x4 down/up round trip: the classic "bicubic baseline" of SR papers
        round_trip = imresize_uint8(imresize_uint8(hr, 0.25), 4.0)
        cases.append(pytest.param(hr, round_trip, id=f"{name}-bicubic_x4"))
    return cases


@pytest.mark.parametrize(("hr", "dist"), _distorted_photos())
def test_real_photos_match_skimage(hr: np.ndarray, dist: np.ndarray) -> None:
    # SR protocol: Y channel, crop_border = scale
    assert abs(psnr(dist, hr, 4, True) - sk_psnr(y_of(hr, 4), y_of(dist, 4))) < PSNR_TOL
    assert abs(ssim(dist, hr, 4, True) - sk_ssim(y_of(hr, 4), y_of(dist, 4))) < SSIM_TOL
    # deblurring/denoising protocol: RGB, no crop, SSIM = mean over channels
    assert abs(psnr(dist, hr) - sk_psnr(hr, dist)) < PSNR_TOL
    assert abs(ssim(dist, hr) - sk_ssim(hr, dist)) < SSIM_TOL


def test_bicubic_baseline_is_in_the_expected_range() -> None:
    # sanity: x4 bicubic on a natural photo scores somewhere in the 20s dB, SSIM well below 1
    hr = photo("astronaut")
    sr = imresize_uint8(imresize_uint8(hr, 0.25), 4.0)
    assert 20.0 < psnr(sr, hr, 4, True) < 35.0
    assert 0.4 < ssim(sr, hr, 4, True) < 0.95


# ---------------------------------------------------------------- input kinds and batches


def test_tensor_and_uint8_inputs_agree() -> None:
    hr = photo("chelsea")[:96, :128]
    dist = noisy(hr, 10.0, 3)
    for crop, y in [(0, False), (3, True)]:
        p_np, s_np = psnr(dist, hr, crop, y), ssim(dist, hr, crop, y)
        t_dist, t_hr = to_tensor(dist), to_tensor(hr)
        assert psnr(t_dist, t_hr, crop, y) == p_np
        assert psnr(t_dist[None], t_hr[None], crop, y) == p_np
        assert ssim(t_dist, t_hr, crop, y) == s_np
        assert psnr(t_dist.double(), hr, crop, y) == p_np  # mixed kinds are fine
        assert float(psnr_torch(t_dist[None], t_hr[None], crop, y)[0]) == p_np
        assert float(ssim_torch(t_dist[None], t_hr[None], crop, y)[0]) == s_np


def test_float_tensors_are_quantised_and_clamped() -> None:
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 20, 20), dtype=np.uint8)
    ta = torch.from_numpy(a).double() / 255
    tb = torch.from_numpy(b).double() / 255
    jitter = (torch.rand_like(ta) - 0.5) * 0.9 / 255  # less than half a level: rounds back
    assert psnr(ta + jitter, tb) == psnr(ta, tb)
    over = ta.clone()
    over[0, 0, 0] = 1.7
    clamped = ta.clone()
    clamped[0, 0, 0] = 1.0
    assert psnr(over, tb) == psnr(clamped, tb)


def test_batch_versions_are_per_image() -> None:
    rng = np.random.default_rng(11)
    hr = torch.from_numpy(rng.integers(0, 256, (4, 3, 32, 36), dtype=np.uint8)).float() / 255
    sr = (hr + 0.03 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    p = psnr_torch(sr, hr, crop_border=2, test_y_channel=True)
    s = ssim_torch(sr, hr, crop_border=2, test_y_channel=True)
    assert p.shape == (4,) and p.dtype == torch.float64
    assert s.shape == (4,) and s.dtype == torch.float64
    for i in range(4):
        assert float(p[i]) == pytest.approx(psnr(sr[i], hr[i], 2, True), abs=1e-12)
        assert float(s[i]) == pytest.approx(ssim(sr[i], hr[i], 2, True), abs=1e-12)


def test_bad_inputs_raise_image_error() -> None:
    a = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ImageError):
        psnr(a, np.zeros((20, 21, 3), np.uint8))
    with pytest.raises(ImageError):
        psnr(a.astype(np.float32), a)  # float numpy is ambiguous (0..1 or 0..255?)
    with pytest.raises(ImageError):
        psnr(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8))  # psnr is for one image
    with pytest.raises(ImageError):
        psnr(a, a, crop_border=10)
    with pytest.raises(ImageError):
        ssim(a, a, crop_border=5)  # 10x10 left: smaller than the 11x11 window
    with pytest.raises(ValueError):
        psnr(a, a, crop_border=-1)
