"""SR datasets, folder layouts, transforms and loaders: determinism, alignment, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmrestore.data.builtin import load_builtin
from nmrestore.data.datasets import (
    SREvalDataset,
    SRTrainDataset,
    find_layout,
    from_folder_hr_only,
    from_gopro,
    from_paired_folders,
    load_folder,
    make_lr,
)
from nmrestore.data.io import read_image, to_uint8, write_image
from nmrestore.data.loader import EpochSampler, build_eval_loader, build_train_loader
from nmrestore.data.transforms import augment, random_crop_pair
from nmrestore.errors import DatasetError
from nmrestore.metrics.imresize import imresize_uint8

RNG = np.random.default_rng(7)


def _noise(h: int, w: int) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _upscale_nearest(lq: np.ndarray, scale: int) -> np.ndarray:
    return np.repeat(np.repeat(lq, scale, axis=0), scale, axis=1)


@pytest.fixture(scope="module")
def textured() -> list[tuple[str, np.ndarray]]:
    """Two real, highly textured crops (misalignment by one pixel shows) kept small for speed."""
    train = dict(load_builtin("train"))
    return [
        ("gravel", train["gravel"][:130, :122].copy()),
        ("astronaut", train["astronaut"][100:220, 150:290].copy()),
    ]


@pytest.fixture(scope="module")
def train_set(textured: list[tuple[str, np.ndarray]]) -> SRTrainDataset:
    return SRTrainDataset(textured, scale=2, patch_size=24, length=16, seed=3)


def _same_sample(a: dict, b: dict) -> bool:
    return a["name"] == b["name"] and torch.equal(a["lq"], b["lq"]) and torch.equal(a["gt"], b["gt"])


# ----------------------------------------------------------------------------- transforms


def test_random_crop_pair_aligned_by_construction() -> None:
    lq = _noise(20, 30)
    gt = _upscale_nearest(lq, 3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        lq_p, gt_p = random_crop_pair(lq, gt, 8, 3, rng)
        assert lq_p.shape == (8, 8, 3) and gt_p.shape == (24, 24, 3)
        np.testing.assert_array_equal(gt_p, _upscale_nearest(lq_p, 3))


def test_random_crop_pair_errors() -> None:
    lq = _noise(10, 12)
    with pytest.raises(DatasetError, match=r"tiny.*12x10.*smaller.*16x16"):
        random_crop_pair(lq, _upscale_nearest(lq, 2), 16, 2, np.random.default_rng(0), name="tiny")
    with pytest.raises(DatasetError, match="not LR size"):
        random_crop_pair(lq, _noise(21, 24), 4, 2, np.random.default_rng(0))


def test_augment_identical_on_both_and_covers_dihedral_group() -> None:
    lq = _noise(6, 6)
    gt = _upscale_nearest(lq, 2)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(100):
        a, b = augment(lq, gt, rng)
        np.testing.assert_array_equal(b, _upscale_nearest(a, 2))
        seen.add(a.tobytes())
    assert len(seen) == 8


# ----------------------------------------------------------------------------- training dataset


def test_train_sample_shapes_and_range(train_set: SRTrainDataset) -> None:
    s = train_set[0]
    assert s["lq"].shape == (3, 24, 24) and s["gt"].shape == (3, 48, 48)
    assert s["lq"].dtype == torch.float32
    assert float(s["gt"].min()) >= 0.0 and float(s["gt"].max()) <= 1.0
    assert len(train_set) == 16
    assert [train_set[i]["name"] for i in range(4)] == ["gravel", "astronaut", "gravel", "astronaut"]


def test_train_sample_pure_function_of_seed_epoch_index(
    textured: list[tuple[str, np.ndarray]], train_set: SRTrainDataset
) -> None:
    other = SRTrainDataset(textured, scale=2, patch_size=24, length=16, seed=3)
    forward = [train_set[(1, i)] for i in range(6)]
    backward = [other[(1, i)] for i in reversed(range(6))][::-1]  # order of access is irrelevant
    assert all(_same_sample(a, b) for a, b in zip(forward, backward, strict=True))
    other.set_epoch(1)
    assert _same_sample(other[4], forward[4])
    assert not _same_sample(train_set[(2, 4)], forward[4])  # another epoch, another patch
    assert not torch.equal(train_set[(1, 0)]["lq"], train_set[(1, 2)]["lq"])  # same image, other patch
    reseeded = SRTrainDataset(textured, scale=2, patch_size=24, length=16, seed=4)
    assert not _same_sample(reseeded[(1, 4)], forward[4])


def test_train_patches_aligned_with_generated_lr(train_set: SRTrainDataset) -> None:
    """Downscaling a GT patch gives its LQ patch away from the patch border (bicubic support)."""
    for i in range(8):
        s = train_set[(0, i)]
        lq, gt = to_uint8(s["lq"]), to_uint8(s["gt"])
        down = imresize_uint8(gt, scale=0.5)
        diff = np.abs(down.astype(int) - lq.astype(int))[3:-3, 3:-3]
        assert diff.max() <= 1, s["name"]
        shifted = np.abs(down[3:-3, 3:-3].astype(int) - lq[3:-3, 4:-2].astype(int))
        assert shifted.mean() > 5  # the check would notice a one-pixel misalignment


def test_train_with_given_lr_pairs(textured: list[tuple[str, np.ndarray]]) -> None:
    lr = [(n, _noise(15, 17)) for n in ("a", "b")]
    hr = [(n, _upscale_nearest(a, 4)[:-1]) for n, a in lr]  # 59 rows: 59 // 4 == 14 != 15
    with pytest.raises(DatasetError, match=r"'a'.*LR is 17x15.*HR 68x59"):
        SRTrainDataset(hr, 4, 8, 10, 0, lr_images=lr)
    hr = [(n, np.pad(_upscale_nearest(a, 4), ((0, 3), (0, 2), (0, 0)))) for n, a in lr]  # not mod-4
    ds = SRTrainDataset(hr, 4, 8, 10, 0, lr_images=lr)
    for i in range(4):
        s = ds[i]
        np.testing.assert_array_equal(to_uint8(s["gt"]), _upscale_nearest(to_uint8(s["lq"]), 4))
    with pytest.raises(DatasetError, match="names must match"):
        SRTrainDataset(hr, 4, 8, 10, 0, lr_images=lr[::-1])


def test_image_smaller_than_patch() -> None:
    hr = [("big", _noise(200, 200)), ("small_one", _noise(90, 130))]
    with pytest.raises(DatasetError, match=r"small_one.*LR 32x22.*HR 130x90.*48x48"):
        SRTrainDataset(hr, scale=4, patch_size=48, length=4, seed=0)


def test_bad_arguments() -> None:
    hr = [("x", _noise(40, 40))]
    with pytest.raises(DatasetError, match="empty"):
        SRTrainDataset([], 2, 8, 4, 0)
    with pytest.raises(DatasetError, match="scale"):
        SRTrainDataset(hr, 0, 8, 4, 0)
    with pytest.raises(DatasetError, match="seed"):
        SRTrainDataset(hr, 2, 8, 4, -1)
    with pytest.raises(DatasetError, match="uint8"):
        SREvalDataset([("f", np.zeros((8, 8, 3), dtype=np.float32))], 2)
    ds = SRTrainDataset(hr, 2, 8, 4, 0)
    with pytest.raises(IndexError):
        ds[4]


# ----------------------------------------------------------------------------- evaluation dataset


def test_eval_dataset_mod_crops_and_generates_lr() -> None:
    hr = _noise(103, 98)
    ds = SREvalDataset([("img", hr)], scale=4)
    s = ds[0]
    assert s["gt"].shape == (3, 100, 96) and s["lq"].shape == (3, 25, 24) and s["name"] == "img"
    np.testing.assert_array_equal(to_uint8(s["gt"]), hr[:100, :96])
    np.testing.assert_array_equal(to_uint8(s["lq"]), imresize_uint8(hr[:100, :96], scale=0.25))
    np.testing.assert_array_equal(make_lr(hr, 4), to_uint8(s["lq"]))
    assert len(ds) == 1


def test_eval_loader_batches_of_one() -> None:
    ds = SREvalDataset([("a", _noise(16, 16)), ("b", _noise(24, 20))], scale=2)
    batches = list(build_eval_loader(ds))
    assert [b["name"] for b in batches] == [["a"], ["b"]]
    assert batches[1]["gt"].shape == (1, 3, 24, 20)


# ----------------------------------------------------------------------------- folders


def _tree(root: Path, files: dict[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    arrays = {}
    for rel, (h, w) in files.items():
        arrays[rel] = _noise(h, w)
        write_image(root / rel, arrays[rel])
    return arrays


def test_div2k_layout(tmp_path: Path) -> None:
    arrays = _tree(
        tmp_path,
        {
            "DIV2K_train_HR/0001.png": (40, 36),
            "DIV2K_train_HR/0002.png": (32, 32),
            "DIV2K_train_LR_bicubic/X2/0001x2.png": (20, 18),
            "DIV2K_train_LR_bicubic/X2/0002x2.png": (16, 16),
            "DIV2K_train_LR_bicubic/X4/0001x4.png": (10, 9),
        },
    )
    layout = find_layout(tmp_path, 2)
    assert layout.kind == "div2k"
    assert layout.hr_dir == tmp_path / "DIV2K_train_HR"
    assert layout.lr_dir == tmp_path / "DIV2K_train_LR_bicubic" / "X2"
    pairs = load_folder(tmp_path, 2)
    assert pairs.lq is not None
    assert [n for n, _ in pairs.gt] == ["0001", "0002"] == [n for n, _ in pairs.lq]
    np.testing.assert_array_equal(pairs.lq[0][1], arrays["DIV2K_train_LR_bicubic/X2/0001x2.png"])
    np.testing.assert_array_equal(pairs.gt[0][1], arrays["DIV2K_train_HR/0001.png"])
    assert find_layout(tmp_path, 3).lr_dir is None  # no X3 folder: LR will be generated
    with pytest.raises(DatasetError, match=r"0002\.png"):  # X4 lacks 0002
        load_folder(tmp_path, 4)


def test_div2k_train_and_valid_need_a_split(tmp_path: Path) -> None:
    _tree(tmp_path, {"DIV2K_train_HR/0001.png": (8, 8), "DIV2K_valid_HR/0801.png": (8, 8)})
    with pytest.raises(DatasetError, match="split"):
        find_layout(tmp_path, 2)
    assert find_layout(tmp_path, 2, split="valid").hr_dir.name == "DIV2K_valid_HR"
    assert find_layout(tmp_path, 2, split="train").hr_dir.name == "DIV2K_train_HR"
    pairs = load_folder(tmp_path, 2, split="valid")
    assert pairs.lq is None and [n for n, _ in pairs.gt] == ["0801"]


def test_flickr2k_layout(tmp_path: Path) -> None:
    _tree(tmp_path, {"Flickr2K_HR/000001.png": (16, 16), "Flickr2K_LR_bicubic/X4/000001x4.png": (4, 4)})
    layout = find_layout(tmp_path, 4)
    assert layout.kind == "flickr2k" and layout.lr_dir == tmp_path / "Flickr2K_LR_bicubic" / "X4"
    assert load_folder(tmp_path, 4).gt[0][0] == "000001"


def test_set5_benchmark_layout(tmp_path: Path) -> None:
    arrays = _tree(
        tmp_path,
        {
            "HR/baby.png": (51, 45),  # not a multiple of 2: the LR is the floor, HR gets mod-cropped
            "HR/bird.png": (40, 40),
            "LR_bicubic/X2/babyx2.png": (25, 22),
            "LR_bicubic/X2/birdx2.png": (20, 20),
        },
    )
    layout = find_layout(tmp_path, 2)
    assert layout.kind == "benchmark" and layout.lr_dir == tmp_path / "LR_bicubic" / "X2"
    pairs = load_folder(tmp_path, 2)
    assert [n for n, _ in pairs.gt] == ["baby", "bird"]
    np.testing.assert_array_equal(pairs.gt[0][1], arrays["HR/baby.png"][:50, :44])
    ds = SREvalDataset(pairs.gt, 2, lr_images=pairs.lq)
    assert ds[0]["gt"].shape == (3, 50, 44) and ds[0]["lq"].shape == (3, 25, 22)


def test_generic_and_hr_only_layouts(tmp_path: Path) -> None:
    _tree(tmp_path / "g", {"gt/a.png": (8, 8), "lq/a.png": (4, 4)})
    layout = find_layout(tmp_path / "g", 2)
    assert layout.kind == "generic" and layout.lr_dir == tmp_path / "g" / "lq"
    assert load_folder(tmp_path / "g", 2).lq is not None
    _tree(tmp_path / "plain", {"x.png": (8, 8), "y.jpg": (8, 8)})
    layout = find_layout(tmp_path / "plain", 2)
    assert layout == (("hr_only", tmp_path / "plain", None))
    assert [n for n, _ in load_folder(tmp_path / "plain", 2).gt] == ["x", "y"]


def test_selfexsr_names(tmp_path: Path) -> None:
    _tree(tmp_path, {"gt/img_001_SRF_2_HR.png": (8, 8), "lq/img_001_SRF_2_LR.png": (4, 4)})
    pairs = from_paired_folders(tmp_path / "lq", tmp_path / "gt", 2)
    assert [n for n, _ in pairs.gt] == ["img_001"]


def test_unknown_layout_and_missing_root(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(DatasetError, match="no known dataset layout"):
        find_layout(tmp_path, 2)
    with pytest.raises(DatasetError, match=r"missing.*does not exist"):
        find_layout(tmp_path / "missing", 2)


def test_lr_without_hr_names_it(tmp_path: Path) -> None:
    _tree(
        tmp_path,
        {"HR/baby.png": (8, 8), "LR_bicubic/X2/babyx2.png": (4, 4), "LR_bicubic/X2/headx2.png": (4, 4)},
    )
    with pytest.raises(DatasetError, match=r"headx2\.png has no HR partner"):
        load_folder(tmp_path, 2)


def test_mismatched_size_names_both_files(tmp_path: Path) -> None:
    _tree(tmp_path, {"HR/baby.png": (40, 40), "LR_bicubic/X2/babyx2.png": (20, 19)})
    with pytest.raises(DatasetError, match=r"babyx2\.png.*baby\.png.*LR is 19x20.*20x20"):
        load_folder(tmp_path, 2)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "HR").mkdir()
    with pytest.raises(DatasetError, match=r"HR.*no images"):
        load_folder(tmp_path, 2)
    with pytest.raises(DatasetError, match="no images"):
        from_folder_hr_only(tmp_path / "HR")


# ----------------------------------------------------------------------------- scale-1 pairs (GoPro, lq/gt)


def _gopro(root: Path) -> dict[str, np.ndarray]:
    files = {}
    for split, sequences in (("train", ("GOPR0372_07_00", "GOPR0374_11_00")), ("test", ("GOPR0384_11_00",))):
        for seq in sequences:
            for frame in ("000047", "000048"):
                files[f"{split}/{seq}/blur/{frame}.png"] = (12, 10)
                files[f"{split}/{seq}/sharp/{frame}.png"] = (12, 10)
    return _tree(root, files)


def test_gopro_layout_pairs_blur_and_sharp_by_name(tmp_path: Path) -> None:
    arrays = _gopro(tmp_path)
    layout = find_layout(tmp_path, 1, split="train")
    assert layout.kind == "gopro" and layout.hr_dir == tmp_path / "train"
    pairs = load_folder(tmp_path, 1, split="train")
    assert pairs.lq is not None
    names = [n for n, _ in pairs.gt]
    assert names == [f"{seq}_{f}" for seq in ("GOPR0372_07_00", "GOPR0374_11_00") for f in ("000047", "000048")]
    assert [n for n, _ in pairs.lq] == names
    np.testing.assert_array_equal(dict(pairs.gt)["GOPR0374_11_00_000048"], arrays["train/GOPR0374_11_00/sharp/000048.png"])
    np.testing.assert_array_equal(dict(pairs.lq)["GOPR0374_11_00_000048"], arrays["train/GOPR0374_11_00/blur/000048.png"])
    assert len(load_folder(tmp_path, 1, split="test").gt) == 2
    assert len(from_gopro(tmp_path / "test").gt) == 2  # a split folder on its own
    assert find_layout(tmp_path / "test", 1).kind == "gopro"
    # scale-1 pairs feed the SR datasets unchanged: same-size patches at the same place
    data = SRTrainDataset(pairs.gt, 1, patch_size=6, length=4, seed=0, lr_images=pairs.lq, augment=False)
    sample = data.sample(0, 1)
    assert sample["lq"].shape == sample["gt"].shape == (3, 6, 6)


def test_gopro_needs_a_split_and_scale_1(tmp_path: Path) -> None:
    _gopro(tmp_path)
    with pytest.raises(DatasetError, match="split='train' or 'test'"):
        find_layout(tmp_path, 1)
    with pytest.raises(DatasetError, match="no GoPro split 'valid'"):
        find_layout(tmp_path, 1, split="valid")
    with pytest.raises(DatasetError, match="scale 1"):
        find_layout(tmp_path, 2, split="train")


def test_gopro_missing_partner_names_the_pair(tmp_path: Path) -> None:
    _gopro(tmp_path)
    (tmp_path / "train/GOPR0374_11_00/sharp/000048.png").unlink()
    with pytest.raises(DatasetError, match=r"blur/000048\.png has no sharp partner .*sharp/000048\.png"):
        load_folder(tmp_path, 1, split="train")
    _tree(tmp_path, {"test/GOPR0384_11_00/sharp/000049.png": (12, 10)})
    with pytest.raises(DatasetError, match=r"GOPR0384_11_00/sharp has no blur partner .*000049\.png"):
        load_folder(tmp_path, 1, split="test")


def test_gopro_size_mismatch_names_both_files(tmp_path: Path) -> None:
    _gopro(tmp_path)
    _tree(tmp_path, {"test/GOPR0384_11_00/blur/000048.png": (12, 11)})
    with pytest.raises(DatasetError, match=r"mismatched pair .*blur/000048\.png / .*sharp/000048\.png: blur is 11x12"):
        load_folder(tmp_path, 1, split="test")


def test_generic_pairs_at_scale_1(tmp_path: Path) -> None:
    arrays = _tree(tmp_path, {"gt/a.png": (9, 7), "lq/a.png": (9, 7), "gt/b.png": (8, 8), "lq/b.png": (8, 8)})
    pairs = load_folder(tmp_path, 1)
    assert pairs.lq is not None and [n for n, _ in pairs.gt] == ["a", "b"]
    np.testing.assert_array_equal(pairs.gt[0][1], arrays["gt/a.png"])  # no crop at scale 1
    data = SREvalDataset(pairs.gt, 1, lr_images=pairs.lq)
    assert data[0]["lq"].shape == data[0]["gt"].shape == (3, 9, 7)
    _tree(tmp_path, {"lq/b.png": (8, 7)})
    with pytest.raises(DatasetError, match=r"mismatched pair .*lq/b\.png / .*gt/b\.png"):
        load_folder(tmp_path, 1)
    (tmp_path / "lq/b.png").unlink()
    with pytest.raises(DatasetError, match=r"gt.*without an LR partner.*b\.png"):
        load_folder(tmp_path, 1)


def test_folder_dataset_reads_what_was_written(tmp_path: Path) -> None:
    arr = _noise(64, 64)
    write_image(tmp_path / "only.png", arr)
    ds = SRTrainDataset(from_folder_hr_only(tmp_path), scale=2, patch_size=16, length=3, seed=0)
    assert ds[0]["name"] == "only"
    np.testing.assert_array_equal(read_image(tmp_path / "only.png"), arr)


# ----------------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def small_train() -> SRTrainDataset:
    hr = [(f"im{k}", _noise(40 + 4 * k, 44)) for k in range(3)]
    return SRTrainDataset(hr, scale=2, patch_size=8, length=20, seed=11)


def _epochs(loader: torch.utils.data.DataLoader, n: int) -> list[list[dict]]:
    return [list(loader) for _ in range(n)]


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x["name"] == y["name"] and torch.equal(x["lq"], y["lq"]) and torch.equal(x["gt"], y["gt"])
        for x, y in zip(a, b, strict=True)
    )


def test_loader_same_batches_whatever_the_worker_count(small_train: SRTrainDataset) -> None:
    serial = _epochs(build_train_loader(small_train, 4, num_workers=0, seed=5, distributed=False), 2)
    parallel = _epochs(build_train_loader(small_train, 4, num_workers=2, seed=5, distributed=False), 2)
    assert len(serial[0]) == 5 and serial[0][0]["lq"].shape == (4, 3, 8, 8)
    assert _same_batches(serial[0], parallel[0]) and _same_batches(serial[1], parallel[1])
    assert not _same_batches(serial[0], serial[1])  # epochs differ


def test_loader_resume_epoch_and_mid_epoch(small_train: SRTrainDataset) -> None:
    full = _epochs(build_train_loader(small_train, 3, 0, seed=5, distributed=False), 3)
    assert all(len(e) == 6 for e in full)  # 20 samples, batch 3: last incomplete batch dropped
    resumed = build_train_loader(small_train, 3, 0, seed=5, distributed=False, epoch_start=1)
    assert _same_batches(list(resumed), full[1])
    assert isinstance(resumed.sampler, EpochSampler)
    resumed.sampler.set_epoch(2, skip_batches=4)
    assert len(resumed) == 2
    assert _same_batches(list(resumed), full[2][4:])
    assert len(resumed) == 6  # skipping applies to one pass only


def test_sampler_shards_disjoint_across_ranks(small_train: SRTrainDataset) -> None:
    shards = [list(EpochSampler(small_train, seed=5, batch_size=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 10
    indices = [i for shard in shards for _, i in shard]
    assert sorted(indices) == list(range(20))
    assert {e for _, shard in enumerate(shards) for e, _ in shard} == {0}


def test_loader_argument_errors(small_train: SRTrainDataset) -> None:
    with pytest.raises(RuntimeError, match="process group"):
        build_train_loader(small_train, 2, 0, seed=0, distributed=True)
    with pytest.raises(DatasetError, match="fewer than one batch"):
        build_train_loader(small_train, 64, 0, seed=0, distributed=False)
    with pytest.raises(DatasetError, match="batch_size"):
        build_train_loader(small_train, 0, 0, seed=0, distributed=False)


def test_sample_stream_independent_of_access_pattern(small_train: SRTrainDataset) -> None:
    """The dataset itself is stateless across samples: interleaving epochs changes nothing."""
    plain = [small_train[(0, i)] for i in range(5)]
    interleaved = []
    for i in range(5):
        small_train[(3, 4 - i)]  # other epochs and indices drawn in between
        interleaved.append(small_train[(0, i)])
    assert all(_same_sample(a, b) for a, b in zip(plain, interleaved, strict=True))
