"""DMPHN, the Deep Multi-Patch Hierarchical Network (Zhang et al., CVPR 2019) for deblurring.

Level i of a ``1-2-4`` (or ``1-2-4-8``) hierarchy cuts the blurry image into 1, 2, 4 (8) patches:
halving the height, then the width, then the height again. Every level has its own encoder and
decoder (the official ``encoder_lv{i}`` / ``decoder_lv{i}``), with the official shapes:

* encoder: conv 3->32, 2 residual blocks (conv-ReLU-conv), stride-2 conv 32->64, 2 blocks,
  stride-2 conv 64->128, 2 blocks;
* decoder: 2 blocks, transposed conv 128->64 (4x4, stride 2), 2 blocks, transposed conv 64->32,
  2 blocks, conv 32->3.

From the coarsest level down: each patch (plus the coarser level's residual image) is encoded, the
patch features are stitched into the next finer level's layout and added to the coarser level's
features, and the decoder turns them into the residual image the finer level adds to its input.
The finest decoder's output is the sharp image. As in the official code the network works on
images centred at 0 (input - 0.5, output + 0.5). ``dmphn`` (1-2-4) has 5.4M parameters,
``dmphn_1_2_4_8`` (the paper's deepest stack) 7.2M; both are the published networks. The CPU preset
``dmphn_small`` is narrower and shallower and adds a global skip connection (see :class:`DMPHN`).

Any input size works: it is padded (replicate) to a multiple of the patch grid times the encoder's
downsampling, and the output is cropped back. Patches of one level run as one batch (same result
as the official one-call-per-patch: convolutions act on each sample alone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor, nn

from nmrestore.errors import NMRestoreError
from nmrestore.models.common import ResBlock, check_positive_int, check_scale, default_conv
from nmrestore.models.registry import register_model
from nmrestore.models.unet import check_widths, pad_to_multiple


def patch_grid(patches: int) -> tuple[int, int]:
    """(rows, cols) of a level with ``patches`` patches: split the height, then the width, alternately."""
    if patches < 1 or patches & (patches - 1):
        raise NMRestoreError(f"DMPHN levels need a power-of-two number of patches, got {patches}")
    splits = patches.bit_length() - 1
    return 2 ** ((splits + 1) // 2), 2 ** (splits // 2)


def to_patches(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(N, C, R*h, K*w) -> (R*K*N, C, h, w): the grid's patches stacked on the batch axis, row-major."""
    rows, cols = grid
    n, c, hh, ww = x.shape
    h, w = hh // rows, ww // cols
    y = x.reshape(n, c, rows, h, cols, w).permute(2, 4, 0, 1, 3, 5)
    return y.reshape(rows * cols * n, c, h, w)


def from_patches(x: Tensor, grid: tuple[int, int], n: int) -> Tensor:
    """Inverse of :func:`to_patches`."""
    rows, cols = grid
    _, c, h, w = x.shape
    y = x.reshape(rows, cols, n, c, h, w).permute(2, 3, 0, 4, 1, 5)
    return y.reshape(n, c, rows * h, cols * w)


class DMPHNEncoder(nn.Module):
    """Stage 0: conv to ``widths[0]``; stage s > 0: stride-2 conv; each stage then ``blocks`` residual blocks."""

    def __init__(self, widths: Sequence[int], blocks: int, n_colors: int) -> None:
        super().__init__()
        stages = []
        for s, width in enumerate(widths):
            if s == 0:
                head: nn.Module = default_conv(n_colors, width, 3)
            else:
                head = nn.Conv2d(widths[s - 1], width, 3, stride=2, padding=1)
            stages.append(nn.Sequential(head, *[ResBlock(width) for _ in range(blocks)]))
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class DMPHNDecoder(nn.Module):
    """Per stage (coarse to fine) ``blocks`` residual blocks, then a 4x4 stride-2 transposed conv; last conv to RGB."""

    def __init__(self, widths: Sequence[int], blocks: int, n_colors: int) -> None:
        super().__init__()
        stages = []
        for s in range(len(widths) - 1, -1, -1):
            if s > 0:
                tail: nn.Module = nn.ConvTranspose2d(widths[s], widths[s - 1], 4, stride=2, padding=1)
            else:
                tail = default_conv(widths[0], n_colors, 3)
            stages.append(nn.Sequential(*[ResBlock(widths[s]) for _ in range(blocks)], tail))
        self.stages = nn.Sequential(*stages)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)


class DMPHNLevel(nn.Module):
    def __init__(self, widths: Sequence[int], blocks: int, n_colors: int) -> None:
        super().__init__()
        self.encoder = DMPHNEncoder(widths, blocks, n_colors)
        self.decoder = DMPHNDecoder(widths, blocks, n_colors)


class DMPHN(nn.Module):
    """Multi-patch hierarchy; ``levels`` lists the patches per level finest first, e.g. (1, 2, 4).

    ``residual=True`` adds the input to the finest decoder's output (not in the paper; the CPU
    preset uses it so a few hundred steps start from the identity instead of from a blank image).

    ``self.levels`` holds them coarsest first (the order ``forward`` runs them), so the first conv
    registered is the first one executed and the finest decoder's last conv is the last.
    """

    arch: ClassVar[str] = "dmphn"
    supported_scales: ClassVar[tuple[int, ...]] = (1,)

    def __init__(
        self,
        scale: int = 1,
        levels: Sequence[int] = (1, 2, 4),
        widths: Sequence[int] = (32, 64, 128),
        blocks: int = 2,
        n_colors: int = 3,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.scale: int = check_scale(scale, self.supported_scales, "DMPHN")
        self.residual = bool(residual)
        if isinstance(levels, str | bytes) or not isinstance(levels, Sequence) or not levels:
            raise NMRestoreError(f"DMPHN: levels must be a list such as [1, 2, 4], got {levels!r}")
        expected = tuple(2**i for i in range(len(levels)))
        if tuple(levels) != expected:
            raise NMRestoreError(
                f"DMPHN: levels must double from 1, e.g. {list(expected)}; got {list(levels)}"
            )
        self.patches: tuple[int, ...] = expected
        self.widths = check_widths(widths, "DMPHN", minimum=1)
        blocks = check_positive_int("blocks", blocks)
        n_colors = check_positive_int("n_colors", n_colors)
        self.grids = [patch_grid(p) for p in self.patches]  # finest first
        self.levels = nn.ModuleList([DMPHNLevel(self.widths, blocks, n_colors) for _ in self.patches[::-1]])
        down = 2 ** (len(self.widths) - 1)
        rows, cols = self.grids[-1]
        self.pad_factor: tuple[int, int] = (rows * down, cols * down)
        n = len(self.patches)
        self.nm_dense_layers: tuple[str, ...] = (
            "levels.0.encoder.stages.0.0",
            f"levels.{n - 1}.decoder.stages.{len(self.widths) - 1}.{blocks}",
        )

    def forward(self, x: Tensor) -> Tensor:
        padded, h, w = pad_to_multiple(x, *self.pad_factor)
        image = padded - 0.5
        n = image.shape[0]
        count = len(self.patches)
        features: Tensor | None = None
        residual: Tensor | None = None
        out = image
        for i, level in enumerate(self.levels):
            depth = count - 1 - i  # index into self.grids (0 = finest)
            grid = self.grids[depth]
            inp = image if residual is None else image + residual
            feat = from_patches(level.encoder(to_patches(inp, grid)), grid, n)
            features = feat if features is None else feat + features
            if depth > 0:
                finer = self.grids[depth - 1]
                residual = from_patches(level.decoder(to_patches(features, finer)), finer, n)
            else:
                out = level.decoder(features)
        if self.residual:
            out = out + image
        return (out + 0.5)[..., :h, :w]


@register_model
def dmphn(
    scale: int = 1, levels: Sequence[int] = (1, 2, 4), widths: Sequence[int] = (32, 64, 128), blocks: int = 2
) -> DMPHN:
    """DMPHN 1-2-4 with the official encoder/decoder shapes (5.4M params)."""
    return DMPHN(scale, levels, widths, blocks)


@register_model
def dmphn_1_2_4_8(
    scale: int = 1,
    levels: Sequence[int] = (1, 2, 4, 8),
    widths: Sequence[int] = (32, 64, 128),
    blocks: int = 2,
) -> DMPHN:
    """DMPHN 1-2-4-8, the paper's four-level stack (7.2M params)."""
    return DMPHN(scale, levels, widths, blocks)


@register_model
def dmphn_small(
    scale: int = 1,
    levels: Sequence[int] = (1, 2),
    widths: Sequence[int] = (32, 32, 32),
    blocks: int = 1,
    residual: bool = True,
) -> DMPHN:
    """CPU preset: two levels (1-2), 32 channels at every stage, one residual block per stage, and a
    global skip (input + output) so that short CPU runs start from the identity."""
    return DMPHN(scale, levels, widths, blocks, residual=residual)
