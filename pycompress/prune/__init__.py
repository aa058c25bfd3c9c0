"""Pruning: masks attached to layers, criteria, schedules, regularizers, masked optimizers and the
sparsity report.

- :mod:`~pycompress.prune.masks`: bit-packed masks as layer buffers (``weight_mask``), weights
  kept masked in place, dense shadow weights for MicroNet's regrowing masks.
- :mod:`~pycompress.prune.criteria`: global / per-layer magnitude, threshold, std ratio, random,
  filter and channel norms.
- :mod:`~pycompress.prune.regularizers`: L1, Hoyer, Hoyer-Square, Transformed L1, Group Lasso,
  Group Hoyer, Group-HS (DeepHoyer).
- :mod:`~pycompress.prune.spec` / :mod:`~pycompress.prune.pruner`: a PruneSpec (what, how, when) and
  the trainer hook that runs it: one-shot, regrow (MicroNet), gradual (Zhu & Gupta).
- :mod:`~pycompress.prune.optim`: MaskedSGD (the fused masked step), MaskedAdam, MaskedAdamW.
- :mod:`~pycompress.prune.report`: the per-tensor sparsity report.
- :mod:`~pycompress.prune.structured`: structured pruning that removes channels physically
  (network slimming by |BN gamma|, filter norms), with dependencies from Torch-Pruning's graph;
  ``regularizer: bn_l1`` is its sparsity training.
"""

from . import structured
from .criteria import CRITERIA, mask_sparsity, select_masks
from .masks import (
    apply_masks,
    attach_mask,
    attach_masks,
    drop_shadows,
    get_mask,
    has_masks,
    masked_layers,
    prepare_state_dict,
    remove_masks,
)
from .optim import MaskedAdam, MaskedAdamW, MaskedOptimizer, MaskedSGD, build_masked_optimizer
from .pruner import Pruner, bn_scales, gradual_sparsity, prune_model
from .regularizers import REGULARIZERS, regularization
from .report import SparsityReport, TensorRow, sparsity_report
from .spec import SCHEDULES, PruneSpec

__all__ = [
    "CRITERIA",
    "select_masks",
    "mask_sparsity",
    "attach_mask",
    "attach_masks",
    "apply_masks",
    "drop_shadows",
    "get_mask",
    "has_masks",
    "masked_layers",
    "prepare_state_dict",
    "remove_masks",
    "MaskedOptimizer",
    "MaskedSGD",
    "MaskedAdam",
    "MaskedAdamW",
    "build_masked_optimizer",
    "Pruner",
    "prune_model",
    "gradual_sparsity",
    "bn_scales",
    "structured",
    "REGULARIZERS",
    "regularization",
    "SparsityReport",
    "TensorRow",
    "sparsity_report",
    "PruneSpec",
    "SCHEDULES",
]
