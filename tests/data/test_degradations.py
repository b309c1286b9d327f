"""Synthetic deblurring/denoising data: kernels, noise statistics, purity of samples, fixed eval inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmrestore.data.builtin import load_builtin
from nmrestore.data.degradations import GaussianNoise, MotionBlur, degrade_image, motion_blur_kernel
from nmrestore.data.io import to_tensor
from nmrestore.data.loader import build_train_loader
from nmrestore.data.restoration import DegradedEvalDataset, DegradedTrainDataset
from nmrestore.errors import DatasetError


@pytest.fixture(scope="module")
def crops() -> list[tuple[str, np.ndarray]]:
    train = dict(load_builtin("train"))
    return [
        ("gravel", train["gravel"][:70, :64].copy()),
        ("astronaut", train["astronaut"][100:180, 150:230].copy()),
    ]


# ----------------------------------------------------------------------------- kernels


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.sampled_from([3, 5, 9, 13, 17, 31]),
    trajectory=st.sampled_from(["random_walk", "line"]),
)
def test_kernel_normalised_nonnegative_and_reproducible(seed: int, size: int, trajectory: str) -> None:
    k = motion_blur_kernel(size, np.random.default_rng(seed), trajectory)  # type: ignore[arg-type]
    assert k.shape == (size, size) and k.dtype == np.float64
    assert (k >= 0).all()
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    again = motion_blur_kernel(size, np.random.default_rng(seed), trajectory)  # type: ignore[arg-type]
    np.testing.assert_array_equal(k, again)


def test_kernels_differ_across_seeds_and_spread_with_length() -> None:
    kernels = [motion_blur_kernel(17, np.random.default_rng(s)) for s in range(20)]
    assert len({k.tobytes() for k in kernels}) == 20
    # the light is centred: the kernel's centre of mass is near the middle, not in a corner
    ys, xs = np.mgrid[:17, :17]
    for k in kernels:
        assert abs((k * xs).sum() - 8) < 4 and abs((k * ys).sum() - 8) < 4
    short = motion_blur_kernel(17, np.random.default_rng(0), min_length=0.0, max_length=0.0)
    assert short.max() == pytest.approx(1.0)  # zero length: a delta, i.e. no blur
    long = motion_blur_kernel(17, np.random.default_rng(0), min_length=1.0, max_length=1.0)
    assert (long > 1e-3).sum() >= 17  # a full-length path covers at least its length in pixels


def test_kernel_errors() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(DatasetError, match="odd"):
        motion_blur_kernel(4, rng)
    with pytest.raises(DatasetError, match="min_length"):
        motion_blur_kernel(5, rng, min_length=0.8, max_length=0.2)
    with pytest.raises(DatasetError, match="trajectory"):
        motion_blur_kernel(5, rng, trajectory="zigzag")  # type: ignore[arg-type]


def test_blur_is_the_convolution_with_the_drawn_kernel_and_8_bit() -> None:
    blur = MotionBlur(kernel_size=5)
    region = np.random.default_rng(1).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
    out = blur(region, np.random.default_rng(5))
    assert out.shape == (3, 8, 6) and out.dtype == torch.float32
    k = blur.kernel(np.random.default_rng(5))
    x = region.astype(np.float64) / 255
    expected = np.zeros((8, 6, 3))
    for dy in range(5):
        for dx in range(5):  # true convolution: the kernel is flipped against the image
            expected += k[4 - dy, 4 - dx] * x[dy : dy + 8, dx : dx + 6]
    expected = np.clip(np.round(expected * 255), 0, 255) / 255
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    assert torch.equal(torch.round(out * 255), out * 255)  # on the 8-bit grid
    flat = np.full((9, 9, 3), 77, dtype=np.uint8)  # a kernel summing to 1 keeps a flat image flat
    assert torch.allclose(blur(flat, np.random.default_rng(2)), torch.full((3, 5, 5), 77 / 255))


# ----------------------------------------------------------------------------- noise


@pytest.mark.parametrize("sigma", [15.0, 25.0, 50.0])
def test_gaussian_noise_statistics(sigma: float) -> None:
    clean = np.full((256, 256, 3), 128, dtype=np.uint8)
    noisy = GaussianNoise(sigma)(clean, np.random.default_rng(0))
    residual = (noisy - to_tensor(clean)).double() * 255  # back on the 0..255 scale
    n = residual.numel()
    assert residual.mean().item() == pytest.approx(0.0, abs=4 * sigma / n**0.5)
    assert residual.std().item() == pytest.approx(sigma, rel=0.01)
    # not clipped, not quantised: the protocol of the published sigma = 15/25/50 results
    dark = GaussianNoise(sigma)(np.zeros((64, 64, 3), dtype=np.uint8), np.random.default_rng(1))
    assert dark.min() < 0 and not torch.equal(torch.round(dark * 255), dark * 255)


def test_whole_image_degradation_keeps_the_size() -> None:
    image = np.random.default_rng(0).integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    for degradation in (MotionBlur(kernel_size=9), GaussianNoise(25)):
        out = degrade_image(image, degradation, np.random.default_rng(0))
        assert out.shape == (3, 7, 5)


# ----------------------------------------------------------------------------- datasets


def _same(a: dict, b: dict) -> bool:
    return a["name"] == b["name"] and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])


@pytest.mark.parametrize("degradation", [MotionBlur(kernel_size=9), GaussianNoise(25.0)])
def test_train_sample_pure_function_of_seed_epoch_index(
    crops: list[tuple[str, np.ndarray]], degradation: MotionBlur | GaussianNoise
) -> None:
    data = DegradedTrainDataset(crops, degradation, patch_size=16, length=8, seed=4)
    other = DegradedTrainDataset(crops, degradation, patch_size=16, length=8, seed=4)
    sample = data[(2, 3)]
    assert sample["lq"].shape == sample["gt"].shape == (3, 16, 16)
    assert _same(sample, other.sample(2, 3))
    assert _same(sample, data[(2, 3)])  # no state carried between calls
    assert not torch.equal(sample["lq"], data[(3, 3)]["lq"])  # another epoch: another crop and draw
    reseeded = DegradedTrainDataset(crops, degradation, patch_size=16, length=8, seed=5)
    assert not torch.equal(sample["lq"], reseeded.sample(2, 3)["lq"])


def test_train_crop_independent_of_degradation(crops: list[tuple[str, np.ndarray]]) -> None:
    """The crop stream and the degradation stream are separate: sigma changes the noise, not the crop."""
    a = DegradedTrainDataset(crops, GaussianNoise(15), patch_size=16, length=8, seed=0).sample(1, 5)
    b = DegradedTrainDataset(crops, GaussianNoise(50), patch_size=16, length=8, seed=0).sample(1, 5)
    assert torch.equal(a["gt"], b["gt"])
    ratio = ((b["lq"] - b["gt"]) / (a["lq"] - a["gt"])).flatten()
    assert torch.allclose(ratio, torch.full_like(ratio, 50 / 15), rtol=1e-3)


def test_blurred_patch_is_a_crop_of_the_blurred_region(crops: list[tuple[str, np.ndarray]]) -> None:
    """The target is the centre of the clean region, the input that region blurred (light from outside)."""
    data = DegradedTrainDataset(
        crops[:1], MotionBlur(kernel_size=7), patch_size=16, length=4, seed=0, augment=False
    )
    sample = data.sample(0, 0)
    gt = (sample["gt"] * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    image = crops[0][1]
    hits = [
        (t, s)
        for t in range(image.shape[0] - 15)
        for s in range(image.shape[1] - 15)
        if np.array_equal(image[t : t + 16, s : s + 16], gt)
    ]
    assert len(hits) == 1
    t, s = hits[0]
    assert min(t, s) >= 3  # room for the kernel's 3-pixel margin around the patch


def test_loader_batches_reproducible(crops: list[tuple[str, np.ndarray]]) -> None:
    data = DegradedTrainDataset(crops, MotionBlur(kernel_size=5), patch_size=8, length=8, seed=2)
    first = [b["lq"] for b in build_train_loader(data, 4, 0, seed=2, distributed=False)]
    again = [b["lq"] for b in build_train_loader(data, 4, 0, seed=2, distributed=False)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_eval_inputs_fixed_per_image_name(crops: list[tuple[str, np.ndarray]]) -> None:
    both = DegradedEvalDataset(crops, GaussianNoise(25))
    alone = DegradedEvalDataset(crops[1:], GaussianNoise(25))
    assert torch.equal(both[1]["lq"], alone[0]["lq"])  # subset or order does not change an image's input
    assert torch.equal(both[1]["lq"], DegradedEvalDataset(crops, GaussianNoise(25))[1]["lq"])
    assert both[0]["lq"].shape == both[0]["gt"].shape == (3, 70, 64)
    blurred = DegradedEvalDataset(crops, MotionBlur(kernel_size=9))
    assert blurred[1]["lq"].shape == (3, 80, 80)


def test_errors_name_the_problem(crops: list[tuple[str, np.ndarray]]) -> None:
    with pytest.raises(DatasetError, match=r"gravel.*smaller than the 80x80 region"):
        DegradedTrainDataset(crops, MotionBlur(kernel_size=17), patch_size=64, length=4, seed=0)
    with pytest.raises(DatasetError, match="empty"):
        DegradedTrainDataset([], GaussianNoise(25), patch_size=8, length=4, seed=0)
    with pytest.raises(DatasetError, match="seed"):
        DegradedTrainDataset(crops, GaussianNoise(25), patch_size=8, length=4, seed=-1)
    with pytest.raises(IndexError):
        DegradedTrainDataset(crops, GaussianNoise(25), patch_size=8, length=4, seed=0).sample(0, 4)
