"""SLS: layer-wise N:M learned under a compute budget (Oh et al., CVPR 2022).

Every prunable layer learns its own N. It holds M-1 *priority scores* s (init 1);
``p = cumprod(clamp(s, 0, 1.03))`` and rank k >= 1 of every group of M is kept while p stays above
0.5, so N_l = 1 + (number of kept ranks) lies in 1..M and the mask is always "the N_l best ranks"
(magnitude ranks, refreshed periodically). The loss gets ``lam * coef * C / C_ref`` with
``C = sum_l N_l / M * cost_l``; ``coef`` grows by ``alpha`` whenever the compression ratio stalls.
As soon as C <= budget * C_ref every N is frozen and the run continues as plain fine-tuning.

What this module fixes in the published code (github JungHunOh/SLS_CVPR2022):

* it runs wherever the model runs (CPU or GPU); nothing is hard-wired to CUDA;
* it never ends above budget: past ``search_steps`` (or on :meth:`SLSController.finalize`) N is
  lowered where the learned scores are least sure, until the budget holds, and the run says so;
* the frozen N used for evaluation *is* the checkpoint's (``route_n`` + a ``frozen`` buffer in the
  model's ``state_dict``), never re-derived from scores that an optimizer may still move;
* the mask is always a prefix of the ranks: with the 1.03 clamp, p can climb back above 0.5 after
  a dip (0.45 * 1.03**4 > 0.5), which in the published code keeps rank 5 after dropping ranks 1-4.
  Here rank k is kept only if p_j > 0.5 for every j <= k.

Design choices (see the docstrings of :class:`SLSConfig` and :class:`SLSController` for details):
straight-through estimator with identity backward (the paper's); scores projected back into
[0, score_clamp] after each step so the clamp never traps them with zero gradient; the cost is
normalised (lambda does not depend on patch size or model size). As in the published code, the
ranks keep being re-selected after N is frozen and the annealing looks at the last epoch's growth;
the earlier nmrestore variants are options (``refresh_after_freeze=False``, ``anneal_rule="interval"``).

Layout: :mod:`.config` (the typed config), :mod:`.mask` (scores -> N -> mask), :mod:`.budget` (what
a budget counts), :mod:`.controller` (annealing, freezing, projection), :mod:`.handler` (registers
``"sls"`` with ``sparsify_``), :mod:`.report` (per-layer N table and chart). Importing this package
loads the config and the handler only.
"""

from nmrestore.methods.sls import handler as _handler  # noqa: F401  (registers "sls")
from nmrestore.methods.sls.config import SLSConfig

__all__ = ["SLSConfig"]
