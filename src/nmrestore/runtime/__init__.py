"""Sparse inference on an ordinary CPU: N:M layers on a direct sparse-convolution kernel.

``compile_sparse(model)`` returns a copy of a sparsified (or squashed) model whose N:M Conv2d and
Linear layers run on a C++ kernel built at first use (:mod:`nmrestore.runtime.kernel`), each layer
keeping dense PyTorch where that is faster for the input shape (timed on first use, cached).
``measure_speed`` compares it with the dense model, interleaved in one process.
``use_spatial_routes`` runs each tile of an image on its own route (:mod:`nmrestore.runtime.spatial`).
``EngineConfig(dense_runtime="openvino")`` hands an input shape to OpenVINO's dense model when that is
faster (:mod:`nmrestore.runtime.dense_runtime`). ``save_compiled`` / ``load_compiled`` keep a compiled model (packed weights and tactic decisions) in
one file that loads without re-packing or re-timing (:mod:`nmrestore.runtime.compiled`).
"""

from nmrestore.runtime import dense_runtime
from nmrestore.runtime.compiled import ModelBuild, is_compiled, load_compiled, read_compiled, save_compiled
from nmrestore.runtime.engine import (
    EngineConfig,
    EngineState,
    UntouchedLayer,
    compile_sparse,
    engine_state,
    format_decisions,
    reset_tactics,
    routed_layers,
    sparse_layers,
    use_spatial_routes,
)
from nmrestore.runtime.fusion import FusedResidual
from nmrestore.runtime.kernel import KernelStatus, kernel_status, load_kernel, reset_kernel
from nmrestore.runtime.layers import LayerDecision, SparseConv2d, SparseLayer, SparseLinear
from nmrestore.runtime.packing import CSRWeight, csr_from_dense, csr_from_packed, detect_nm
from nmrestore.runtime.spatial import RouteMap

__all__ = [
    "CSRWeight",
    "EngineConfig",
    "EngineState",
    "FusedResidual",
    "KernelStatus",
    "LayerDecision",
    "ModelBuild",
    "RouteMap",
    "SparseConv2d",
    "SparseLayer",
    "SparseLinear",
    "UntouchedLayer",
    "compile_sparse",
    "csr_from_dense",
    "csr_from_packed",
    "dense_runtime",
    "detect_nm",
    "engine_state",
    "format_decisions",
    "is_compiled",
    "kernel_status",
    "load_compiled",
    "load_kernel",
    "read_compiled",
    "reset_kernel",
    "reset_tactics",
    "routed_layers",
    "save_compiled",
    "sparse_layers",
    "use_spatial_routes",
]
