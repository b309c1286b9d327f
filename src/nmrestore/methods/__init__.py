"""Sparsification methods: each a typed config plus a handler registered with ``register_method``.

Importing this package registers every method with :func:`nmrestore.sparsify_`.
"""

from nmrestore.methods import (  # noqa: F401
    classpruning,
    filter,
    oneshot,
    png,
    sls,
    srste,
)
from nmrestore.methods.oneshot import OneShotConfig
from nmrestore.methods.srste import SRSTEConfig

__all__ = ["OneShotConfig", "SRSTEConfig"]
