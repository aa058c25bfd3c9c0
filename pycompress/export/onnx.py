"""ONNX export of a loaded artifact (or any float model of the zoo) as a QDQ graph for ONNX Runtime.

    from pycompress import export
    from pycompress.export.onnx import export_onnx, ort_predict, count_fused
    net = export.load("model.pcz")
    facts = export_onnx(net, "model.onnx", (1, 32, 32))     # atomic; force=True to overwrite
    ort_predict("model.onnx", loader)["top1"]
    count_fused("model.onnx")["QLinearConv"]                # what ORT fused into integer kernels

What the file holds (opset 13..17 with the TorchScript exporter, the default; opset 18 with
``dynamo=True``):

* every quantized weight as an **int8 initializer of its integer codes** feeding
  ``DequantizeLinear(codes, scale[C], zero_point=int8 zeros[C], axis=0)``: 1 byte per weight, no
  fp32 copy. ``scale`` is the layer's per-channel scale's magnitude (a negative scale, from a
  folded BatchNorm with negative gamma, flips the codes' sign instead). Weights of 1..7 bits are
  stored in the int8 range (their codes fit; ONNX has no integer conv below 8 bits and int4 Q/DQ
  needs opset 21): ``facts["int4_as_int8"]`` and the model's ``metadata_props`` say so.
  Weights above 8 bits stay fp32 (no int16 Q/DQ below opset 21).
* every quantized layer input as ``QuantizeLinear -> DequantizeLinear`` with a scalar scale and an
  explicit scalar zero-point initializer (uint8 for unsigned grids, int8 for signed ones), one
  consumer per QuantizeLinear: what ORT's QDQ fusions need (on x86 it rewrites int8 activation
  pairs to uint8 first, which needs exactly that). Grids narrower than 8 bits clamp first (Clip)
  and quantize on the 8-bit grid of the same sign (the same values); ORT then leaves the conv
  before such a Clip in fp32 (no QLinearConv with 4-bit activations).
* a conv whose output is not re-quantized (the last pointwise conv of a net, before a global
  average pool and a float classifier) cannot become QLinearConv; it runs as an fp32 Conv on
  dequantized weights.
* biases fp32. ORT itself rounds a QDQ conv's bias to int32 in units of ``x_scale * w_scale``
  before fusing it into QLinearConv (at every optimization level above ``ORT_DISABLE_ALL``), so
  ``bias_int32=True`` (writing them that way) fuses exactly the same convs; it is off by default.
  That rounding is the one systematic difference between ORT's integer kernels and the torch
  module: ``ORT_DISABLE_ALL`` reproduces torch to float rounding, the default level reproduces
  :func:`integer_bias_reference` (facts: ``bias_rounding_max``).

The graph is produced by ``torch.onnx.export`` on a copy of the model (``prepare_for_onnx``) whose
quantized layers call ``torch.fake_quantize_per_tensor_affine`` / ``fake_quantize_per_channel_affine``
with constant scales (TorchScript exporter) or emit the same QuantizeLinear / DequantizeLinear nodes
through ``torch.onnx.ops.symbolic`` (dynamo exporter: torch.export cannot trace the aten fake-quant
ops with a dynamic batch), and whose pycompress depthwise layers are plain ``nn.Conv2d``. The
exporter's weight Q/DQ pairs are then rewritten with the ``onnx`` package as described above (the
codes computed in numpy exactly as QuantizeLinear would: round half to even, saturate), dead nodes
and initializers removed, and the model checked (``onnx.checker``, full check).

``onnx`` and ``onnxruntime`` (and ``onnxscript`` for ``dynamo=True``) are imported lazily: this
module imports without them; its functions raise ImportError naming the extra
(``pip install 'pycompress[onnx]'``).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
import tempfile
import warnings
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import QUANTIZED_LAYERS, QuantizedConv2d, QuantizedLinear

__all__ = [
    "export_onnx",
    "ort_session",
    "ort_run",
    "ort_predict",
    "count_fused",
    "prepare_for_onnx",
    "integer_bias_reference",
    "FUSED_OPS",
]

EXTRA = "pip install 'pycompress[onnx]'"
_PIP_NAMES = {"onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript"}
# op types count_fused always reports (0 when absent)
FUSED_OPS = (
    "QLinearConv",
    "QLinearMatMul",
    "QGemm",
    "MatMulInteger",
    "ConvInteger",
    "Conv",
    "Gemm",
    "MatMul",
    "QuantizeLinear",
    "DequantizeLinear",
)
INPUT_NAME, OUTPUT_NAME = "input", "logits"


def _import(name: str):
    """Import an optional dependency (tests monkeypatch this to simulate its absence)."""
    return importlib.import_module(name)


def _require(name: str):
    try:
        return _import(name)
    except ImportError as exc:
        raise ImportError(
            f"pycompress.export.onnx needs the {name!r} package, which is not installed: "
            f"{EXTRA} (or pip install {_PIP_NAMES.get(name, name)})"
        ) from exc


# ------------------------------------------------------------------------------------ model preparation
class _ExportQuantMixin:
    """Forward of a quantized artifact layer as the ONNX exporters should trace it. Everything is
    precomputed in eager mode (``_onnx_setup``) so that no data-dependent Python value is read from
    a tensor during tracing (torch.export's fake tensors have none).

    TorchScript exporter (and eager): ``torch.fake_quantize_per_{tensor,channel}_affine``, which it
    writes as QuantizeLinear -> DequantizeLinear. Dynamo exporter (``_onnx_symbolic`` set): the
    same two ONNX nodes through ``torch.onnx.ops.symbolic`` (torch.export cannot trace the aten
    fake-quant ops with a symbolic batch size: they have no meta kernel)."""

    def _onnx_setup(self, name: str) -> None:
        self._onnx_symbolic = False
        self._onnx_act: Optional[Tuple[float, int, int, int, int]] = None
        if self.act_bits is not None:
            qmin, qmax = self.act_range()
            if qmax - qmin > 255:
                raise ValueError(
                    f"ONNX export: layer {name!r} quantizes its input to {self.act_bits} bits; "
                    f"QuantizeLinear below opset 21 has at most 8 bits"
                )
            s = float(self.act_scale.reshape(-1)[0])
            if not (s > 0 and np.isfinite(s)):
                raise ValueError(f"ONNX export: layer {name!r} has activation scale {s}")
            lo, hi = (-128, 127) if qmin < 0 else (0, 255)
            self._onnx_act = (s, qmin, qmax, lo, hi)
            self.register_buffer("_onnx_ascale", torch.tensor(s, dtype=torch.float32))
            self.register_buffer("_onnx_azp", torch.tensor(0, dtype=torch.int8 if lo < 0 else torch.uint8))
        self._onnx_wq = self.weight_bits is not None and self.weight_bits <= 8
        if self._onnx_wq:
            scale = self.weight_scale.detach().float()
            codes = self.weight_codes
            neg = (scale < 0).view((-1,) + (1,) * (codes.dim() - 1))
            if bool((neg & (codes == -128)).any()):
                raise ValueError(
                    f"ONNX export: layer {name!r}: an 8-bit channel with a negative folded scale holds "
                    f"code -128, whose negation does not fit int8; save the artifact with fold_bn=False "
                    f"(--no-fold-bn)"
                )
            a = scale.abs()
            self.register_buffer("_onnx_wscale", torch.where(a > 0, a, torch.ones_like(a)))
            self.register_buffer("_onnx_wzp", torch.zeros(a.shape, dtype=torch.int32))
            self.register_buffer("_onnx_wzp8", torch.zeros(a.shape, dtype=torch.int8))
        # the exporters take parameters and persistent buffers as graph initializers; a
        # non-persistent buffer would be traced as a constant and the weight's Q/DQ folded away
        self._non_persistent_buffers_set.discard("weight")

    def _onnx_input(self, x: torch.Tensor) -> torch.Tensor:
        if self._onnx_act is None:
            return x
        s, qmin, qmax, lo, hi = self._onnx_act
        if (qmin, qmax) != (lo, hi):
            x = torch.clamp(x, qmin * s, qmax * s)
        if self._onnx_symbolic:
            return _symbolic_qdq(x, self._onnx_ascale, self._onnx_azp, None)
        return torch.fake_quantize_per_tensor_affine(x, s, 0, lo, hi)

    def _onnx_weight(self) -> torch.Tensor:
        if not self._onnx_wq:
            return self.weight
        if self._onnx_symbolic:
            return _symbolic_qdq(self.weight, self._onnx_wscale, self._onnx_wzp8, 0)
        return torch.fake_quantize_per_channel_affine(self.weight, self._onnx_wscale, self._onnx_wzp, 0, -128, 127)


def _symbolic_qdq(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, axis: Optional[int]) -> torch.Tensor:
    """QuantizeLinear -> DequantizeLinear as ONNX nodes for the dynamo exporter (opset 13 ops)."""
    sym = torch.onnx.ops.symbolic
    attrs = {} if axis is None else {"axis": axis}
    q = sym("QuantizeLinear", (x, scale, zp), attrs, dtype=zp.dtype, shape=x.shape, version=13)
    return sym("DequantizeLinear", (q, scale, zp), attrs, dtype=torch.float32, shape=x.shape, version=13)


class _ExportQuantizedConv2d(_ExportQuantMixin, QuantizedConv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Conv2d._conv_forward(self, self._onnx_input(x), self._onnx_weight(), self.bias)


class _ExportQuantizedLinear(_ExportQuantMixin, QuantizedLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._onnx_input(x), self._onnx_weight(), self.bias)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _unfuse_dw_bn_act(m: nn.Module) -> nn.Module:
    """A ``pycompress.nn.DepthwiseConvBNAct`` as plain torch layers: conv (weight * scale, bias
    shift) followed by its activation."""
    c, _, kh, kw = m.weight.shape
    conv = nn.Conv2d(c, c, (kh, kw), m.stride, m.padding, m.dilation, groups=c, bias=True)
    with torch.no_grad():
        conv.weight.copy_(m.weight.detach().float() * m.scale.view(-1, 1, 1, 1))
        conv.bias.copy_(m.shift)
    act = {"relu6": nn.ReLU6(), "relu": nn.ReLU(), "none": nn.Identity()}.get(m.act)
    if act is None:
        raise ValueError(f"ONNX export: DepthwiseConvBNAct with unknown activation {m.act!r}")
    return nn.Sequential(conv, act)


def prepare_for_onnx(model: nn.Module) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(copy, facts)``: a CPU fp32 eval copy of ``model`` that torch's ONNX exporters can trace.

    * a QAT model (pycompress.quant layers) is first encoded and decoded as an artifact would be
      (``pycompress.export.encode`` / ``decode``, BatchNorm folded);
    * artifact layers (``QuantizedConv2d`` / ``QuantizedLinear``) trace as torch fake-quant ops;
    * ``pycompress.nn.DepthwiseConv2d`` becomes ``nn.Conv2d`` (same state), ``DepthwiseConvBNAct``
      a conv with the BatchNorm folded in plus its activation.
    ``model`` itself is not modified."""
    from ..nn import DepthwiseConv2d, DepthwiseConvBNAct
    from ..quant import QAT_LAYERS

    facts: Dict[str, Any] = {"converted_from_qat": False, "weight_bits": [], "act_bits": []}
    if any(isinstance(m, QAT_LAYERS) for m in model.modules()):
        from .artifact import decode, encode

        was_training = model.training
        model.eval()
        try:
            manifest, payload = encode(model)
        finally:
            model.train(was_training)
        model = decode(manifest, payload)
        facts["converted_from_qat"] = True
    m = copy.deepcopy(model).cpu().float().eval()
    wbits, abits = set(), set()
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QUANTIZED_LAYERS):
            mod.__class__ = _ExportQuantizedConv2d if isinstance(mod, nn.Conv2d) else _ExportQuantizedLinear
            mod._onnx_setup(name)
            if mod.weight_bits is not None:
                wbits.add(int(mod.weight_bits))
            if mod.act_bits is not None:
                abits.add(int(mod.act_bits))
        elif type(mod) is DepthwiseConv2d:
            mod.__class__ = nn.Conv2d
        elif isinstance(mod, DepthwiseConvBNAct):
            _set_child(m, name, _unfuse_dw_bn_act(mod))
    for p in m.parameters():
        p.requires_grad_(False)
    facts["weight_bits"], facts["act_bits"] = sorted(wbits), sorted(abits)
    facts["bias_rounding_max"] = _bias_rounding_max(model)
    return m, facts


def _int_bias(layer: nn.Module) -> Optional[torch.Tensor]:
    """The bias of a quantized conv as ORT's integer kernels use it: rounded to int32 units of
    ``x_scale * |w_scale|`` (None when ORT keeps it float: no input or weight quantization)."""
    if (
        not isinstance(layer, QuantizedConv2d)
        or layer.bias is None
        or layer.act_bits is None
        or layer.weight_bits is None
        or layer.weight_bits > 8
    ):
        return None
    ws = layer.weight_scale.detach().double().abs()
    ws = torch.where(ws > 0, ws, torch.ones_like(ws))
    unit = float(layer.act_scale.reshape(-1)[0]) * ws
    return (torch.round(layer.bias.detach().double() / unit) * unit).to(layer.bias.dtype)


def integer_bias_reference(model: nn.Module) -> nn.Module:
    """A copy of a loaded artifact whose conv biases are rounded the way ONNX Runtime rounds them
    before it fuses a QDQ conv into ``QLinearConv`` (its ``WeightBiasQuantization`` pass, on at
    every optimization level above ``ORT_DISABLE_ALL``): int32 in units of ``x_scale * w_scale``.

    That is what ORT's integer kernels compute, and the one systematic difference between them and
    the torch module: with coarse weight scales (few weight bits, large folded BatchNorm gains)
    the unit can approach the next layer's activation step, and the re-rounded activations then
    cascade; ``export_onnx`` reports the largest such bias change as ``bias_rounding_max``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            b = _int_bias(mod)
            if b is not None:
                mod.bias.copy_(b)
    return m


def _bias_rounding_max(model: nn.Module) -> float:
    worst = 0.0
    for mod in model.modules():
        b = _int_bias(mod)
        if b is not None:
            worst = max(worst, float((b - mod.bias).abs().max()))
    return worst


# ------------------------------------------------------------------------------------ graph rewriting
class _Graph:
    """Helpers over an onnx GraphProto: constant lookup, consumers, initializer creation."""

    def __init__(self, onnx_mod, model):
        self.onnx = onnx_mod
        self.model = model
        self.g = model.graph
        self.nh = onnx_mod.numpy_helper
        self._names = set()
        for n in self.g.node:
            self._names.update(n.output)
        self._names.update(i.name for i in self.g.initializer)
        self._names.update(i.name for i in self.g.input)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def inits(self) -> Dict[str, Any]:
        return {i.name: i for i in self.g.initializer}

    def const(self, name: str) -> Optional[np.ndarray]:
        for i in self.g.initializer:
            if i.name == name:
                return self.nh.to_array(i)
        return None

    def add_init(self, base: str, arr: np.ndarray) -> str:
        name = self.unique(base)
        self.g.initializer.append(self.nh.from_array(arr, name))
        return name

    def consumers(self) -> Dict[str, List[Any]]:
        out: Dict[str, List[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                if i:
                    out.setdefault(i, []).append(n)
        return out

    def producers(self) -> Dict[str, Any]:
        return {o: n for n in self.g.node for o in n.output}


def _constant_node_value(onnx_mod, node) -> Optional[np.ndarray]:
    nh = onnx_mod.numpy_helper
    for a in node.attribute:
        if a.name == "value":
            return nh.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _fold_constants(G: _Graph) -> None:
    """Constant nodes become initializers; Identity / Cast of an initializer are folded."""
    onnx_mod = G.onnx
    inits = G.inits()
    changed = True
    while changed:
        changed = False
        keep = []
        for n in G.g.node:
            val = None
            if n.op_type == "Constant" and not n.input:
                val = _constant_node_value(onnx_mod, n)
            elif n.op_type in ("Identity", "Cast") and len(n.input) == 1 and n.input[0] in inits:
                val = G.nh.to_array(inits[n.input[0]])
                if n.op_type == "Cast":
                    to = next(a.i for a in n.attribute if a.name == "to")
                    try:
                        dt = onnx_mod.helper.tensor_dtype_to_np_dtype(to)
                    except Exception:  # noqa: BLE001 - an unusual target type: leave the Cast alone
                        dt = None
                    if dt is None or not (np.issubdtype(val.dtype, np.number) and np.issubdtype(dt, np.number)):
                        val = None
                    else:
                        val = val.astype(dt)
            if val is not None and len(n.output) == 1:
                t = G.nh.from_array(np.asarray(val), n.output[0])
                G.g.initializer.append(t)
                inits[n.output[0]] = t
                changed = True
                continue
            keep.append(n)
        if changed:
            del G.g.node[:]
            G.g.node.extend(keep)


def _quantize_linear_np(x: np.ndarray, scale: np.ndarray, zp: np.ndarray, axis: int) -> np.ndarray:
    """``QuantizeLinear`` in numpy: ``saturate(round_half_even(x / scale) + zp)`` (x, scale fp32)."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.asarray(scale, dtype=np.float32)
    zp = np.asarray(zp)
    if scale.ndim == 1 and scale.size > 1:  # per-axis
        shape = [1] * x.ndim
        shape[axis] = -1
        scale = scale.reshape(shape)
        zp = zp.reshape(shape)
    info = np.iinfo(zp.dtype)
    q = np.rint(x / scale) + zp.astype(np.float32)
    return np.clip(q, info.min, info.max).astype(zp.dtype)


def _attr(node, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == a.INT else a
    return default


def _rewrite_weights(G: _Graph) -> Tuple[int, int]:
    """Each ``QuantizeLinear(const W, scale, zp) -> DequantizeLinear`` becomes an integer initializer
    of the codes feeding the DequantizeLinear. Returns (rewritten, fp32 bytes dropped)."""
    cons = G.consumers()
    graph_outputs = {o.name for o in G.g.output}
    remove, n_done, dropped = set(), 0, 0
    for n in G.g.node:
        if n.op_type != "QuantizeLinear" or len(n.input) < 3:
            continue
        w, s, z = (G.const(i) for i in n.input[:3])
        if w is None or s is None or z is None or w.dtype != np.float32:
            continue
        users = cons.get(n.output[0], [])
        if not users or n.output[0] in graph_outputs or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        axis = _attr(n, "axis", 1)
        axis = axis + w.ndim if axis < 0 else axis
        codes = _quantize_linear_np(w, s, z, axis)
        base = n.input[0][: -len("weight")] if n.input[0].endswith(".weight") else f"{n.input[0]}_"
        name = G.add_init(f"{base}weight_codes", codes)
        for u in users:
            u.input[0] = name
            # the DequantizeLinear's own scale / zero point, under the layer's name
            for k, what in ((1, "weight_scale"), (2, "weight_zero_point")):
                v = G.const(u.input[k]) if len(u.input) > k else None
                if v is not None:
                    u.input[k] = G.add_init(f"{base}{what}", v)
        remove.add(id(n))
        n_done += 1
        dropped += w.nbytes
    if remove:
        keep = [n for n in G.g.node if id(n) not in remove]
        del G.g.node[:]
        G.g.node.extend(keep)
    return n_done, dropped


def _layer_of(G: _Graph, cons: Dict[str, List[Any]], dq_users: List[Any]) -> Optional[str]:
    """The layer an activation DequantizeLinear feeds (named after its weight initializer), if one."""
    prod = None
    for dq in dq_users:
        for c in cons.get(dq.output[0], []):
            if c.op_type not in ("Conv", "Gemm", "MatMul") or len(c.input) < 2:
                continue
            w = c.input[1]
            if prod is None:
                prod = G.producers()
            p = prod.get(w)
            if p is not None and p.op_type == "DequantizeLinear":
                w = p.input[0]
            for suffix in (".weight_codes", ".weight"):
                if w.endswith(suffix):
                    return w[: -len(suffix)]
    return None


def _fix_activation_pairs(G: _Graph) -> Tuple[int, int]:
    """Activation Q/DQ: scalar scale and explicit scalar zero-point initializers (their own, one per
    node), one DequantizeLinear per QuantizeLinear. Returns (activation Q nodes, weight DQ nodes)."""
    cons = G.consumers()
    inits = G.inits()
    n_act = n_wdq = 0
    for n in list(G.g.node):
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            n_wdq += 1
            continue
        if n.op_type != "QuantizeLinear" or n.input[0] in inits:
            continue
        n_act += 1
        s = G.const(n.input[1])
        if s is None or s.size != 1:
            continue
        z = G.const(n.input[2]) if len(n.input) > 2 else np.array(0, dtype=np.uint8)
        if z is None:
            continue
        users = cons.get(n.output[0], [])
        dq_users = [u for u in users if u.op_type == "DequantizeLinear"]
        layer = _layer_of(G, cons, dq_users)
        base = f"{layer}.input_" if layer else f"{n.output[0]}_"
        n.input[1] = G.add_init(f"{base}scale", s.reshape(()).astype(np.float32))
        zname = G.add_init(f"{base}zero_point", np.asarray(z).reshape(()).astype(z.dtype))
        if len(n.input) > 2:
            n.input[2] = zname
        else:
            n.input.append(zname)
        for u in dq_users:
            u.input[1] = n.input[1]  # the pair shares the Q's scalar scale and zero point
            if len(u.input) > 2:
                u.input[2] = zname
            else:
                u.input.append(zname)
        if len(users) > 1 and len(dq_users) == len(users):
            # one Q per DQ: ORT's int8 -> uint8 rewrite needs a single consumer per Q
            for u in dq_users[1:]:
                out = G.unique(f"{n.output[0]}_dup")
                dup = G.onnx.helper.make_node("QuantizeLinear", list(n.input), [out], name=G.unique(f"{n.name}_dup"))
                G.g.node.append(dup)
                u.input[0] = out
                n_act += 1
    return n_act, n_wdq


def _quantize_biases(G: _Graph) -> int:
    """Float conv / gemm biases whose input and weight come from DequantizeLinear become int32 +
    DequantizeLinear(scale = x_scale * w_scale, axis 0)."""
    prod = G.producers()
    inits = G.inits()
    done = 0
    for n in G.g.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 3 or n.input[2] not in inits:
            continue
        if n.op_type == "Gemm" and (
            _attr(n, "transA", 0) or any(a.name in ("alpha", "beta") and a.f != 1.0 for a in n.attribute)
        ):
            continue
        xdq, wdq = prod.get(n.input[0]), prod.get(n.input[1])
        if xdq is None or wdq is None or xdq.op_type != "DequantizeLinear" or wdq.op_type != "DequantizeLinear":
            continue
        xs, ws = G.const(xdq.input[1]), G.const(wdq.input[1])
        b = G.const(n.input[2])
        if xs is None or ws is None or b is None or xs.size != 1 or b.ndim != 1:
            continue
        bs = (np.float32(xs.reshape(())) * ws.astype(np.float32).reshape(-1)).astype(np.float32)
        if bs.size == 1:
            bs = np.full(b.shape, bs.reshape(()), dtype=np.float32)
        if bs.shape != b.shape or not np.all(bs > 0):
            continue
        q = np.rint(b.astype(np.float64) / bs.astype(np.float64))
        if np.abs(q).max(initial=0) > 2**31 - 1:
            continue
        qname = G.add_init(f"{n.input[2]}_int32", q.astype(np.int32))
        sname = G.add_init(f"{n.input[2]}_scale", bs)
        zname = G.add_init(f"{n.input[2]}_zero_point", np.zeros(b.shape, dtype=np.int32))
        out = G.unique(f"{n.input[2]}_dequantized")
        G.g.node.append(
            G.onnx.helper.make_node(
                "DequantizeLinear", [qname, sname, zname], [out], name=G.unique(f"{n.name}_bias_dq"), axis=0
            )
        )
        n.input[2] = out
        done += 1
    return done


def _remove_dead(G: _Graph) -> None:
    needed = {o.name for o in G.g.output}
    for n in G.g.node:  # names used inside subgraphs count as needed
        for a in n.attribute:
            for sub in [a.g] if a.type == a.GRAPH else list(a.graphs):
                for sn in sub.node:
                    needed.update(sn.input)
    keep = []
    for n in reversed(_toposort(list(G.g.node), G)):
        if any(o in needed for o in n.output if o):
            keep.append(n)
            needed.update(i for i in n.input if i)
    keep.reverse()
    del G.g.node[:]
    G.g.node.extend(keep)
    inits = [i for i in G.g.initializer if i.name in needed]
    del G.g.initializer[:]
    G.g.initializer.extend(inits)
    vis = [v for v in G.g.value_info if v.name in needed]
    del G.g.value_info[:]
    G.g.value_info.extend(vis)


def _toposort(nodes: List[Any], G: _Graph) -> List[Any]:
    avail = {i.name for i in G.g.initializer} | {i.name for i in G.g.input} | {""}
    out, pending = [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(i in avail for i in n.input):
                out.append(n)
                avail.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # outer-scope names or a cycle: keep the remaining order
            out.extend(rest)
            break
        pending = rest
    return out


# ------------------------------------------------------------------------------------ export
def _input_example(input_shape: Sequence[int], batch_dynamic: bool) -> torch.Tensor:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (2 if batch_dynamic else 1,) + shape
    elif len(shape) == 4 and batch_dynamic and shape[0] == 1:
        shape = (2,) + shape[1:]  # torch.export specializes a batch of 1
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be (C, H, W) or (N, C, H, W) with positive sizes, got {input_shape!r}")
    g = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=g)


@contextlib.contextmanager
def _quiet():
    """Silence the exporters: deprecation / tracer warnings, dynamo's progress lines and logs."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch.fx.experimental.symbolic_shapes", "torch._dynamo", "onnxscript")
    ]
    levels = [lg.level for lg in loggers]
    out = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(out):
                yield out
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _torch_export(m: nn.Module, x: torch.Tensor, path: str, opset: int, dynamo: bool, batch_dynamic: bool) -> None:
    kw: Dict[str, Any] = dict(input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset)
    if dynamo:
        _require("onnxscript")
        if batch_dynamic:
            kw["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=1 << 20)},)
        kw.update(dynamo=True, external_data=False, verbose=False)
    else:
        if batch_dynamic:
            kw["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        # constant folding would fold the weight QuantizeLinear -> DequantizeLinear into an fp32 constant
        kw.update(dynamo=False, do_constant_folding=False)
    with _quiet():
        try:
            torch.onnx.export(m, (x,), path, **kw)
        except Exception as exc:
            msg = str(exc)
            hint = ""
            if "pycompress" in msg:
                hint = (
                    " (a pycompress custom op reached the exporter: this layer type has no ONNX conversion "
                    "in pycompress.export.onnx.prepare_for_onnx)"
                )
            raise RuntimeError(
                f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'} exporter, opset {opset}) "
                f"failed: {type(exc).__name__}: {msg[:2000]}{hint}"
            ) from exc


def export_onnx(
    model: nn.Module,
    path: Union[str, os.PathLike],
    input_shape: Sequence[int],
    *,
    opset: Optional[int] = 17,
    dynamo: bool = False,
    batch_dynamic: bool = True,
    force: bool = False,
    bias_int32: bool = False,
) -> Dict[str, Any]:
    """Write ``model`` (a loaded artifact, a QAT model, or a float model of the zoo) to ``path`` as
    ONNX with quantized weights as int8 initializers + DequantizeLinear (module docstring).

    ``input_shape``: ``(C, H, W)`` (or ``(N, C, H, W)``); the batch axis is dynamic unless
    ``batch_dynamic=False``. ``opset``: 13..17 with the TorchScript exporter (``dynamo=False``,
    the default; per-channel Q/DQ needs 13); with ``dynamo=True`` (needs onnxscript) at least 18
    (its op library starts there; a lower ``opset`` is raised to 18). ``bias_int32``: store the biases of
    quantized convs / gemms as int32 with scale ``x_scale * w_scale`` (ORT fuses QLinearConv with or
    without it; off by default because it adds a rounding of the bias). The file is written
    atomically; an existing ``path`` is refused unless ``force``.

    Returns facts: ``path``, ``file_bytes``, ``opset``, ``exporter``, ``qdq_nodes``
    ({"QuantizeLinear": n, "DequantizeLinear": n}), ``weight_int8_initializers`` (weights stored as
    codes), ``activation_qdq`` (activation QuantizeLinear nodes), ``bias_int32`` (biases stored as
    int32), ``int4_as_int8`` (some weights have fewer than 8 bits and are stored in int8),
    ``weight_bits`` / ``act_bits`` (the widths present), ``fp32_weight_bytes_removed``, ``ops``
    (op type counts), ``input_shape``, ``input_name``, ``output_name``, ``converted_from_qat``,
    ``bias_rounding_max`` (the largest change ORT's int32 bias rounding makes to a conv bias, in
    output units; see :func:`integer_bias_reference`)."""
    onnx_mod = _require("onnx")
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    opset = int(opset if opset is not None else 18 if dynamo else 17)
    if dynamo:
        opset = max(opset, 18)  # the dynamo exporter's torchlib starts at opset 18
    if not dynamo and not 7 <= opset <= 17:
        raise ValueError(f"opset {opset}: the TorchScript exporter writes opsets up to 17; use dynamo=True for newer")
    m, pfacts = prepare_for_onnx(model)
    quantized = bool(pfacts["weight_bits"] or pfacts["act_bits"])
    if quantized and opset < 13:
        raise ValueError(f"opset {opset}: per-channel QuantizeLinear/DequantizeLinear needs opset >= 13")
    x = _input_example(input_shape, batch_dynamic)
    with torch.no_grad():
        m(x)  # fail here, with a torch error, rather than deep inside the exporter
    if dynamo:
        if not hasattr(getattr(torch.onnx, "ops", None), "symbolic"):
            raise RuntimeError(
                f"dynamo=True needs torch.onnx.ops.symbolic (torch >= 2.8; this is "
                f"{torch.__version__}); use the TorchScript exporter (dynamo=False)"
            )
        for mod in m.modules():
            if isinstance(mod, _ExportQuantMixin):
                mod._onnx_symbolic = True
    with tempfile.TemporaryDirectory(prefix="pycompress-onnx-") as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        _torch_export(m, x, raw, opset, dynamo, batch_dynamic)
        model_proto = onnx_mod.load(raw)
    G = _Graph(onnx_mod, model_proto)
    _fold_constants(G)
    n_w, dropped = _rewrite_weights(G)
    n_act, n_wdq = _fix_activation_pairs(G)
    n_bias = _quantize_biases(G) if bias_int32 else 0
    _remove_dead(G)
    int4_as_int8 = any(b < 8 for b in pfacts["weight_bits"])
    meta = {
        "producer": "pycompress.export.onnx",
        "pycompress.weight_bits": ",".join(map(str, pfacts["weight_bits"])) or "float",
        "pycompress.act_bits": ",".join(map(str, pfacts["act_bits"])) or "float",
        "pycompress.weights": "int8 codes -> DequantizeLinear(axis=0)" if n_w else "fp32",
    }
    if int4_as_int8:
        meta["pycompress.int4_as_int8"] = (
            "true: weights of fewer than 8 bits are stored as int8 initializers in "
            "the int8 range (their codes fit; ONNX has no integer conv below 8 bits)"
        )
    for n in model_proto.graph.node:  # the dynamo exporter's per-node stack traces (local paths)
        del n.metadata_props[:]
        n.doc_string = ""
    del model_proto.metadata_props[:]
    for k, v in meta.items():
        model_proto.metadata_props.add(key=k, value=v)
    model_proto.producer_name = "pycompress"
    onnx_mod.checker.check_model(model_proto, full_check=True)
    data = model_proto.SerializeToString()
    from ..utils import atomic_write_bytes

    atomic_write_bytes(path, data)
    ops = Counter(n.op_type for n in model_proto.graph.node)
    opset_written = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    return {
        "path": path,
        "file_bytes": len(data),
        "opset": int(opset_written),
        "exporter": "dynamo" if dynamo else "torchscript",
        "qdq_nodes": {
            "QuantizeLinear": ops.get("QuantizeLinear", 0),
            "DequantizeLinear": ops.get("DequantizeLinear", 0),
        },
        "weight_int8_initializers": n_w,
        "weight_dequantize_nodes": n_wdq,
        "activation_qdq": n_act,
        "bias_int32": n_bias,
        "int4_as_int8": int4_as_int8,
        "weight_bits": pfacts["weight_bits"],
        "act_bits": pfacts["act_bits"],
        "fp32_weight_bytes_removed": dropped,
        "ops": dict(sorted(ops.items())),
        "input_shape": list(x.shape[1:]),
        "batch_dynamic": batch_dynamic,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "converted_from_qat": pfacts["converted_from_qat"],
        "bias_rounding_max": pfacts["bias_rounding_max"],
    }


# ------------------------------------------------------------------------------------ ONNX Runtime
def ort_session(
    path: Union[str, os.PathLike],
    optimize: Union[bool, str] = True,
    threads: Optional[int] = None,
    optimized_model_filepath: Optional[str] = None,
    disabled_optimizers: Sequence[str] = (),
):
    """An ``onnxruntime.InferenceSession`` on the CPU provider. ``optimize``: True (ORT's default,
    ``ORT_ENABLE_ALL``), False (``ORT_DISABLE_ALL``), or one of "disable", "basic", "extended",
    "all". ``threads``: intra-op threads (None: ORT's default). ``disabled_optimizers``: ORT graph
    transformers to skip, e.g. ``["WeightBiasQuantization"]`` keeps conv biases fp32 (exact
    against torch, but then no conv fuses into QLinearConv)."""
    ort = _require("onnxruntime")
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    key = {True: "all", False: "disable"}.get(optimize, optimize) if isinstance(optimize, bool) else optimize
    if key not in levels:
        raise ValueError(f"optimize must be True, False or one of {list(levels)}, got {optimize!r}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[key]
    so.log_severity_level = 3
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    if optimized_model_filepath is not None:
        so.optimized_model_filepath = os.fspath(optimized_model_filepath)
    kw = {"disabled_optimizers": list(disabled_optimizers)} if disabled_optimizers else {}
    return ort.InferenceSession(os.fspath(path), so, providers=["CPUExecutionProvider"], **kw)


def ort_run(session, x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """The first output of ``session`` on one input batch (fp32)."""
    arr = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(arr)})[0]


def ort_predict(
    path_or_session,
    loader: Iterable,
    *,
    optimize: Union[bool, str] = True,
    threads: Optional[int] = None,
    logits: bool = False,
) -> Dict[str, Any]:
    """Run an ONNX model on a loader of ``(x, y)`` batches (or bare ``x`` batches). Returns
    ``{"top1", "top5", "samples", "predictions": LongTensor}`` (accuracies in percent, None without
    labels) plus ``"logits"`` (fp32 tensor) when ``logits=True``."""
    sess = path_or_session
    if isinstance(path_or_session, (str, os.PathLike)):
        sess = ort_session(path_or_session, optimize=optimize, threads=threads)
    preds, outs = [], []
    n = c1 = c5 = 0
    labelled = True
    for batch in loader:
        if isinstance(batch, (list, tuple)):
            x, y = batch[0], (batch[1] if len(batch) > 1 else None)
        else:
            x, y = batch, None
        out = torch.from_numpy(ort_run(sess, x)).float()
        preds.append(out.argmax(1))
        if logits:
            outs.append(out)
        n += out.shape[0]
        if y is None:
            labelled = False
            continue
        y = torch.as_tensor(y).view(-1)
        k = min(5, out.shape[1])
        top = out.topk(k, 1).indices
        c1 += int((top[:, 0] == y).sum())
        c5 += int((top == y[:, None]).any(1).sum())
    res: Dict[str, Any] = {
        "top1": 100.0 * c1 / n if n and labelled else None,
        "top5": 100.0 * c5 / n if n and labelled else None,
        "samples": n,
        "predictions": torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long),
    }
    if logits:
        res["logits"] = torch.cat(outs) if outs else torch.zeros(0)
    return res


def count_fused(
    path: Union[str, os.PathLike],
    optimize: Union[bool, str] = True,
    *,
    threads: Optional[int] = None,
    save_to: Optional[str] = None,
) -> Dict[str, int]:
    """Op-type counts of the graph ONNX Runtime actually runs (the CPU provider's optimized graph,
    saved through ``SessionOptions.optimized_model_filepath``): e.g. ``QLinearConv`` (convs fused to
    integer kernels), ``QLinearMatMul`` / ``QGemm``, ``Conv`` (still fp32), ``DequantizeLinear``.
    The ops of ``FUSED_OPS`` are always present (0 when absent)."""
    onnx_mod = _require("onnx")
    with tempfile.TemporaryDirectory(prefix="pycompress-ort-") as tmp:
        out = os.fspath(save_to) if save_to else os.path.join(tmp, "optimized.onnx")
        ort_session(path, optimize=optimize, threads=threads, optimized_model_filepath=out)
        g = onnx_mod.load(out, load_external_data=False)
    counts = Counter(n.op_type for n in g.graph.node)
    res = {k: 0 for k in FUSED_OPS}
    res.update(counts)
    return dict(sorted(res.items()))
