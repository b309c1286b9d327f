"""The kernel's hand-off tensors: the layout of a hand-off view in its buffer, and the 16-bit copy
(*shadow*) an f32 output may carry (:mod:`nmrestore.runtime.kernel_lib` explains both)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Pair = tuple[int, int]

#: The 16-bit dtypes a kernel may run in (its *half* dtype), besides float32.
HALF_DTYPES = (torch.bfloat16, torch.float16)
HALF_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class HandoffLayout:
    """Where a (B, C, H, W) hand-off view sits in its buffer of (B, rows, C, width) elements.

    ``pad_h`` zero rows lie above the image and at least as many below it (down to ``rows``);
    ``pad_w`` zero columns lie left of it and ``width - pad_w - W`` right of it.
    """

    pad_h: int
    pad_w: int
    rows: int
    width: int

    def strides(self, channels: int) -> tuple[int, int, int, int]:
        return (self.rows * channels * self.width, self.width, channels * self.width, 1)


#: Attribute of a hand-off view holding its :class:`HandoffLayout` (a plain Python attribute: any
#: op that makes a new tensor drops it, so only the very view the kernel wrote carries it).
LAYOUT_ATTR = "_nmk_layout"
#: Attribute of an f32 output holding its 16-bit hand-off copy and the f32 tensor's version then.
SHADOW_ATTR = "_nmk_half"


def handoff_layout(x: Tensor) -> HandoffLayout | None:
    """The layout of a hand-off view that still has exactly its original strides, else None."""
    layout: HandoffLayout | None = getattr(x, LAYOUT_ATTR, None)
    if layout is None or x.dim() != 4 or x.stride() != layout.strides(x.shape[1]):
        return None
    return layout


def half_shadow(x: Tensor, half: torch.dtype = torch.bfloat16) -> Tensor | None:
    """The 16-bit (``half`` dtype) hand-off copy of an f32 kernel output, if it has one of that dtype
    and ``x`` is unmodified since."""
    entry: tuple[Tensor, int] | None = getattr(x, SHADOW_ATTR, None)
    if entry is None or x._version != entry[1] or entry[0].dtype != half:
        return None
    return entry[0]
