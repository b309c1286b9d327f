"""Load officially released weights (EDSR-PyTorch, RCAN, CARN, RFDN, BasicSR) into the zoo's models.

Layouts understood:

* EDSR-PyTorch / official RCAN / CARN / RFDN: a plain ``{name: tensor}`` dict, possibly with a
  ``module.`` (DataParallel), ``model.`` or ``_orig_mod.`` (torch.compile) prefix on every key.
* BasicSR: ``{"params": {...}}`` and/or ``{"params_ema": {...}}`` (EMA weights preferred).
  BasicSR's EDSR and RCAN use other names (``conv_first``, ``residual_group``, ``rcab``,
  ``conv_after_body``, ``upsample``, ``conv_last``); they are renamed to EDSR-PyTorch's.
  The old mmsr MSRResNet names (``recon_trunk``, ``HRconv``) are renamed too.
* CARN's multi-scale checkpoint (``upsample.up2/up3/up4``): the upsampler of the target scale is kept.

Input range. EDSR-PyTorch and RCAN train on [0, 255] (``rgb_range=255``; BasicSR's ports use
``img_range=255``), this library feeds [0, 1]. Conv weights are range-free; biases are not. Every
layer of these networks is affine, and ReLU/LeakyReLU/PReLU, max-pool, PixelShuffle, bilinear
resizing, residual sums and ``res_scale`` are positively homogeneous, so dividing every bias by
``r = rgb_range`` gives a network computing exactly ``f_r(r * x) / r``, with the mean shift
becoming ``rgb_mean * 1``. The exception is a conv whose output feeds a sigmoid (RCAN's channel
attention ``conv_du.2``, RFDN's ``esa.conv4``): its inputs are already divided by ``r``, so its
*weight* is multiplied by ``r`` and its bias kept, leaving the gate unchanged. The checkpoint's
range is read from its ``sub_mean`` bias (``-r * rgb_mean``) when present; otherwise it defaults
to 255 for EDSR/RCAN and 1 for the others.

Files are read with ``torch.load(weights_only=True)`` or safetensors, never with plain pickle.
"""

from __future__ import annotations

import math
import os
import pickle
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors
from torch import Tensor, nn
from torch.nn.utils import parametrize

from nmrestore.errors import CheckpointError, NMRestoreError
from nmrestore.models.common import DIV2K_RGB_MEAN

#: Keys under which wrappers keep the weights, in order of preference.
WRAPPER_KEYS: tuple[str, ...] = ("params_ema", "params", "state_dict", "model")
#: Prefixes that wrappers put in front of every key.
WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "model.", "_orig_mod.")

_MEAN_KEYS: tuple[str, ...] = ("sub_mean.weight", "sub_mean.bias", "add_mean.weight", "add_mean.bias")
_MAX_LISTED = 6

StateDict = dict[str, Tensor]


def _rename(state_dict: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> StateDict:
    """Apply the first matching ``(regex, replacement)`` rule to each key."""
    out: StateDict = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, repl in rules:
            new_key, hits = re.subn(pattern, repl, key)
            if hits:
                break
        if new_key in out:
            raise CheckpointError(f"two checkpoint keys map to {new_key!r}")
        out[new_key] = value
    return out


def _indices(state_dict: Mapping[str, Tensor], pattern: str) -> set[int]:
    return {int(m.group(1)) for key in state_dict if (m := re.match(pattern, key))}


def _count(state_dict: Mapping[str, Tensor], pattern: str, what: str) -> int:
    found = _indices(state_dict, pattern)
    if found != set(range(len(found))):
        raise CheckpointError(f"the checkpoint's {what} are not numbered 0..n-1: {sorted(found)}")
    return len(found)


def _rename_edsr(state_dict: StateDict, scale: int | None) -> StateDict:
    if "conv_first.weight" not in state_dict:  # EDSR-PyTorch layout: already ours
        return state_dict
    n_blocks = _count(state_dict, r"^body\.(\d+)\.conv1\.weight$", "residual blocks")
    return _rename(
        state_dict,
        [
            (r"^conv_first\.", "head.0."),
            (r"^body\.(\d+)\.conv1\.", r"body.\1.body.0."),
            (r"^body\.(\d+)\.conv2\.", r"body.\1.body.2."),
            (r"^conv_after_body\.", f"body.{n_blocks}."),
            (r"^upsample\.", "tail.0."),
            (r"^conv_last\.", "tail.1."),
        ],
    )


def _rename_rcan(state_dict: StateDict, scale: int | None) -> StateDict:
    if "conv_first.weight" not in state_dict:
        return state_dict
    n_groups = _count(state_dict, r"^body\.(\d+)\.conv\.weight$", "residual groups")
    n_blocks = _count(state_dict, r"^body\.0\.residual_group\.(\d+)\.rcab\.0\.weight$", "RCABs")
    return _rename(
        state_dict,
        [
            (r"^conv_first\.", "head.0."),
            (r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.0\.", r"body.\1.body.\2.body.0."),
            (r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.2\.", r"body.\1.body.\2.body.2."),
            (
                r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.3\.attention\.1\.",
                r"body.\1.body.\2.body.3.conv_du.0.",
            ),
            (
                r"^body\.(\d+)\.residual_group\.(\d+)\.rcab\.3\.attention\.3\.",
                r"body.\1.body.\2.body.3.conv_du.2.",
            ),
            (r"^body\.(\d+)\.conv\.", rf"body.\1.body.{n_blocks}."),
            (r"^conv_after_body\.", f"body.{n_groups}."),
            (r"^upsample\.", "tail.0."),
            (r"^conv_last\.", "tail.1."),
        ],
    )


def _rename_carn(state_dict: StateDict, scale: int | None) -> StateDict:
    out = _rename(state_dict, [(r"^(sub_mean|add_mean)\.shifter\.", r"\1.")])
    scales = sorted(_indices(out, r"^upsample\.up(\d+)\."))
    if not scales:
        return out
    if scale is None:
        raise CheckpointError(
            f"multi-scale CARN checkpoint (upsamplers x{', x'.join(map(str, scales))}): pass scale= to pick one"
        )
    if scale not in scales:
        raise CheckpointError(
            f"the CARN checkpoint has upsamplers for x{', x'.join(map(str, scales))}, not for x{scale}"
        )
    kept: StateDict = {}
    for key, value in out.items():
        m = re.match(r"^upsample\.up(\d+)\.(.*)$", key)
        if m is None:
            kept[key] = value
        elif int(m.group(1)) == scale:
            kept[f"upsample.up.{m.group(2)}"] = value
    return kept


def _rename_msrresnet(state_dict: StateDict, scale: int | None) -> StateDict:
    return _rename(state_dict, [(r"^recon_trunk\.", "body."), (r"^HRconv\.", "conv_hr.")])


def _keep(state_dict: StateDict, scale: int | None) -> StateDict:
    return state_dict


@dataclass(frozen=True)
class _Arch:
    """How one architecture's official checkpoints differ from our layout."""

    rename: Callable[[StateDict, int | None], StateDict]
    default_rgb_range: float
    #: convs whose output feeds a sigmoid (their weight, not their bias, absorbs the range)
    gate_pattern: str | None
    #: first conv and upsampler convs, to tell the user which scale a checkpoint was built for
    first_conv: str
    upsampler_pattern: str
    #: True if a single upsampler conv has ``n_colors * s^2`` outputs (RFDN), not ``n_feats * s^2``
    upsamples_to_colors: bool = False


_ARCHS: dict[str, _Arch] = {
    "edsr": _Arch(_rename_edsr, 255.0, None, "head.0.weight", r"^tail\.0\.\d+\.weight$"),
    "rcan": _Arch(_rename_rcan, 255.0, r"\.conv_du\.2$", "head.0.weight", r"^tail\.0\.\d+\.weight$"),
    "carn": _Arch(_rename_carn, 1.0, None, "entry.weight", r"^upsample\.up\.body\.\d+\.weight$"),
    "rfdn": _Arch(_keep, 1.0, r"\.esa\.conv4$", "fea_conv.weight", r"^upsampler\.0\.weight$", True),
    "msrresnet": _Arch(_rename_msrresnet, 1.0, None, "conv_first.weight", r"^upconv\d\.weight$"),
    "fsrcnn": _Arch(_keep, 1.0, None, "first_part.0.weight", r"$^"),
}


def arch_of(model_name: str) -> str:
    """Architecture family of a model name (``edsr_baseline`` -> ``edsr``)."""
    arch = model_name.split("_", 1)[0]
    if arch not in _ARCHS:
        raise NMRestoreError(
            f"no official checkpoint layout is known for model {model_name!r}; known: {', '.join(_ARCHS)}"
        )
    return arch


def unwrap_state_dict(checkpoint: object, param_key: str | None = None) -> StateDict:
    """The ``{name: tensor}`` dict inside ``checkpoint``, without wrapper keys or key prefixes."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict of tensors, got {type(checkpoint).__name__}")
    if param_key is not None:
        if param_key not in checkpoint:
            raise CheckpointError(f"the checkpoint has no {param_key!r} key; it has: {_listing(checkpoint)}")
        checkpoint = checkpoint[param_key]
    else:
        while isinstance(checkpoint, Mapping) and not all(isinstance(v, Tensor) for v in checkpoint.values()):
            wrapper = next((k for k in WRAPPER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
            if wrapper is None:
                break
            checkpoint = checkpoint[wrapper]
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(
            f"the checkpoint's weights must be a dict of tensors, got {type(checkpoint).__name__}"
        )
    bad = [str(k) for k, v in checkpoint.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"the checkpoint is not a dict of tensors (non-tensor entries: {_listing(bad)}); "
            f"BasicSR files keep weights under one of {', '.join(WRAPPER_KEYS[:2])}"
        )
    state_dict: StateDict = dict(checkpoint)
    for prefix in WRAPPER_PREFIXES:
        while state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _checkpoint_rgb_range(state_dict: StateDict) -> float | None:
    """The training ``rgb_range`` implied by an official ``sub_mean`` (bias ``-r * mean``), if any."""
    if "sub_mean.bias" not in state_dict:
        return None
    mean = torch.tensor(DIV2K_RGB_MEAN, dtype=torch.float64)
    bias = state_dict["sub_mean.bias"].detach().to("cpu", torch.float64).flatten()
    weight = state_dict.get("sub_mean.weight")
    if weight is not None:
        eye = torch.eye(3, dtype=torch.float64)
        if weight.numel() != 9 or not torch.allclose(
            weight.detach().to("cpu", torch.float64).reshape(3, 3), eye
        ):
            raise CheckpointError(
                "the checkpoint's sub_mean is not an identity 1x1 conv (rgb_std != 1 is unsupported)"
            )
    if bias.numel() != 3:
        raise CheckpointError(f"the checkpoint's sub_mean.bias has {bias.numel()} values, expected 3")
    ranges = -bias / mean
    r = float(ranges.mean())
    if not (r > 0 and torch.allclose(ranges, torch.full_like(ranges, r), rtol=1e-3)):
        raise CheckpointError(
            f"the checkpoint's sub_mean.bias {bias.tolist()} is not -rgb_range * the DIV2K mean {DIV2K_RGB_MEAN}"
        )
    if "add_mean.bias" in state_dict:
        add = state_dict["add_mean.bias"].detach().to("cpu", torch.float64).flatten()
        if add.numel() != 3 or not torch.allclose(add, mean * r, rtol=1e-3):
            raise CheckpointError("the checkpoint's add_mean.bias does not undo its sub_mean.bias")
    return r


def _rescale(state_dict: StateDict, factor: float, gate_pattern: str | None) -> StateDict:
    """Turn weights trained on [0, factor * target] inputs into ones for [0, target] (see module doc)."""
    if factor == 1.0:
        return state_dict
    out: StateDict = {}
    for key, value in state_dict.items():
        module, _, name = key.rpartition(".")
        is_gate = gate_pattern is not None and re.search(gate_pattern, module) is not None
        if is_gate and name == "weight":
            value = value * factor
        elif not is_gate and name == "bias":
            value = value / factor
        out[key] = value
    return out


def convert_official_state_dict(
    model_name: str,
    state_dict: Mapping[str, object],
    *,
    scale: int | None = None,
    rgb_range: float | None = None,
    target_rgb_range: float = 1.0,
    param_key: str | None = None,
) -> StateDict:
    """Rename an official checkpoint's keys to ours and rescale it from its input range to ours.

    ``state_dict`` may be the raw loaded object (BasicSR wrapper, ``module.`` prefixes...).
    ``scale`` picks the upsampler of a multi-scale CARN checkpoint. ``rgb_range`` is the range the
    checkpoint was trained on; when omitted it is read from the checkpoint's mean shift or defaults
    to the architecture's (255 for EDSR/RCAN, 1 otherwise). Raises :class:`CheckpointError` if the
    given range contradicts the checkpoint's.
    """
    spec = _ARCHS[arch_of(model_name)]
    converted = spec.rename(unwrap_state_dict(state_dict, param_key), scale)
    found_range = _checkpoint_rgb_range(converted)
    if rgb_range is not None:
        if not (math.isfinite(rgb_range) and rgb_range > 0):
            raise NMRestoreError(f"rgb_range must be positive, got {rgb_range}")
        if found_range is not None and not math.isclose(found_range, rgb_range, rel_tol=1e-3):
            raise CheckpointError(
                f"rgb_range={rgb_range:g} was given but the checkpoint's mean shift says {found_range:g}"
            )
    source_range = rgb_range or found_range or spec.default_rgb_range
    converted = {k: v for k, v in converted.items() if k not in _MEAN_KEYS}
    return _rescale(converted, source_range / target_rgb_range, spec.gate_pattern)


def _loadable_tensors(model: nn.Module) -> StateDict:
    """Our state-dict names -> the tensors to fill, with parametrized weights' ``original``.

    N:M masks live in parametrizations; an official checkpoint fills the dense originals under
    them and leaves the masks alone, so loading works before or after sparsifying.
    """
    out: StateDict = {}
    for module_name, module in model.named_modules():
        if "parametrizations" in module_name.split("."):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, param in module.named_parameters(recurse=False):
            out[prefix + name] = param
        for name, buf in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                out[prefix + name] = buf
        if parametrize.is_parametrized(module):
            for name, plist in module.parametrizations.items():
                out[prefix + name] = plist.original
    return out


def _listing(names: Iterable[object]) -> str:
    items = sorted(str(n) for n in names)
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else "")


def guess_scale(model_name: str, state_dict: Mapping[str, Tensor]) -> int | None:
    """The upscaling factor a converted checkpoint was built for, from its upsampler's shapes."""
    spec = _ARCHS[arch_of(model_name)]
    first = state_dict.get(spec.first_conv)
    convs = [v for k, v in sorted(state_dict.items()) if re.match(spec.upsampler_pattern, k)]
    if first is None or not convs or first.dim() != 4:
        return None
    if len(convs) >= 2:
        return 2 ** len(convs)
    ratio = convs[0].shape[0]
    unit = first.shape[1] if spec.upsamples_to_colors else first.shape[0]
    if unit == 0 or ratio % unit:
        return None
    s = math.isqrt(ratio // unit)
    return s if s * s == ratio // unit else None


def read_checkpoint(path: str | os.PathLike[str]) -> object:
    """Load a checkpoint file safely: safetensors, or ``torch.load(weights_only=True)``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read safetensors file {path}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a weights-only checkpoint (it holds Python objects torch.load(weights_only=True) "
            "refuses); re-save its state_dict or convert it to safetensors"
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_official(
    model: nn.Module,
    path_or_state_dict: str | os.PathLike[str] | Mapping[str, object],
    *,
    model_name: str | None = None,
    rgb_range: float | None = None,
    param_key: str | None = None,
) -> nn.Module:
    """Fill ``model`` with official weights (a file or an already loaded dict) and return it.

    Every tensor must match by name and shape: :class:`CheckpointError` lists missing keys,
    unexpected keys and shape mismatches, and says which scale the checkpoint looks built for.
    ``model_name`` defaults to the name ``create_model`` recorded (else the model's ``arch``).
    """
    name = model_name or getattr(model, "model_name", None) or getattr(model, "arch", None)
    if not isinstance(name, str):
        raise NMRestoreError("cannot tell the model's architecture; pass model_name=")
    scale = getattr(model, "scale", None)
    if isinstance(path_or_state_dict, Mapping):
        checkpoint: object = path_or_state_dict
        source = "the state dict"
    else:
        checkpoint = read_checkpoint(path_or_state_dict)
        source = str(path_or_state_dict)
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source} holds a {type(checkpoint).__name__}, not a dict of tensors")
    converted = convert_official_state_dict(
        name,
        checkpoint,
        scale=scale if isinstance(scale, int) else None,
        rgb_range=rgb_range,
        target_rgb_range=float(getattr(model, "rgb_range", 1.0)),
        param_key=param_key,
    )
    targets = _loadable_tensors(model)
    missing = targets.keys() - converted.keys()
    unexpected = converted.keys() - targets.keys()
    mismatched = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(targets[k].shape)}"
        for k in sorted(targets.keys() & converted.keys())
        if converted[k].shape != targets[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_listing(mismatched)}")
        hint = ""
        ckpt_scale = guess_scale(name, converted)
        if ckpt_scale is not None and ckpt_scale != scale:
            hint = f"; the checkpoint looks like a x{ckpt_scale} model"
        raise CheckpointError(f"{source} does not fit {name} (scale {scale}): {'; '.join(parts)}{hint}")
    with torch.no_grad():
        for key, target in targets.items():
            target.copy_(converted[key])
    return model
