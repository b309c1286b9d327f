"""Multi-task SR networks: one shared trunk, per-task layers only where shapes differ.

Built for PNG (Jiang et al., CVPRW 2021; :mod:`nmrestore.methods.png`), after MDSR (Lim et al., CVPRW 2017): the head conv, the body and
the last conv have the same shape at every scale and are shared; only the sub-pixel upsampler
differs per scale, so each task ``x2``/``x3``/``x4`` owns one upsampler. The shared layers are
later split between tasks by N:M masks (:mod:`nmrestore.methods.png`).

The *active task* is chosen like a route, by a setter or a context manager, never threaded
through ``forward``::

    model = create_model("edsr_small_multiscale", scale=2, tasks=(2, 3, 4))
    with use_task(model, "x3"):
        sr = model(lr)  # (N, 3, 3h, 3w)

``model.scale`` always follows the active task, so cost counting and evaluation (which read
``model.scale``) see the right output size. ``model.task_modules()`` names the layers each task
owns (what PNG never shares), and :func:`load_single_task_state` initialises a multi-task model
from a single-task checkpoint of the same family (EDSR/RCAN/MSRResNet key layouts).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from nmrestore.errors import NMRestoreError
from nmrestore.models.common import (
    MeanShift,
    ResBlock,
    Upsampler,
    check_positive_float,
    check_positive_int,
    check_scale,
    default_conv,
    residual_trunk,
)
from nmrestore.models.msrresnet import ResidualBlockNoBN, _scaled_kaiming_
from nmrestore.models.rcan import ResidualGroup
from nmrestore.models.registry import register_model

#: The tasks of a multi-scale model when none are given: SR x2, x3 and x4, in training order.
DEFAULT_TASKS: tuple[int, ...] = (2, 3, 4)


def task_name(scale: int) -> str:
    """The name of the SR task at ``scale`` (``"x3"``)."""
    return f"x{scale}"


def parse_tasks(tasks: Sequence[int | str], supported: tuple[int, ...], arch: str) -> tuple[int, ...]:
    """Scales of ``tasks`` given as ints (``3``) or names (``"x3"``); order kept, duplicates refused."""
    if isinstance(tasks, str | bytes) or not isinstance(tasks, Sequence) or not tasks:
        raise NMRestoreError(
            f"{arch}: tasks must be a non-empty list of scales (e.g. [2, 3, 4]), got {tasks!r}"
        )
    scales: list[int] = []
    for task in tasks:
        value: object = task
        if isinstance(task, str):
            text = task.strip().lower().removeprefix("x")
            value = int(text) if text.isdigit() else task
        scales.append(check_scale(value, supported, f"{arch} task"))
    if len(set(scales)) != len(scales):
        raise NMRestoreError(f"{arch}: tasks repeat a scale: {list(tasks)!r}")
    return tuple(scales)


class MultiTaskSR(nn.Module):
    """Task bookkeeping shared by the multi-scale models (subclasses build the layers).

    Attributes:
        tasks: task names in training order (``("x2", "x3", "x4")``).
        task_scales: name -> scale.
        scale: the active task's scale (changes with :meth:`set_task`).
    """

    arch: ClassVar[str] = "multitask"
    supported_scales: ClassVar[tuple[int, ...]] = (2, 3, 4)
    #: Prefix of the per-task module dict (``upsample.x3`` is task x3's upsampler).
    task_dict: ClassVar[str] = "upsample"

    def __init__(self, tasks: Sequence[int | str], scale: int) -> None:
        super().__init__()
        # The model's own scale must be valid first (bad types and values raise "scale" errors).
        check_scale(scale, self.supported_scales, self.arch)
        scales = parse_tasks(tasks, self.supported_scales, self.arch)
        if scale not in scales:
            names = ", ".join(task_name(s) for s in scales)
            raise NMRestoreError(f"{self.arch}: scale {scale} is not one of the model's tasks ({names})")
        self.task_scales: dict[str, int] = {task_name(s): s for s in scales}
        self.tasks: tuple[str, ...] = tuple(self.task_scales)
        self._task = task_name(scale)
        self.scale: int = scale

    # -- the active task -------------------------------------------------------------------------
    @property
    def task(self) -> str:
        """Name of the active task."""
        return self._task

    @property
    def task_index(self) -> int:
        """Position of the active task in :attr:`tasks` (its route for PNG)."""
        return self.tasks.index(self._task)

    def set_task(self, task: str) -> None:
        """Make ``task`` (a name such as ``"x3"``) active; ``forward`` then runs its layers."""
        if task not in self.task_scales:
            raise NMRestoreError(f"unknown task {task!r}; this model has tasks {', '.join(self.tasks)}")
        self._task = task
        self.scale = self.task_scales[task]

    def task_modules(self) -> dict[str, tuple[str, ...]]:
        """Module-name prefixes owned by each task (never shared between tasks)."""
        return {task: (f"{self.task_dict}.{task}",) for task in self.tasks}

    def single_task_key(self, key: str, task: str) -> str | None:
        """The key of this model that a single-task checkpoint's ``key`` maps to (None: no match)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"tasks={','.join(self.tasks)}, active={self.task}"


def is_multitask(model: nn.Module) -> bool:
    """True for a model with switchable tasks (a :class:`MultiTaskSR`)."""
    return isinstance(model, MultiTaskSR)


@contextmanager
def use_task(model: nn.Module, task: str) -> Iterator[None]:
    """Run a block with ``task`` active in ``model``, restoring the previous task afterwards.

    This switches the model's own layers only; :func:`nmrestore.methods.png.use_png_task` also
    switches the N:M masks' route.
    """
    if not isinstance(model, MultiTaskSR):
        raise NMRestoreError(f"{type(model).__name__} is not a multi-task model")
    previous = model.task
    model.set_task(task)
    try:
        yield
    finally:
        model.set_task(previous)


# -- EDSR / RCAN -----------------------------------------------------------------------------------
class _MeanShiftedSR(MultiTaskSR):
    """EDSR-style layout: mean shift, head conv, body with a long skip, per-task upsampler, last conv."""

    sub_mean: MeanShift
    add_mean: MeanShift

    def _build_ends(self, scales: Sequence[int], n_feats: int, n_colors: int, rgb_range: float) -> None:
        self.upsample = nn.ModuleDict({task_name(s): Upsampler(s, n_feats) for s in scales})
        self.tail = nn.Sequential(default_conv(n_feats, n_colors, 3))
        self.add_mean = MeanShift(rgb_range, sign=1)
        self.nm_dense_layers: tuple[str, ...] = ("head.0", "tail.0")

    #: Predict a residual over the bicubic upscaled input (see ``EDSR``'s ``global_skip``); off by default.
    global_skip: bool = False

    def _zero_last_conv(self) -> None:
        # with a global skip the untrained model is bicubic at every scale (the single-task EDSR's init)
        last = self.tail[0]
        nn.init.zeros_(last.weight)
        if last.bias is not None:
            nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        features = self.head(self.sub_mean(x))
        res = self.body(features) + features
        out = self.tail(self.upsample[self.task](res))
        if not self.global_skip:
            return self.add_mean(out)
        return F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False) + out

    def single_task_key(self, key: str, task: str) -> str | None:
        # single-task EDSR/RCAN: tail.0 = upsampler, tail.1 = last conv
        if key.startswith("tail.0."):
            return f"{self.task_dict}.{task}." + key.removeprefix("tail.0.")
        if key.startswith("tail.1."):
            return "tail.0." + key.removeprefix("tail.1.")
        return key


class MultiScaleEDSR(_MeanShiftedSR):
    """EDSR with one upsampler per task (MDSR's sharing without its per-scale pre-processing)."""

    arch: ClassVar[str] = "edsr_multiscale"

    def __init__(
        self,
        tasks: Sequence[int | str] = DEFAULT_TASKS,
        scale: int = 2,
        n_feats: int = 64,
        n_blocks: int = 16,
        res_scale: float = 1.0,
        rgb_range: float = 1.0,
        n_colors: int = 3,
        global_skip: bool = False,
    ) -> None:
        super().__init__(tasks, scale)
        n_feats = check_positive_int("n_feats", n_feats)
        n_blocks = check_positive_int("n_blocks", n_blocks)
        n_colors = check_positive_int("n_colors", n_colors)
        rgb_range = check_positive_float("rgb_range", rgb_range)
        res_scale = check_positive_float("res_scale", res_scale)
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head, self.body = residual_trunk(n_colors, n_feats, partial(ResBlock, n_feats, 3, res_scale), n_blocks)
        self._build_ends(list(self.task_scales.values()), n_feats, n_colors, rgb_range)
        self.global_skip = bool(global_skip)
        if self.global_skip:
            self._zero_last_conv()


class MultiScaleRCAN(_MeanShiftedSR):
    """RCAN with one upsampler per task."""

    arch: ClassVar[str] = "rcan_multiscale"

    def __init__(
        self,
        tasks: Sequence[int | str] = DEFAULT_TASKS,
        scale: int = 2,
        n_feats: int = 64,
        n_groups: int = 10,
        n_blocks: int = 20,
        reduction: int = 16,
        rgb_range: float = 1.0,
        n_colors: int = 3,
    ) -> None:
        super().__init__(tasks, scale)
        n_feats = check_positive_int("n_feats", n_feats)
        n_groups = check_positive_int("n_groups", n_groups)
        n_blocks = check_positive_int("n_blocks", n_blocks)
        reduction = check_positive_int("reduction", reduction)
        n_colors = check_positive_int("n_colors", n_colors)
        rgb_range = check_positive_float("rgb_range", rgb_range)
        self.sub_mean = MeanShift(rgb_range, sign=-1)
        self.head, self.body = residual_trunk(
            n_colors, n_feats, partial(ResidualGroup, n_feats, reduction, n_blocks), n_groups
        )
        self._build_ends(list(self.task_scales.values()), n_feats, n_colors, rgb_range)


# -- MSRResNet -------------------------------------------------------------------------------------
class _MSRUpsample(nn.Sequential):
    """MSRResNet's upsampling: per step conv -> PixelShuffle -> LeakyReLU (two x2 steps at x4)."""

    def __init__(self, scale: int, n_feats: int) -> None:
        steps = [2, 2] if scale == 4 else [scale]
        layers: list[nn.Module] = []
        for step in steps:
            layers += [
                nn.Conv2d(n_feats, n_feats * step * step, 3, 1, 1),
                nn.PixelShuffle(step),
                nn.LeakyReLU(0.1),
            ]
        super().__init__(*layers)


class MultiScaleMSRResNet(MultiTaskSR):
    """MSRResNet with one upsampler per task; ``conv_hr`` and ``conv_last`` are shared."""

    arch: ClassVar[str] = "msrresnet_multiscale"

    def __init__(
        self,
        tasks: Sequence[int | str] = DEFAULT_TASKS,
        scale: int = 2,
        n_feats: int = 64,
        n_blocks: int = 16,
        n_colors: int = 3,
    ) -> None:
        super().__init__(tasks, scale)
        num_feat = check_positive_int("n_feats", n_feats)
        num_block = check_positive_int("n_blocks", n_blocks)
        n_colors = check_positive_int("n_colors", n_colors)
        self.conv_first = nn.Conv2d(n_colors, num_feat, 3, 1, 1)
        self.body = nn.Sequential(*[ResidualBlockNoBN(num_feat) for _ in range(num_block)])
        self.upsample = nn.ModuleDict(
            {task_name(s): _MSRUpsample(s, num_feat) for s in self.task_scales.values()}
        )
        self.conv_hr = nn.Conv2d(num_feat, num_feat, 3, 1, 1)
        self.conv_last = nn.Conv2d(num_feat, n_colors, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(0.1)
        upconvs = [m for m in self.upsample.modules() if isinstance(m, nn.Conv2d)]
        _scaled_kaiming_([self.conv_first, *upconvs, self.conv_hr, self.conv_last])
        self.nm_dense_layers: tuple[str, ...] = ("conv_first", "conv_last")

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(self.lrelu(self.conv_first(x)))
        out = self.upsample[self.task](out)
        out = self.conv_last(self.lrelu(self.conv_hr(out)))
        base = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return out + base

    def single_task_key(self, key: str, task: str) -> str | None:
        # single-task MSRResNet: upconv1 (and upconv2 at x4); index 3 is the second step's conv
        if key.startswith("upconv1."):
            return f"{self.task_dict}.{task}.0." + key.removeprefix("upconv1.")
        if key.startswith("upconv2."):
            return f"{self.task_dict}.{task}.3." + key.removeprefix("upconv2.")
        return key


# -- loading a single-task checkpoint --------------------------------------------------------------
def load_single_task_state(model: MultiTaskSR, state: Mapping[str, Tensor], task: str) -> list[str]:
    """Copy a dense single-task state dict of the same family into ``model`` for ``task``.

    Shared layers and ``task``'s own layers are overwritten; the other tasks' layers keep their
    initialisation. Returns the keys of ``model`` that were *not* loaded (the other tasks' layers).
    Raises :class:`NMRestoreError` when a key has no place or a shape differs.
    """
    if task not in model.task_scales:
        raise NMRestoreError(f"unknown task {task!r}; this model has tasks {', '.join(model.tasks)}")
    own = model.state_dict()
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        target = model.single_task_key(key, task)
        if target is None or target not in own:
            raise NMRestoreError(
                f"single-task key {key!r} has no place in {type(model).__name__} (task {task})"
            )
        if own[target].shape != value.shape:
            raise NMRestoreError(
                f"single-task key {key!r}: shape {tuple(value.shape)} does not fit {target!r} {tuple(own[target].shape)}"
            )
        mapped[target] = value
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value)
    return sorted(set(own) - set(mapped))


# -- registered builders ---------------------------------------------------------------------------
@register_model
def edsr_baseline_multiscale(
    scale: int = 2,
    tasks: Sequence[int | str] = DEFAULT_TASKS,
    n_feats: int = 64,
    n_blocks: int = 16,
    res_scale: float = 1.0,
    rgb_range: float = 1.0,
    global_skip: bool = False,
) -> MultiScaleEDSR:
    """EDSR-baseline trunk (16 blocks, 64 channels) shared by x2/x3/x4, one upsampler per task.

    ``global_skip``: predict a residual over the bicubic upscaled input, as ``edsr_baseline`` can.
    """
    return MultiScaleEDSR(tasks, scale, n_feats, n_blocks, res_scale, rgb_range, global_skip=global_skip)


@register_model
def edsr_small_multiscale(
    scale: int = 2,
    tasks: Sequence[int | str] = DEFAULT_TASKS,
    n_feats: int = 32,
    n_blocks: int = 4,
    res_scale: float = 1.0,
    rgb_range: float = 1.0,
    global_skip: bool = False,
) -> MultiScaleEDSR:
    """CPU preset of :func:`edsr_baseline_multiscale` (edsr_small's trunk: 4 blocks, 32 channels)."""
    return MultiScaleEDSR(tasks, scale, n_feats, n_blocks, res_scale, rgb_range, global_skip=global_skip)


@register_model
def rcan_small_multiscale(
    scale: int = 2,
    tasks: Sequence[int | str] = DEFAULT_TASKS,
    n_feats: int = 32,
    n_groups: int = 2,
    n_blocks: int = 2,
    reduction: int = 8,
    rgb_range: float = 1.0,
) -> MultiScaleRCAN:
    """CPU preset: rcan_small's trunk shared by every task, one upsampler per task."""
    return MultiScaleRCAN(tasks, scale, n_feats, n_groups, n_blocks, reduction, rgb_range)


@register_model
def msrresnet_multiscale(
    scale: int = 2, tasks: Sequence[int | str] = DEFAULT_TASKS, n_feats: int = 64, n_blocks: int = 16
) -> MultiScaleMSRResNet:
    """BasicSR MSRResNet trunk (64 channels, 16 blocks) shared by every task, one upsampler per task."""
    return MultiScaleMSRResNet(tasks, scale, n_feats, n_blocks)


@register_model
def msrresnet_small_multiscale(
    scale: int = 2, tasks: Sequence[int | str] = DEFAULT_TASKS, n_feats: int = 32, n_blocks: int = 4
) -> MultiScaleMSRResNet:
    """CPU preset: msrresnet_small's trunk shared by every task, one upsampler per task."""
    return MultiScaleMSRResNet(tasks, scale, n_feats, n_blocks)


__all__ = [
    "DEFAULT_TASKS",
    "MultiScaleEDSR",
    "MultiScaleMSRResNet",
    "MultiScaleRCAN",
    "MultiTaskSR",
    "is_multitask",
    "load_single_task_state",
    "parse_tasks",
    "task_name",
    "use_task",
]
