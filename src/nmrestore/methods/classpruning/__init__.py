"""ClassPruning: input-adaptive N:M, one network, K nested routes chosen per patch.

A light classifier (ClassSR's, Kong et al. CVPR 2021) rates each 32x32 LR patch and sends it to
one of K *routes*: N:M subnetworks cut from the **same** weights by nested masks (``rank < N_k``),
so easy patches run a sparser network and the parameters are stored once (ClassSR keeps K separate
networks and doubles the parameters).

* :class:`ClassPruningConfig`: routes (uniform N per route, or per-route budgets searched by SLS),
  the classifier, the labelling rule and the three stages' settings (``sparsity:`` in a recipe).
* :class:`RouteClassifier`: ClassSR's condition net (4x4 stride-4 conv, 1x1 convs, global pool,
  linear to K), plus two buffers: each route's MACs as a fraction of dense and a *cost shift*
  ``tau`` so that the decision is ``argmax_k(logit_k - tau * cost_k)`` (``tau`` is calibrated on
  held-out patches to meet the target average MACs, and is a run-time knob).
* Labels: :func:`delta_labels` (the cheapest route within ``delta`` dB of the full route),
  :func:`quantile_labels` (ClassSR's PSNR terciles, for any K) and :func:`budget_labels` (the
  assignment with the least total squared error whose average MACs meet the target).
* Losses on the routing probabilities: :func:`class_loss` (ClassSR's, generalised to K),
  :func:`equal_split_loss` (ClassSR's "average loss", generalised) and :func:`budget_loss`
  (expected MACs pulled towards a target).

The handler registered as ``"classpruning"`` attaches an :class:`~nmrestore.sparsity.NMMask` with
K routes to every eligible layer, makes the full (last) route active so a plain ``model(x)`` is
the full network, and attaches the classifier as the submodule ``nm_route_classifier`` so one
checkpoint restores masks, routes and classifier together.

Layout: :mod:`.config`, :mod:`.classifier` (classifier, route MACs, cost shift), :mod:`.labels`,
:mod:`.losses`, :mod:`.routes` (per-layer N of each route), :mod:`.handler` (registers
``"classpruning"``), :mod:`.patches` and :mod:`.pipeline` (patch inference), :mod:`.classmap`, and
:mod:`.program` (the staged training, the evaluation through the pipeline; it imports the engine,
so this package's ``__init__`` never imports it). The benchmark rows are in
:mod:`nmrestore.bench.classpruning`.
"""

from nmrestore.methods.classpruning import handler as _handler  # noqa: F401  (registers "classpruning")
from nmrestore.methods.classpruning.config import ClassPruningConfig

__all__ = ["ClassPruningConfig"]
