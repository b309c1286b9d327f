"""Filter (channel) pruning to a MAC target: the structured baseline of the SLS tables.

Whole output channels are removed, ranked by their group L1 norm, through Torch-Pruning's
:class:`~torch_pruning.DependencyGraph`, which keeps coupled layers consistent: EDSR's residual adds
tie the head conv, every block's second conv and the body's last conv into one group of channels
(pruned together), while each block's inner channels form a group of their own.

Two kinds of layer need care because their channel count is tied to the data layout:

* a convolution whose output reaches the network output (the image's colour channels) keeps all
  its output channels (it is listed in :attr:`~.controller.FilterReport.protected`); its inputs still shrink;
* a convolution feeding a ``PixelShuffle(r)`` (the sub-pixel upsampler) holds ``C * r**2``
  channels that Torch-Pruning would couple one-to-one with the next conv's ``C`` inputs, which is
  wrong. It is kept out of Torch-Pruning and pruned here instead, in blocks of ``r**2`` rows
  together with the matching input channel of every consumer (a "sub-pixel group"). Without this
  the x4 upsampler's second conv, a third of EDSR-baseline x4's MACs, could never shrink and the
  low budgets (8:32 and below) would be out of reach.

**Which channels, how many.** The number of channels per group is planned before any weight is
touched: starting from the dense model, one channel at a time is taken from the group with the
largest kept fraction (ties: graph order), skipping a removal that would land more than
``tolerance`` below the target, until the whole-network MACs reach ``target * dense MACs`` (or
the closest point within ``tolerance``, relative, that one more channel can reach). So every group keeps about the same fraction of its channels (the
uniform-ratio variant of L1 filter pruning), the small groups make the fine adjustment, and the
resulting *shapes* depend only on the architecture and the target, never on the weights. That is
what lets a pruned checkpoint be rebuilt by pruning a freshly built model again (see
:attr:`~.config.FilterConfig.changes_shapes`). The L1 norms then only choose *which* channels go: per
channel, the mean over the group's layers of that channel's L1 norm (Torch-Pruning's
``MagnitudeImportance(p=1, group_reduction="mean")``; filters and the consumers' input slices).
MACs are predicted per layer from one :func:`~nmrestore.cost.count_cost` of the model (a layer's
MACs scale with ``weight.shape[0] * weight.shape[1]``) and the result is measured with
``count_cost`` again; a mismatch re-plans from the pruned model.

Filter pruning changes shapes, so it does not fit the mask model of :func:`~nmrestore.sparsify_`:
registered as method ``"filter"``, its handler prunes the model in place, attaches no mask and
returns a :class:`~.controller.FilterController` whose ``state_dict`` (saved in every checkpoint's meta by the
Trainer) records the pruned shapes.

Layout: :mod:`.config`, :mod:`.graph` (channel groups), :mod:`.prune` (planning and pruning),
:mod:`.controller` (the report and controller), :mod:`.handler` (registers ``"filter"``).
"""

from nmrestore.methods.filter import handler as _handler  # noqa: F401  (registers "filter")
from nmrestore.methods.filter.config import FilterConfig

__all__ = ["FilterConfig"]
