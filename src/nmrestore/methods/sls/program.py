"""SLS on top of the engine: its eval hooks (it trains with the plain Trainer loop, no program).

Here rather than in the core because a hook subclasses the engine's
:class:`~nmrestore.engine.hooks.MethodHooks`; ``SLSConfig.eval_hooks`` names it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from nmrestore.cost import CostReport
from nmrestore.engine.hooks import MethodHooks
from nmrestore.methods.sls.config import SLSConfig
from nmrestore.methods.sls.report import achieved_budget, format_sls_table, sls_layer_table
from nmrestore.recipes.schema import Recipe


class SLSHooks(MethodHooks):
    """``eval`` adds the learned N per layer and the budget it achieved."""

    def eval_extras(self, model: nn.Module, recipe: Recipe, cost: CostReport) -> dict[str, Any]:
        config = recipe.sparsity
        assert isinstance(config, SLSConfig)
        rows = sls_layer_table(model, cost)
        achieved = achieved_budget(model, config)
        return {
            "sls_layers": rows,
            "sls_achieved_budget": achieved,
            "extra_lines": [
                format_sls_table(rows),
                f"SLS budget ({config.budget_kind}): achieved {achieved:.4f} <= {config.budget:.4f}",
            ],
        }
