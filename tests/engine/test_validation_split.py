"""The default validation set is the held-out bottom strip of every training image, never trained on."""

from __future__ import annotations

import numpy as np

from nmrestore.data.builtin import load_builtin
from nmrestore.engine.runner import build_train_dataset, build_val_dataset
from nmrestore.recipes import recipe_from_dict


def test_held_out_strips_are_validated_on_and_never_trained_on() -> None:
    recipe = recipe_from_dict(
        {"model": {"name": "edsr_small", "scale": 2}, "data": {"train": {"source": "builtin", "patch_size": 16, "max_images": 2}}}
    )
    train = build_train_dataset(recipe)
    val = build_val_dataset(recipe)
    originals = dict(load_builtin("train")[:2])
    assert len(val) == 2
    for (name, _, hr_train), sample in zip(train.pairs, [val[i] for i in range(len(val))], strict=True):
        full = originals[name]
        held = (sample["gt"].numpy().transpose(1, 2, 0) * 255).round().astype(np.uint8)
        rows_train, rows_held = hr_train.shape[0], held.shape[0]
        assert rows_held >= 0.1 * full.shape[0] - 2  # at least the holdout fraction (whole LR rows)
        assert np.array_equal(hr_train, full[:rows_train, : hr_train.shape[1]])  # the top part is trained on
        assert np.array_equal(held, full[rows_train : rows_train + rows_held, : held.shape[1]])  # the rest is held out
