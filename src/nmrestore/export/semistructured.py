"""The 2:4 GPU path: PyTorch's semi-structured sparse tensors for 1x1 convs and linears.

``torch.sparse.to_sparse_semi_structured`` stores a 2:4 matrix compressed (half the values plus
2-bit metadata) and runs matrix multiplies on the sparse tensor cores of NVIDIA Ampere and newer
GPUs (cuSPARSELt, or CUTLASS). It only does matrix multiplies, in fp16/bf16 (int8/fp8 aside), on
CUDA, with each dimension a multiple of a small block. So :func:`to_semi_structured_` swaps exactly
the layers that fit: 2:4 ``Linear`` layers and 2:4 1x1 ``Conv2d`` layers (stride 1, no padding, one
group: a 1x1 conv is a linear over channels). 3x3 convs stay masked and run dense; every layer not
swapped is listed with the reason. The 2:4 groups run along input channels, as ours do, so the
masks carry over unchanged.

The call is explicit and in place; it fails with :class:`SparsityError` naming why when the model
has no 2:4 layer, no layer the kernels can take, or is not on a CUDA GPU of compute capability 8.0+.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import SparsityError
from nmrestore.sparsity.parametrization import NMMask, nm_layers

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
#: Sparse-matrix (rows, cols) multiples when the backend's table cannot be read (CUTLASS fp16).
_FALLBACK_BLOCK = (32, 64)


@dataclass
class SemiStructuredReport:
    """Which 2:4 layers now run on semi-structured sparse weights, and why the others do not."""

    backend: str
    dtype: torch.dtype
    swapped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def table(self) -> str:
        lines = [
            f"2:4 semi-structured ({self.backend}, {str(self.dtype).removeprefix('torch.')}): "
            f"{len(self.swapped)} layer(s) swapped, {len(self.skipped)} left as they are"
        ]
        lines += [f"  sparse  {name}" for name in self.swapped]
        lines += [f"  kept    {name:<32} {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def _is_two_four(mask: NMMask) -> bool:
    """True when the active route is 2:4-compatible (M = 4, N <= 2)."""
    return mask.m == 4 and mask.n <= 2


def _shape_problem(module: nn.Module) -> str | None:
    """Why a 2:4 layer cannot become a matrix multiply (None when it can)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d):
        if module.kernel_size != (1, 1):
            k = "x".join(str(v) for v in module.kernel_size)
            return f"{k} conv (PyTorch's semi-structured kernels only do matrix multiplies: 1x1 convs and linears)"
        if module.stride != (1, 1) or module.padding not in ((0, 0), "valid") or module.dilation != (1, 1):
            return "1x1 conv with stride, padding or dilation"
        if module.groups != 1:
            return "grouped 1x1 conv"
        return None
    return f"{type(module).__name__} is not a Linear or Conv2d"


def _backend() -> tuple[type, str]:
    sparse = torch.sparse
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return sparse.SparseSemiStructuredTensorCUSPARSELT, "cuSPARSELt"
    return sparse.SparseSemiStructuredTensorCUTLASS, "CUTLASS"


def _block(cls: type, dtype: torch.dtype) -> tuple[int, int]:
    table = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {})
    config = table.get(dtype)
    if config is None:
        return _FALLBACK_BLOCK
    return int(config.sparse_min_rows), int(config.sparse_min_cols)


def _check_cuda(layers: list[tuple[str, nn.Module, NMMask]]) -> torch.device:
    if not torch.cuda.is_available():
        raise SparsityError(
            "the 2:4 semi-structured path needs a CUDA GPU (NVIDIA Ampere or newer, compute capability >= 8.0); "
            f"this PyTorch ({torch.__version__}) sees no CUDA device. On CPU, use the dense-with-zeros model "
            "(squash_) or export to ONNX"
        )
    name, module, _ = layers[0]
    device = module.parametrizations.weight.original.device
    if device.type != "cuda":
        raise SparsityError(
            f"the model is on {device} (layer {name!r}); move it to the GPU first (model.cuda()), "
            "the semi-structured kernels run on CUDA only"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        raise SparsityError(
            f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}; "
            "2:4 sparse tensor cores need 8.0 or newer (Ampere, Ada, Hopper...)"
        )
    return device


class SemiStructuredLinear(nn.Module):
    """``y = x W^T + b`` with a 2:4 semi-structured ``W``; casts to its dtype and back."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.in_features = int(weight.shape[1])
        self.out_features = int(weight.shape[0])

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.weight.dtype)
        y = F.linear(flat, self.weight, self.bias)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, 2:4 semi-structured"


class SemiStructuredConv1x1(SemiStructuredLinear):
    """A 1x1 convolution as a 2:4 semi-structured linear over channels (NCHW in and out)."""

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x.permute(0, 2, 3, 1))  # (N, H, W, O)
        return y.permute(0, 3, 1, 2)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@torch.no_grad()
def to_semi_structured_(model: nn.Module, dtype: torch.dtype = torch.float16) -> SemiStructuredReport:
    """Swap the model's 2:4 1x1 convs and linears for semi-structured sparse ones, in place.

    The active route's mask is baked in (multi-route layers keep only that route). The swapped
    layers compute in ``dtype`` (fp16 or bf16, what the kernels take) and cast their output back
    to the input's dtype, so they also work inside an fp32 model; run the model in ``dtype``
    (``model.half()``) to avoid the casts. Everything else is left as it is and listed.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise SparsityError(f"semi-structured sparse weights need float16 or bfloat16, not {dtype}")
    masked = list(nm_layers(model))
    if not masked:
        raise SparsityError(
            "the model has no N:M masks: call to_semi_structured_ on a sparsified model (before squash_), "
            "e.g. one from model_from_checkpoint or load_packed"
        )
    two_four = [(name, module, mask) for name, module, mask in masked if _is_two_four(mask)]
    if not two_four:
        found = sorted({f"{mask.n}:{mask.m}" for _, _, mask in masked})
        raise SparsityError(
            f"no 2:4 layer: the masks are {', '.join(found)}; PyTorch's semi-structured kernels only take 2:4 "
            "(N <= 2 of M = 4)"
        )
    report = SemiStructuredReport("", dtype)
    report.skipped += [
        (name, f"{mask.n}:{mask.m}, not 2:4") for name, _, mask in masked if not _is_two_four(mask)
    ]
    fitting = []
    for name, module, mask in two_four:
        problem = _shape_problem(module) if name else "the model itself is the layer (wrap it in a container)"
        if problem:
            report.skipped.append((name, problem))
        else:
            fitting.append((name, module, mask))
    if not fitting:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in report.skipped[:3])
        raise SparsityError(
            f"none of the model's 2:4 layers can run as a semi-structured matrix multiply ({reasons})"
        )
    _check_cuda(fitting)
    cls, report.backend = _backend()
    rows, cols = _block(cls, dtype)
    for name, module, _ in fitting:
        out_features, in_features = module.weight.shape[:2]
        if out_features % rows or in_features % cols:
            report.skipped.append(
                (
                    name,
                    f"{out_features}x{in_features} weight is not a multiple of the {rows}x{cols} sparse block",
                )
            )
            continue
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        weight = module.weight.detach().reshape(out_features, in_features).to(dtype).contiguous()
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        sparse_weight = cls.from_dense(weight)
        replacement_type = SemiStructuredLinear if isinstance(module, nn.Linear) else SemiStructuredConv1x1
        parent, child = _parent(model, name)
        setattr(parent, child, replacement_type(sparse_weight, bias))
        report.swapped.append(name)
    if not report.swapped:
        reasons = "; ".join(f"{name}: {reason}" for name, reason in report.skipped[-3:])
        raise SparsityError(f"no 2:4 layer fits the semi-structured kernels' block sizes ({reasons})")
    return report
