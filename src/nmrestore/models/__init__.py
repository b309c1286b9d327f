"""The model zoo: EDSR, CARN, RFDN, MSRResNet, FSRCNN and RCAN for SR; U-Net and DMPHN for
deblurring; each with a CPU ``*_small`` preset. EDSR and RCAN also build at scale 1 (denoising).

Importing this package registers every builder, so ``create_model("edsr_baseline", scale=4)``
works after ``import nmrestore.models``. Every model has ``scale``, ``supported_scales``,
``nm_dense_layers`` (its first and last conv, kept dense by default) and maps (N, 3, h, w) in
[0, 1] to (N, 3, h*scale, w*scale); scale-1 models keep the size (any h, w).
"""

from __future__ import annotations

# Importing each architecture module runs its @register_model decorators.
from nmrestore.models.carn import CARN
from nmrestore.models.common import count_params
from nmrestore.models.dmphn import DMPHN
from nmrestore.models.edsr import EDSR
from nmrestore.models.fsrcnn import FSRCNN
from nmrestore.models.msrresnet import MSRResNet
from nmrestore.models.multitask import MultiTaskSR as MultiTaskSR  # registers the multi-task models
from nmrestore.models.official import convert_official_state_dict, load_official
from nmrestore.models.rcan import RCAN
from nmrestore.models.registry import create_model, is_model, list_models, register_model
from nmrestore.models.rfdn import RFDN
from nmrestore.models.unet import UNet

__all__ = [
    "CARN",
    "DMPHN",
    "EDSR",
    "FSRCNN",
    "RCAN",
    "RFDN",
    "MSRResNet",
    "UNet",
    "convert_official_state_dict",
    "count_params",
    "create_model",
    "is_model",
    "list_models",
    "load_official",
    "register_model",
]
