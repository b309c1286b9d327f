"""nmrestore: N:M fine-grained structured sparsity for image-restoration networks.

The public API is re-exported here lazily (PEP 562), so ``import nmrestore`` stays cheap and each
layer is imported only when used::

    import nmrestore
    model = nmrestore.create_model("edsr_baseline", scale=2)
    report = nmrestore.sparsify_(model, nmrestore.NMConfig(n=2, m=4))
    print(nmrestore.count_cost(model).table())
    nmrestore.squash_(model)
    model, recipe = nmrestore.load("runs/x/checkpoints/last.safetensors")  # any checkpoint, packed or not
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "sparsify_": "nmrestore.sparsity",
    "squash_": "nmrestore.sparsity",
    "check_nm": "nmrestore.sparsity",
    "NMConfig": "nmrestore.sparsity",
    "GradMode": "nmrestore.sparsity",
    "set_route": "nmrestore.sparsity",
    "use_route": "nmrestore.sparsity",
    "refresh_": "nmrestore.sparsity",
    "count_cost": "nmrestore.cost",
    "create_model": "nmrestore.models",
    "list_models": "nmrestore.models",
    "register_model": "nmrestore.models",
    "NMRestoreError": "nmrestore.errors",
    "load_packed": "nmrestore.export",
    "load": "nmrestore.engine.loading",
}

__all__ = [*sorted(_EXPORTS), "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(_EXPORTS[name])
        if name in ("sparsify_",):
            importlib.import_module("nmrestore.methods")  # register every method's handler
        return getattr(module, name)
    raise AttributeError(f"module 'nmrestore' has no attribute {name!r}")
