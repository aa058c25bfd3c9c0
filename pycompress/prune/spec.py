"""PruneSpec: what a pruning stage selects, how it chooses masks, when, and which regularizer it adds.

Layer selection, in ``model.named_modules()`` order: the layer's type is in ``types`` ("conv" =
every nn.Conv2d incl. depthwise; "linear" = nn.Linear; their QAT versions too; BatchNorm is never
selected), its qualified name matches an ``include`` regex (None = all) and no ``exclude`` regex;
then ``first: false`` / ``last: false`` drop the first / last selected layer.

Schedules:
- ``oneshot``: masks chosen once, at the start of the stage, then fixed: the gradient is masked
  before every step and pruned weights stay exactly 0 (DeepHoyer's fine-tuning).
- ``regrow``: MicroNet. Dense shadow weights learn from straight-through gradients while the
  forward pass uses shadow * mask; masks are re-selected from the shadow every
  ``update_interval`` steps until step ``update_stop`` (None: until the stage ends), then frozen.
- ``gradual``: Zhu & Gupta's cubic schedule, s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^3,
  masks re-chosen every ``update_interval`` steps from ``start_step`` (t0) to ``end_step`` (t1,
  default 3/4 of the stage) with s_i = ``initial_sparsity``, s_f = ``sparsity``; fixed masks
  between updates.
Without a ``criterion`` no new masks are chosen: the stage only adds the ``regularizer`` (DeepHoyer's
sparsity-inducing training) and keeps any masks the model already has.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from ..layer_spec import LAYER_TYPES, LayerSelectionSpec

__all__ = ["PruneSpec", "SCHEDULES", "SPARSITY_CRITERIA"]

SCHEDULES = ("oneshot", "regrow", "gradual")
# Criteria whose amount is a target sparsity (the others prune by a value).
SPARSITY_CRITERIA = ("global_magnitude", "layer_magnitude", "random", "filter_norm", "channel_norm")
VALUE_CRITERIA = ("threshold", "std_ratio")


def _fail(key: str, msg: str) -> None:
    raise ValueError(f"PruneSpec: {key}: {msg}")


def _real(key: str, v, low: Optional[float] = None, high: Optional[float] = None, low_ok: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        _fail(key, f"must be a finite number, got {v!r}")
    if low is not None and (v < low or (v == low and not low_ok)):
        _fail(key, f"must be {'>=' if low_ok else '>'} {low}, got {v!r}")
    if high is not None and v > high:
        _fail(key, f"must be <= {high}, got {v!r}")
    return float(v)


def _int(key: str, v, low: int = 0, optional: bool = False) -> Optional[int]:
    if v is None and optional:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        _fail(key, f"must be an integer >= {low}, got {v!r}")
    return int(v)


@dataclass
class PruneSpec(LayerSelectionSpec):
    """Settings of a pruning stage (see the module docstring)."""

    _fail = staticmethod(_fail)

    criterion: Optional[str] = None
    sparsity: Optional[float] = None
    threshold: Optional[float] = None
    ratio: float = 0.25
    norm: float = 2.0
    schedule: str = "oneshot"
    update_interval: Optional[int] = None
    update_stop: Optional[int] = None
    start_step: int = 0
    end_step: Optional[int] = None
    initial_sparsity: float = 0.0
    types: List[str] = field(default_factory=lambda: list(LAYER_TYPES))
    include: Optional[List[str]] = None
    exclude: List[str] = field(default_factory=list)
    first: bool = True
    last: bool = True
    regularizer: Optional[str] = None
    strength: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        from .criteria import CRITERIA
        from .regularizers import REGULARIZERS

        if self.criterion is not None and self.criterion not in CRITERIA:
            _fail("criterion", f"must be one of {sorted(CRITERIA)}, got {self.criterion!r}")
        if self.schedule not in SCHEDULES:
            _fail("schedule", f"must be one of {list(SCHEDULES)}, got {self.schedule!r}")
        c = self.criterion
        if c in SPARSITY_CRITERIA:
            if self.sparsity is None:
                _fail("sparsity", f"criterion {c!r} needs a target sparsity in [0, 1]")
            self.sparsity = _real("sparsity", self.sparsity, 0.0, 1.0)
        elif self.sparsity is not None:
            _fail(
                "sparsity",
                f"criterion {c!r} does not take a target sparsity"
                + (
                    " (it prunes by value: use threshold / ratio)"
                    if c in VALUE_CRITERIA
                    else " (no criterion: set one to prune)"
                ),
            )
        if c == "threshold":
            if self.threshold is None:
                _fail("threshold", "criterion 'threshold' needs a threshold >= 0 (|w| < threshold is pruned)")
            self.threshold = _real("threshold", self.threshold, 0.0)
        elif self.threshold is not None:
            _fail("threshold", f"only criterion 'threshold' takes a threshold, not {c!r}")
        self.ratio = _real("ratio", self.ratio, 0.0, low_ok=False)
        self.norm = _real("norm", self.norm, 0.0, low_ok=False)
        if self.schedule != "oneshot":
            # gradual needs criteria under which an already pruned (zero) weight stays pruned as the
            # target grows: magnitudes and norms; random masks would be redrawn.
            gradual_ok = ("global_magnitude", "layer_magnitude", "filter_norm", "channel_norm")
            if c not in ("global_magnitude", "layer_magnitude") and not (
                self.schedule == "gradual" and c in gradual_ok
            ):
                _fail(
                    "schedule",
                    f"{self.schedule!r} re-selects masks to a target sparsity: it needs criterion "
                    + (
                        "global_magnitude or layer_magnitude"
                        if self.schedule == "regrow"
                        else f"one of {list(gradual_ok)}"
                    )
                    + f", got {c!r}",
                )
        default_interval = {"oneshot": None, "regrow": 50, "gradual": 100}[self.schedule]
        if self.update_interval is None:
            self.update_interval = default_interval
        elif self.schedule == "oneshot":
            _fail("update_interval", "only the regrow and gradual schedules re-select masks")
        else:
            self.update_interval = _int("update_interval", self.update_interval, 1)
        if self.update_stop is not None and self.schedule != "regrow":
            _fail("update_stop", "only the regrow schedule takes update_stop")
        self.update_stop = _int("update_stop", self.update_stop, 1, optional=True)
        if self.schedule != "gradual":
            for k, default in (("start_step", 0), ("end_step", None), ("initial_sparsity", 0.0)):
                if getattr(self, k) != default:
                    _fail(k, "only the gradual schedule takes it")
        self.start_step = _int("start_step", self.start_step, 0)
        self.end_step = _int("end_step", self.end_step, 1, optional=True)
        if self.end_step is not None and self.end_step <= self.start_step:
            _fail("end_step", f"must be after start_step ({self.start_step}), got {self.end_step}")
        self.initial_sparsity = _real("initial_sparsity", self.initial_sparsity, 0.0, 1.0)
        if self.schedule == "gradual" and self.sparsity is not None and self.initial_sparsity > self.sparsity:
            _fail("initial_sparsity", f"must not exceed sparsity ({self.sparsity}), got {self.initial_sparsity}")
        self._check_selection()
        for key in ("first", "last"):
            if not isinstance(getattr(self, key), bool):
                _fail(
                    key, f"must be true (prune the first/last selected layer too) or false, got {getattr(self, key)!r}"
                )
        if self.regularizer is not None and self.regularizer not in REGULARIZERS:
            _fail("regularizer", f"must be one of {sorted(REGULARIZERS)}, got {self.regularizer!r}")
        self.strength = _real("strength", self.strength, 0.0)
        if self.regularizer is not None and self.strength == 0:
            _fail("strength", f"regularizer {self.regularizer!r} needs a strength > 0")
        if self.regularizer is None and self.strength != 0:
            _fail("strength", "is set but no regularizer is named")
        self.seed = _int("seed", self.seed, 0)
        if c is None and self.regularizer is None:
            _fail("criterion", "a prune section needs a criterion (to prune) and/or a regularizer")

    def criterion_params(self) -> Dict[str, Any]:
        """Keyword arguments of ``criteria.select_masks`` for this criterion."""
        c = self.criterion
        if c in ("global_magnitude", "layer_magnitude", "random"):
            return {"sparsity": self.sparsity}
        if c in ("filter_norm", "channel_norm"):
            return {"sparsity": self.sparsity, "p": self.norm}
        if c == "threshold":
            return {"value": self.threshold}
        if c == "std_ratio":
            return {"ratio": self.ratio}
        return {}

    def select_layers(self, model) -> List[str]:
        """Qualified names of the layers this spec prunes / regularizes, in module order."""
        from ..quant.modules import layer_type

        names = [name for name, m in model.named_modules() if self.selects(name, layer_type(m))]
        if names and not self.last:
            names = names[:-1]
        if names and not self.first:
            names = names[1:]
        return names
