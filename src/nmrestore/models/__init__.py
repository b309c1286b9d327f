"""The model zoo: EDSR, CARN, RFDN, MSRResNet, FSRCNN and RCAN, each with a CPU ``*_small`` preset.

Importing this package registers every builder, so ``create_model("edsr_baseline", scale=4)``
works after ``import nmrestore.models``. Every model has ``scale``, ``nm_dense_layers`` (its first
and last conv, kept dense by default) and maps (N, 3, h, w) in [0, 1] to (N, 3, h*scale, w*scale).
"""

from __future__ import annotations

# Importing each architecture module runs its @register_model decorators.
from nmrestore.models.carn import CARN
from nmrestore.models.common import count_params
from nmrestore.models.edsr import EDSR
from nmrestore.models.fsrcnn import FSRCNN
from nmrestore.models.msrresnet import MSRResNet
from nmrestore.models.multitask import MultiTaskSR as MultiTaskSR  # registers the multi-task models
from nmrestore.models.official import convert_official_state_dict, load_official
from nmrestore.models.rcan import RCAN
from nmrestore.models.registry import create_model, is_model, list_models, register_model
from nmrestore.models.rfdn import RFDN

__all__ = [
    "CARN",
    "EDSR",
    "FSRCNN",
    "RCAN",
    "RFDN",
    "MSRResNet",
    "convert_official_state_dict",
    "count_params",
    "create_model",
    "is_model",
    "list_models",
    "load_official",
    "register_model",
]
