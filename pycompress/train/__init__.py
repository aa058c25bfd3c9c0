"""Training utilities. For now: per-iteration learning-rate schedules (see :mod:`.schedules`)."""
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

__all__ = [
    "SCHEDULERS",
    "Constant",
    "MultiStep",
    "Step",
    "WarmupCosine",
    "WarmupLRScheduler",
    "WarmupStep",
    "build_scheduler",
]
