"""Which BatchNorm layers fold into the layer before them, found on the model's traced graph.

A BatchNorm in eval mode is a per-channel affine map, ``y = x * k + (beta - mean * k)`` with
``k = gamma / sqrt(running_var + eps)``. When its input is the output of a conv (or linear) layer
and nothing else reads that output, the affine map folds into the layer: the weight of output
channel c is multiplied by ``k_c`` (for a quantized layer: its per-channel scale, so the integer
codes stay exactly the same) and the bias becomes ``(bias - mean) * k + beta``.

The pairs are found on a ``torch.fx`` trace of the model, with every conv, linear, BatchNorm and
quantizer module kept as one node, so the check "the conv's output feeds only this BatchNorm"
is a fact of the graph, not a guess from module order: pre-activation blocks (BN before conv,
DenseNet, PreResNet), a conv whose output also feeds a residual add, or a module called twice
are left unfolded. A model that fx cannot trace folds nothing (the reason is returned).
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["bn_fold_pairs", "bn_affine"]


def _leaf_types():
    from ..quant import QAT_LAYERS, FakeQuantizer
    from .modules import QuantizedConv2d, QuantizedLinear

    return (nn.Conv2d, nn.Linear, _BatchNorm, FakeQuantizer, QuantizedConv2d, QuantizedLinear) + tuple(QAT_LAYERS)


class _Tracer(torch.fx.Tracer):
    """Keeps conv / linear / BN / quantizer modules (and torch.nn's own) as single call_module nodes."""

    def __init__(self):
        super().__init__()
        self._leaves = _leaf_types()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def bn_fold_pairs(model: nn.Module) -> Tuple[Dict[str, str], Optional[str]]:
    """``({bn name: conv-or-linear name}, reason)``: the BatchNorm layers that fold into the layer
    before them. ``reason`` is None, or says why nothing could be analysed (fx could not trace)."""
    mods = dict(model.named_modules())
    if not any(isinstance(m, _BatchNorm) for m in mods.values()):
        return {}, None
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: fold nothing
        return (
            {},
            f"torch.fx could not trace {type(model).__name__} ({type(exc).__name__}: {exc}); BatchNorm kept unfolded",
        )
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs: Dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), _BatchNorm):
            continue
        bn = mods[node.target]
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            continue
        src = node.args[0]
        if src.op != "call_module" or len(src.users) != 1:
            continue
        layer = mods.get(src.target)
        if not _foldable(layer, bn):
            continue
        if calls[src.target] != 1 or calls[node.target] != 1:
            continue  # a module run twice would need two foldings
        pairs[node.target] = src.target
    return pairs, None


def _foldable(layer: Optional[nn.Module], bn: _BatchNorm) -> bool:
    if not (bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None):
        return False
    if isinstance(layer, nn.Conv2d):
        return isinstance(bn, nn.BatchNorm2d) and bn.num_features == layer.out_channels
    if isinstance(layer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return False


def bn_affine(bn: _BatchNorm) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, mean, beta)`` in fp32 with ``bn(x) = (x - mean) * k + beta`` in eval mode."""
    var = bn.running_var.detach().float()
    mean = bn.running_mean.detach().float()
    inv = torch.rsqrt(var + bn.eps)
    gamma = bn.weight.detach().float() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().float() if bn.bias is not None else torch.zeros_like(var)
    return gamma * inv, mean, beta
