"""Per-iteration learning-rate schedules (SPEC section 1).

Every class here is a :class:`torch.optim.lr_scheduler.LRScheduler` whose LR is a closed-form
function of the iteration index ``i = last_epoch`` (the name is PyTorch's; here it counts
iterations). Construction sets the LR for ``i = 0``; call ``scheduler.step()`` once per iteration,
after ``optimizer.step()``. ``lr`` below is each param group's initial LR (``group["initial_lr"]``,
i.e. the optimizer's LR when the scheduler was created), so per-group LRs are honoured.

Optional linear warm-up (all classes; ``W = warmup_iters``, default 0; ``base_lr`` default 0, a
float or one value per param group)::

    i < W:   base_lr + (lr - base_lr) * i / W

After the warm-up (``i >= W``):

* :class:`WarmupCosine` ``(optimizer, total_iters, warmup_iters=0, base_lr=0.0)``:
  ``0.5 * (1 + cos(pi * (i - W) / (T - W))) * lr`` with ``T = total_iters > W``; for ``i >= T``
  the LR stays at 0 (``i`` is clamped to ``T``).
* :class:`MultiStep` ``(optimizer, milestones, gamma=0.1)``: ``lr * gamma ** k``, ``k`` = number of
  milestones ``<= i`` (milestones are absolute iteration indices, strictly increasing).
* :class:`WarmupStep` ``(optimizer, milestones, gamma=0.1, warmup_iters=0, base_lr=0.0)``: the same
  with warm-up (the milestones still count from iteration 0).
* :class:`Step` ``(optimizer, step_size, gamma=0.1)``: ``lr * gamma ** (i // step_size)``.
* :class:`Constant` ``(optimizer)``: ``lr``.

``state_dict()`` / ``load_state_dict()`` restore the position exactly. ``load_state_dict`` also
writes the LR of the restored iteration into the optimizer, so a resumed run gives the same LR
sequence even with a fresh optimizer whose state was not loaded.

:func:`build_scheduler` builds one of these from a dict with epoch-based keys.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = [
    "WarmupLRScheduler",
    "WarmupCosine",
    "WarmupStep",
    "Step",
    "MultiStep",
    "Constant",
    "build_scheduler",
    "SCHEDULERS",
]


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _int(key: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"scheduler: {key!r} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"scheduler: {key!r} must be >= {minimum}, got {value!r}")
    return int(value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"scheduler: {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"scheduler: {key!r} must be finite, got {value!r}")
    return value


def _gamma(value: Any) -> float:
    g = _float("gamma", value)
    if g <= 0:
        raise ValueError(f"scheduler: 'gamma' must be > 0, got {value!r}")
    return g


def _milestones(value: Any) -> list[int]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"scheduler: 'milestones' must be a list of integers, got {value!r}")
    ms = [_int("milestones", m, 0) for m in value]
    if any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"scheduler: 'milestones' must be strictly increasing, got {list(value)!r}")
    return ms


# ---------------------------------------------------------------------------------------------
# schedulers
# ---------------------------------------------------------------------------------------------
class WarmupLRScheduler(LRScheduler):
    """Base class: linear warm-up from ``base_lr`` then :meth:`_after_warmup`.

    Subclasses set their own attributes BEFORE calling ``super().__init__`` (which performs the
    initial step) and implement ``_after_warmup(i, lr)``.
    """

    def __init__(
        self, optimizer: Optimizer, warmup_iters: int = 0, base_lr: float | Sequence[float] = 0.0, last_epoch: int = -1
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        self.warmup_iters = _int("warmup_iters", warmup_iters, 0)
        n = len(optimizer.param_groups)
        if isinstance(base_lr, (int, float)) and not isinstance(base_lr, bool):
            starts = [_float("base_lr", base_lr)] * n
        elif isinstance(base_lr, Sequence) and not isinstance(base_lr, (str, bytes)):
            if len(base_lr) != n:
                raise ValueError(f"scheduler: 'base_lr' has {len(base_lr)} values for {n} param groups")
            starts = [_float("base_lr", b) for b in base_lr]
        else:
            raise ValueError(f"scheduler: 'base_lr' must be a number or one number per param group, got {base_lr!r}")
        if any(b < 0 for b in starts):
            raise ValueError(f"scheduler: 'base_lr' must be >= 0, got {base_lr!r}")
        self.warmup_base_lrs = starts
        super().__init__(optimizer, last_epoch)

    # -- formula ------------------------------------------------------------------------------
    def _after_warmup(self, i: int, lr: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def lr_at(self, i: int) -> list[float]:
        """The LR of every param group at iteration ``i`` (pure function of ``i``)."""
        out = []
        for lr, start in zip(self.base_lrs, self.warmup_base_lrs):
            lr = float(lr)
            if i < self.warmup_iters:
                out.append(start + (lr - start) * i / self.warmup_iters)
            else:
                out.append(self._after_warmup(i, lr))
        return out

    def get_lr(self) -> list[float]:
        return self.lr_at(max(self.last_epoch, 0))

    def _get_closed_form_lr(self) -> list[float]:
        return self.lr_at(max(self.last_epoch, 0))

    # -- resume -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the position and write the restored iteration's LR into the optimizer."""
        super().load_state_dict(state_dict)
        values = self.lr_at(max(self.last_epoch, 0))
        if len(values) != len(self.optimizer.param_groups):
            raise ValueError(
                f"scheduler: state has {len(values)} param groups, the optimizer has {len(self.optimizer.param_groups)}"
            )
        for group, lr in zip(self.optimizer.param_groups, values):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = [
            g["lr"].clone() if isinstance(g["lr"], torch.Tensor) else g["lr"] for g in self.optimizer.param_groups
        ]


class WarmupCosine(WarmupLRScheduler):
    """Linear warm-up then half-cosine decay to 0 at ``total_iters`` (MicroNet)."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_iters: int,
        warmup_iters: int = 0,
        base_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.total_iters = _int("total_iters", total_iters, 1)
        w = _int("warmup_iters", warmup_iters, 0)
        if w >= self.total_iters:
            raise ValueError(f"scheduler: 'warmup_iters' ({w}) must be < 'total_iters' ({self.total_iters})")
        super().__init__(optimizer, warmup_iters, base_lr, last_epoch)

    def _after_warmup(self, i: int, lr: float) -> float:
        i = min(i, self.total_iters)
        w = self.warmup_iters
        return 0.5 * (1.0 + math.cos(math.pi * (i - w) / (self.total_iters - w))) * lr


class MultiStep(WarmupLRScheduler):
    """``lr * gamma ** (number of milestones <= i)`` (milestones in iterations)."""

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        base_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.milestones = _milestones(milestones)
        self.gamma = _gamma(gamma)
        super().__init__(optimizer, warmup_iters, base_lr, last_epoch)

    def _after_warmup(self, i: int, lr: float) -> float:
        return lr * self.gamma ** bisect.bisect_right(self.milestones, i)


class WarmupStep(MultiStep):
    """Linear warm-up then multi-step decay at ``milestones`` (iterations, counted from 0)."""

    def __init__(
        self,
        optimizer: Optimizer,
        milestones: Sequence[int],
        gamma: float = 0.1,
        warmup_iters: int = 0,
        base_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        super().__init__(optimizer, milestones, gamma, warmup_iters, base_lr, last_epoch)


class Step(WarmupLRScheduler):
    """``lr * gamma ** (i // step_size)``."""

    def __init__(
        self,
        optimizer: Optimizer,
        step_size: int,
        gamma: float = 0.1,
        warmup_iters: int = 0,
        base_lr: float | Sequence[float] = 0.0,
        last_epoch: int = -1,
    ) -> None:
        self.step_size = _int("step_size", step_size, 1)
        self.gamma = _gamma(gamma)
        super().__init__(optimizer, warmup_iters, base_lr, last_epoch)

    def _after_warmup(self, i: int, lr: float) -> float:
        return lr * self.gamma ** (i // self.step_size)


class Constant(WarmupLRScheduler):
    """Constant ``lr`` (after the optional warm-up)."""

    def __init__(
        self, optimizer: Optimizer, warmup_iters: int = 0, base_lr: float | Sequence[float] = 0.0, last_epoch: int = -1
    ) -> None:
        super().__init__(optimizer, warmup_iters, base_lr, last_epoch)

    def _after_warmup(self, i: int, lr: float) -> float:
        return lr


# ---------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------
SCHEDULERS = {
    "warmup_cosine": WarmupCosine,
    "warmup_step": WarmupStep,
    "multistep": MultiStep,
    "step": Step,
    "constant": Constant,
}
_NAME_ALIASES = {
    "cosine": "warmup_cosine",
    "warmupcosine": "warmup_cosine",
    "warmupstep": "warmup_step",
    "multi_step": "multistep",
}
_WARMUP_KEYS = {"warmup_epochs", "warmup_iters", "base_lr"}
_KIND_KEYS = {
    "warmup_cosine": {"epochs", "total_iters"} | _WARMUP_KEYS,
    "warmup_step": {"milestones", "milestone_iters", "gamma"} | _WARMUP_KEYS,
    "multistep": {"milestones", "milestone_iters", "gamma"} | _WARMUP_KEYS,
    "step": {"step_size", "step_size_iters", "gamma"} | _WARMUP_KEYS,
    "constant": set(_WARMUP_KEYS),
}


def _epochs_to_iters(key: str, value: Any, iters_per_epoch: int) -> int:
    e = _float(key, value)
    if e < 0:
        raise ValueError(f"scheduler: {key!r} must be >= 0, got {value!r}")
    return int(round(e * iters_per_epoch))


def _one_of(spec: Mapping[str, Any], epoch_key: str, iter_key: str, iters_per_epoch: int, required: bool) -> int | None:
    if epoch_key in spec and iter_key in spec:
        raise ValueError(f"scheduler: give either {epoch_key!r} or {iter_key!r}, not both")
    if epoch_key in spec:
        return _epochs_to_iters(epoch_key, spec[epoch_key], iters_per_epoch)
    if iter_key in spec:
        return _int(iter_key, spec[iter_key], 0)
    if required:
        raise ValueError(f"scheduler: missing {epoch_key!r} (or {iter_key!r})")
    return None


def build_scheduler(
    optimizer: Optimizer, spec: Mapping[str, Any], iters_per_epoch: int, default_epochs: float | None = None
) -> WarmupLRScheduler:
    """Build a per-iteration scheduler from a dict.

    Keys (epoch-valued keys may be fractional; they are converted with
    ``round(epochs * iters_per_epoch)``; each has an ``*_iters`` twin taking iterations directly,
    and giving both is an error):

    * ``name`` (required): ``warmup_cosine`` (alias ``cosine``), ``warmup_step``, ``multistep``,
      ``step`` or ``constant`` (class names like ``WarmupCosine`` also accepted).
    * ``warmup_epochs`` | ``warmup_iters`` (default 0), ``base_lr`` (warm-up start LR, default 0):
      all kinds.
    * ``epochs`` | ``total_iters``: total schedule length, required for ``warmup_cosine`` unless
      ``default_epochs`` (the training run's length) is given.
    * ``milestones`` (list of epochs) | ``milestone_iters`` (list of iterations): required for
      ``warmup_step`` / ``multistep``; ``gamma`` (default 0.1).
    * ``step_size`` (epochs) | ``step_size_iters``: required for ``step``; ``gamma`` (default 0.1).

    An unknown key, a key the chosen kind does not use, or a bad value raises ValueError naming
    the key. Example::

        build_scheduler(opt, {"name": "warmup_cosine", "epochs": 300, "warmup_epochs": 5,
                              "base_lr": 0.0}, iters_per_epoch=len(loader))
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"scheduler: spec must be a dict, got {type(spec).__name__}")
    ipe = _int("iters_per_epoch", iters_per_epoch, 1)
    if "name" not in spec:
        raise ValueError("scheduler: spec has no 'name' key")
    raw = spec["name"]
    if not isinstance(raw, str):
        raise ValueError(f"scheduler: 'name' must be a string, got {raw!r}")
    name = raw.strip().lower()
    name = _NAME_ALIASES.get(name, name)
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler: unknown 'name' {raw!r}; expected one of {sorted(SCHEDULERS)}")
    allowed = _KIND_KEYS[name] | {"name"}
    for key in spec:
        if key not in allowed:
            raise ValueError(f"scheduler: unknown key {key!r} for {name!r}; allowed {sorted(allowed)}")

    kwargs: dict[str, Any] = {}
    warmup = _one_of(spec, "warmup_epochs", "warmup_iters", ipe, required=False)
    if warmup is not None:
        kwargs["warmup_iters"] = warmup
    if "base_lr" in spec:
        kwargs["base_lr"] = spec["base_lr"]
    if name == "warmup_cosine":
        if "epochs" not in spec and "total_iters" not in spec and default_epochs is not None:
            spec = {**spec, "epochs": default_epochs}
        total = _one_of(spec, "epochs", "total_iters", ipe, required=True)
        return WarmupCosine(optimizer, total_iters=total, **kwargs)
    if "gamma" in spec:
        kwargs["gamma"] = spec["gamma"]
    if name in ("warmup_step", "multistep"):
        if "milestones" in spec and "milestone_iters" in spec:
            raise ValueError("scheduler: give either 'milestones' or 'milestone_iters', not both")
        if "milestones" in spec:
            ms = spec["milestones"]
            if isinstance(ms, (str, bytes)) or not isinstance(ms, Sequence):
                raise ValueError(f"scheduler: 'milestones' must be a list of epochs, got {ms!r}")
            milestones = [_epochs_to_iters("milestones", m, ipe) for m in ms]
        elif "milestone_iters" in spec:
            milestones = spec["milestone_iters"]
            if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
                raise ValueError(f"scheduler: 'milestone_iters' must be a list of integers, got {milestones!r}")
            milestones = [_int("milestone_iters", m, 0) for m in milestones]
        else:
            raise ValueError("scheduler: missing 'milestones' (or 'milestone_iters')")
        return SCHEDULERS[name](optimizer, milestones=milestones, **kwargs)
    if name == "step":
        size = _one_of(spec, "step_size", "step_size_iters", ipe, required=True)
        return Step(optimizer, step_size=size, **kwargs)
    return Constant(optimizer, **kwargs)
