"""BatchNorm recalibration: re-estimate BN running statistics after the network changed.

After quantization (or pruning) the convolutions feeding each BatchNorm produce different
statistics than the ones the running mean / variance were accumulated on during float training
(MicroNet recalibrates them after quantizing). :func:`recalibrate_bn` runs a few batches forward
with only the BatchNorm layers in train mode and every other module in eval mode (dropout off,
quantizers as they are), under ``torch.no_grad()``, so nothing but the BN running statistics
changes: weights, pruning masks and quantizer scales stay bit-identical.

Averaging: each BN gets ``momentum = None`` for the duration, PyTorch's cumulative moving
average, so after n batches ``running_mean`` is the plain mean of the n per-batch means and
``running_var`` the mean of the n per-batch (unbiased) variances; PyTorch computes it with the
factor 1 / num_batches_tracked. With ``reset=True`` (the default) the statistics and
``num_batches_tracked`` are reset first, so the average covers exactly the batches of this call.
With ``reset=False`` the average continues from ``num_batches_tracked``: calling
``recalibrate_bn(..., reset=True)`` once and then ``recalibrate_bn(..., reset=False)`` repeatedly
(evaluating in between) accumulates one average over all the rounds. On statistics left by
ordinary training (momentum 0.1, num_batches_tracked = every training step) reset=False gives the
new batches a weight of only 1 / num_batches_tracked each.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils import batch_input, model_device

__all__ = ["recalibrate_bn"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _batch_input(batch) -> torch.Tensor:
    return batch_input(batch, "recalibrate_bn")


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable,
    num_batches: int,
    device=None,
    reset: bool = True,
) -> Dict[str, Any]:
    """Re-estimate the running statistics of every BatchNorm of model (in place) over
    ``num_batches`` batches (see the module docstring); returns {"layers", "batches", "images"}.

    batches: tensors or (inputs, targets) tuples/lists, moved to ``device`` (default: the model's).
    Every BatchNorm with ``track_running_stats`` takes part (those without keep using batch
    statistics and are skipped). Afterwards every module's train/eval mode and every BN's
    momentum are as before, also when the forward raises; then the BN statistics are restored too.

    Raises ValueError when model has no BatchNorm layer with running statistics or num_batches is
    not an int >= 1, RuntimeError (statistics unchanged) when ``batches`` is empty.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate_bn: num_batches must be an int >= 1, got {num_batches!r}")
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not bns:
        raise ValueError(
            f"recalibrate_bn: the model ({type(model).__name__}) has no BatchNorm layer to recalibrate "
            f"(with track_running_stats=True)"
        )
    device = torch.device(device) if device is not None else model_device(model)
    it = iter(batches)
    sentinel = object()
    first = next(it, sentinel)
    if first is sentinel:
        raise RuntimeError(
            "recalibrate_bn: no batches were seen (the batch iterable is empty); the BatchNorm statistics are unchanged"
        )

    modes = [(m, m.training) for m in model.modules()]
    momenta = [(bn, bn.momentum) for bn in bns]
    saved = [
        (bn, {k: getattr(bn, k).detach().clone() for k in _STATS if getattr(bn, k, None) is not None}) for bn in bns
    ]
    seen = images = 0
    try:
        model.eval()
        for bn in bns:
            bn.momentum = None
            if reset:
                bn.reset_running_stats()
            bn.train()
        with torch.no_grad():
            for batch in itertools.chain([first], itertools.islice(it, num_batches - 1)):
                x = _batch_input(batch)
                if device is not None:
                    x = x.to(device)
                model(x)
                seen += 1
                images += int(x.shape[0]) if x.dim() > 0 else 1
    except BaseException:
        with torch.no_grad():
            for bn, stats in saved:
                for k, v in stats.items():
                    getattr(bn, k).copy_(v)
        raise
    finally:
        for m, training in modes:
            m.training = training
        for bn, momentum in momenta:
            bn.momentum = momentum
    return {"layers": len(bns), "batches": seen, "images": images}
