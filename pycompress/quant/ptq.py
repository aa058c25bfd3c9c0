"""Post-training quantization (PTQ): quantize a trained float model without retraining.

    result = quantize_post_training(model, {"weight_bits": 8, "act_bits": 8,
                                            "act_observer": "percentile"}, train_loader)

is ``prepare_qat(model, spec)`` followed by ``calibrate(model, batches, num_batches)``, with the
model left in eval mode, ready to evaluate, save (``{"plan": result["plan"], "state_dict": ...}``,
restored with ``apply_plan`` + ``load_state_dict``) or export.

Weights are quantized per output channel (symmetric, signed, s_c = max|w_c| / (2^(b-1) - 1)), as
in QAT. The spec's ``weight_scale`` is kept as given: without training the weights never change,
so "max" (recomputed every forward), "frozen" (computed once, now) and "lsq" (a Parameter
initialised to the same value, never trained here) give bit-identical outputs; "frozen" is the
cheapest at inference, "lsq" / "max" matter only if the model is fine-tuned afterwards (QAT).
Activation ranges come from the spec's ``act_observer`` ("minmax", or "percentile" with
``act_percentile``, which clips rare outliers; often better at low bit widths).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import torch.nn as nn

from .qat import _replace, calibrate, forwards_run, prepare_qat, qat_modules, qat_plan
from .spec import QuantSpec

__all__ = ["quantize_post_training"]


def quantize_post_training(
    model: nn.Module,
    spec: Union[QuantSpec, Mapping[str, Any]],
    batches: Iterable,
    num_batches: Optional[int] = None,
    device=None,
) -> Dict[str, Any]:
    """Quantize model in place from a few calibration batches, no training; returns
    {"plan": qat_plan(model), "calibration": calibrate's summary (name -> scale, signed, min, max)}.

    spec: a QuantSpec or its dict (as for prepare_qat). batches: tensors or (inputs, targets)
    tuples/lists. num_batches: calibration batches (default: the spec's calib_batches). device:
    where the model is moved and the batches go (default: the model's own device). On return the
    model is in eval mode. Raises like prepare_qat / calibrate (bad spec, no layer selected, empty
    batch iterable).
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.from_dict(spec)
    if num_batches is None:
        num_batches = spec.calib_batches
    if device is not None:
        model.to(device)
    prepare_qat(model, spec)
    with forwards_run(qat_modules(model).values()) as ran:
        summary = calibrate(model, batches, num_batches=num_batches, device=device)
    # a layer whose forward never ran (its parent uses the weight directly) would not be quantized
    # where the model computes: it goes back to float
    unused = {n: m for n, m in qat_modules(model).items() if id(m) not in ran}
    if unused:
        warnings.warn(
            f"quantize_post_training: left float: {sorted(unused)}: their forward never ran during calibration "
            f"(their parent uses the weight directly, or they serve training only)",
            stacklevel=2,
        )
        for n, m in unused.items():
            _replace(model, m, m.to_float(), n)
            for k in [k for k in summary if k == n or k.startswith(n + ".")]:
                del summary[k]
        if not qat_modules(model):
            raise ValueError("quantize_post_training: no quantized layer ran during calibration; nothing was quantized")
    model.eval()
    return {"plan": qat_plan(model), "calibration": summary}
