"""Training: the loop (:class:`Trainer`), optimizers, per-iteration LR schedules, metrics,
atomic checkpoints and BatchNorm recalibration (:func:`recalibrate_bn`)."""

from .bn import recalibrate_bn
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything
from .metrics import plot_curves, topk_correct, write_metrics
from .schedules import (
    SCHEDULERS,
    Constant,
    MultiStep,
    Step,
    WarmupCosine,
    WarmupLRScheduler,
    WarmupStep,
    build_scheduler,
)
from .trainer import (
    OPTIMIZERS,
    Hook,
    Trainer,
    TrainingDiverged,
    build_optimizer,
    evaluate,
    freeze_except,
    param_groups,
    validate_optimizer_spec,
)

__all__ = [
    "SCHEDULERS",
    "Constant",
    "MultiStep",
    "Step",
    "WarmupCosine",
    "WarmupLRScheduler",
    "WarmupStep",
    "build_scheduler",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
    "seed_everything",
    "plot_curves",
    "topk_correct",
    "write_metrics",
    "OPTIMIZERS",
    "Hook",
    "Trainer",
    "TrainingDiverged",
    "build_optimizer",
    "evaluate",
    "freeze_except",
    "param_groups",
    "validate_optimizer_spec",
    "recalibrate_bn",
]
