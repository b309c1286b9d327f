"""PNG: one network for several tasks through N:M prune-and-grow.

After "Micro-Structured Prune-and-Grow Networks for Flexible Image Restoration" (Jiang et al.,
CVPRW 2021), known from its abstract; the algorithm below is this project's design.

Tasks come in order (SR x2, x3, x4 by default). Layers whose shape differs per task (a
multi-task model's upsamplers, see :mod:`nmrestore.models.multitask`) belong to one task; every
other prunable layer is *shared* and each task sees it through its own N:M mask (one route per
task). Per task t:

1. **train** -- task 1 trains densely; a later task *grows*: every position that no earlier task
   keeps becomes trainable again, and task t trains on (earlier tasks' positions, frozen) + (free
   positions, trainable);
2. **prune** -- task t keeps the top N_t of that union in every group of M (magnitude), optionally
   taking at most ``max_grow`` free positions per group, so storage has a hard bound;
3. **finetune** -- task t fine-tunes only its own kept weights; unused free positions return to
   the pool, and everything task t keeps is frozen for the tasks after it.

Freezing is exact: frozen entries get zero gradient (a hook), fully frozen tensors leave the
optimizer (``requires_grad=False``), and after every optimizer step the frozen entries are copied
back from a snapshot, so neither Adam's moments nor weight decay can move them. Earlier tasks
therefore compute bit-identical outputs while later tasks train. Shared dense layers (the first
and last conv) and the biases of shared layers belong to task 1 and are frozen after it.

Masks are not nested rank prefixes here (task t keeps the top N_t of *its* union), so
:class:`PNGMask` holds them as bits: ``task_bits`` (uint8, bit t = task t keeps the weight), in the
``state_dict`` like every other mask state; ``route_n[t]`` is N_t (M while task t is unpruned).

Storage (:func:`png_storage`) is measured on a real packed format (:func:`pack_png`): the values
of the union of kept shared positions, one mask per task (bitmap or packed in-group indices,
whichever is smaller), the dense shared layers, and each task's own layers packed at N_t:M.
:func:`unpack_png_` restores every task bit-exactly from it.

Layout: :mod:`.config`, :mod:`.mask` (task bits, prune/grow choices), :mod:`.tasks` (task ownership
and the task switch), :mod:`.controller` (phases, exact freezing), :mod:`.handler` (registers
``"png"``), :mod:`.packing` and :mod:`.storage` (storage form and report), :mod:`.program` (the
task-by-task training schedule ``nmrestore train`` runs; it imports the engine, so this package's
``__init__`` never imports it).
"""

from nmrestore.methods.png import handler as _handler  # noqa: F401  (registers "png")
from nmrestore.methods.png.config import PNGConfig

__all__ = ["PNGConfig"]
