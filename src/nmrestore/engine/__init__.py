"""Training engine: Trainer (one process or torchrun DDP), checkpoints, evaluation, recipe runner."""

from nmrestore.engine.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nmrestore.engine.evaluate import EvalResult, bicubic_restorer, evaluate_fn, evaluate_model
from nmrestore.engine.runner import RunResult, model_from_checkpoint, train
from nmrestore.engine.task import RestorationTask
from nmrestore.engine.trainer import Trainer, TrainState, lr_factor

__all__ = [
    "Checkpoint",
    "EvalResult",
    "RestorationTask",
    "RunResult",
    "TrainState",
    "Trainer",
    "bicubic_restorer",
    "evaluate_fn",
    "evaluate_model",
    "load_checkpoint",
    "lr_factor",
    "model_from_checkpoint",
    "save_checkpoint",
    "train",
]
