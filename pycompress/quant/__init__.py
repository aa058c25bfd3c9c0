"""Quantization-aware training (QAT) with fake quantization.

Layers chosen by a ``QuantSpec`` are swapped, in place, for ``QuantConv2d`` / ``QuantLinear``:

    y = layer(Q_a(x), Q_w(W), bias),    Q(v) = s * clamp(rint(v / s), qmin, qmax)   (zero point 0)

* Q_w: per output channel, symmetric signed grid [-2^(b-1), 2^(b-1) - 1],
  s_c = max|W_c| / (2^(b-1) - 1) (mode "max", recomputed every forward; "frozen" computes it once;
  "lsq" learns it with the LSQ gradient, starting from that value). A fully pruned channel gets
  s_c = 1 and stays exactly 0. Mode "als": MicroNet's alternating-least-squares scale
  (``als_scale``: init max|W_c| / 2^(b-1), 100 iterations of B = clamp(rint(W_c / s_c)),
  s_c = <W_c, B> / <B, B>), refit once per epoch by the trainer hook ``ALSRefit`` (or
  ``refit_als(model)`` in a loop of one's own) and frozen in between; a fully pruned channel gets
  s_c = 0, codes 0, and stays exactly 0.
* Q_a: per tensor on the layer input; unsigned [0, 2^b - 1] with s = max(x) / (2^b - 1) when the
  calibrated minimum is >= 0 (after a ReLU), else signed with s = max|x| / (2^(b-1) - 1) ("auto");
  calibrated over a few batches (observer "minmax": the max; "percentile": the mean over batches
  of a high percentile, which clips outliers), then "frozen" or learned ("lsq").
* Backward: straight-through to W and x, zero where the value was clamped (see
  pycompress.ops.fake_quantize, which runs on the backend chosen by pycompress.backends).

Usage::

    from pycompress import models, quant

    model = models.build("mobilenet_student", in_channels=3, num_classes=11)
    plan = quant.prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "types": ["conv"],
                                     "first": {"act_bits": None}})
    quant.calibrate(model, train_loader, num_batches=4)     # activation scales
    opt = torch.optim.SGD(model.parameters(), lr=0.01)       # after prepare: LSQ scales are params
    ...train...
    torch.save({"plan": quant.qat_plan(model), "state_dict": model.state_dict()}, "ckpt.pt")

    # restore: same structure on a fresh float model, then load
    fresh = models.build("mobilenet_student", in_channels=3, num_classes=11)
    quant.apply_plan(fresh, ckpt["plan"]); fresh.load_state_dict(ckpt["state_dict"])

    # MicroNet's ALS weight scales: refit once per epoch by a hook placed after any Pruner
    quant.prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "weight_scale": "als"})
    Trainer(model, train_loader, epochs=..., optimizer=..., hooks=[pruner, quant.ALSRefit()]).fit()

    quant.model_size(model)["mb"]          # storage at the quantized bit widths
    quant.strip_qat(model, bake=True)      # plain nn.Conv2d / nn.Linear holding quantized values

    # post-training quantization (no training): prepare_qat + calibrate, eval mode
    quant.quantize_post_training(model, {"weight_bits": 8, "act_bits": 8, "act_observer": "percentile"},
                                 train_loader, num_batches=8)
"""

from .modules import QAT_LAYERS, QuantConv2d, QuantLinear
from .ptq import quantize_post_training
from .qat import (
    ALSRefit,
    apply_plan,
    calibrate,
    is_qat,
    model_size,
    prepare_qat,
    qat_modules,
    qat_plan,
    refit_als,
    strip_qat,
)
from .quantizer import ALS_ITERS, LSQ_EPS, OBSERVERS, FakeQuantizer, als_scale, scale_divisor, scale_from_range
from .spec import QuantSpec

__all__ = [
    "FakeQuantizer",
    "QuantConv2d",
    "QuantLinear",
    "QAT_LAYERS",
    "QuantSpec",
    "prepare_qat",
    "qat_plan",
    "apply_plan",
    "calibrate",
    "quantize_post_training",
    "strip_qat",
    "is_qat",
    "qat_modules",
    "model_size",
    "refit_als",
    "ALSRefit",
    "als_scale",
    "ALS_ITERS",
    "scale_divisor",
    "scale_from_range",
    "LSQ_EPS",
    "OBSERVERS",
]
