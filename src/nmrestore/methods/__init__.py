"""Sparsification methods: each a typed config plus a handler registered with ``register_method``.

Importing this package registers every method with :func:`nmrestore.sparsify_`. A method's package
imports its config and handler only; training programs (``<method>.program``) build on the engine
and are imported by whoever runs them (see docs/ARCHITECTURE.md).
"""

from nmrestore.methods.classpruning import ClassPruningConfig
from nmrestore.methods.filter import FilterConfig
from nmrestore.methods.oneshot import OneShotConfig
from nmrestore.methods.png import PNGConfig
from nmrestore.methods.sls import SLSConfig
from nmrestore.methods.srste import SRSTEConfig

__all__ = ["ClassPruningConfig", "FilterConfig", "OneShotConfig", "PNGConfig", "SLSConfig", "SRSTEConfig"]
