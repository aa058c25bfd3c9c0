"""Inference layers of a loaded artifact: integer weight codes, per-channel scales, activation scales.

``QuantizedConv2d`` / ``QuantizedLinear`` are what a QAT layer becomes in a loaded ``.pcz`` file::

    forward(x) = layer(Q_a(x), weight, bias),    weight = weight_codes * weight_scale[c]

* ``weight_codes`` (int8, or int16 above 8 bits) and ``weight_scale`` (fp32 per output channel,
  folded BatchNorm included, so it may be negative) are the stored state; ``weight`` is the
  dequantized fp32 weight, a non-persistent buffer computed from them once at load time (the
  same fp32 product the QAT layer's fake-quantization computes, so an unfolded layer gives the
  very same weight bits).
* ``Q_a`` is the activation fake-quantization the QAT layer applied to its input:
  ``s * clamp(rint(x / s), qmin, qmax)`` with the stored ``act_scale`` s and the grid of
  ``act_bits`` / ``act_signed``, through ``pycompress.ops.fake_quantize`` (any backend); None when
  the layer's input was not quantized.
* Depthwise convolutions run on ``pycompress.ops.depthwise_conv2d`` as in training
  (``pycompress.nn.conv2d``). While ``torch.onnx.export`` runs, the layers call torch's own
  ``fake_quantize_per_*_affine`` and ``F.conv2d`` instead, which the ONNX exporter turns into
  QuantizeLinear / DequantizeLinear nodes (see ``pycompress.export.onnx``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["QuantizedConv2d", "QuantizedLinear", "QUANTIZED_LAYERS"]


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


class _Quantized:
    """Shared state handling of the two quantized inference layers (a mixin before the torch class)."""

    weight_bits: Optional[int]
    act_bits: Optional[int]
    act_signed: Optional[bool]

    def _init_quant(self, weight_bits: Optional[int], act_bits: Optional[int], act_signed: Optional[bool]) -> None:
        self.weight_bits, self.act_bits, self.act_signed = weight_bits, act_bits, act_signed
        w = self._parameters.pop("weight")
        shape, device = w.shape, w.device
        if weight_bits is not None:
            self.register_buffer("weight_codes", torch.zeros(shape, dtype=_code_dtype(weight_bits), device=device))
            self.register_buffer("weight_scale", torch.ones(shape[0], dtype=torch.float32, device=device))
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.float32, device=device), persistent=False)
        else:  # float weight, quantized input only
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.float32, device=device))
        if self.bias is not None:
            b = self._parameters.pop("bias")
            self.register_buffer("bias", b.detach().float())
        if act_bits is not None:
            self.register_buffer("act_scale", torch.ones(1, dtype=torch.float32, device=device))

    def act_range(self) -> Tuple[int, int]:
        from ..ops import quant_range

        return quant_range(self.act_bits, bool(self.act_signed))

    def weight_range(self) -> Tuple[int, int]:
        from ..ops import quant_range

        return quant_range(self.weight_bits, True)

    def refresh_weight(self) -> None:
        """Recompute the dequantized ``weight`` from ``weight_codes`` and ``weight_scale``."""
        if self.weight_bits is None:
            return
        shape = (-1,) + (1,) * (self.weight_codes.dim() - 1)
        with torch.no_grad():
            self.weight.copy_(self.weight_codes.float() * self.weight_scale.view(shape))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.refresh_weight()

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        qmin, qmax = self.act_range()
        if torch.onnx.is_in_onnx_export():
            return _onnx_act_quant(x, self.act_scale, qmin, qmax)
        from ..ops import fake_quantize

        return fake_quantize(x, self.act_scale, 0, qmin, qmax)

    def _export_weight(self) -> torch.Tensor:
        """The weight as the ONNX exporter should see it: a per-channel fake-quantization of the
        dequantized weight in the int8 range (which returns the same values), so the exporter
        writes QuantizeLinear -> DequantizeLinear(axis=0); pycompress.export.onnx then stores the
        codes as an int8 initializer."""
        if self.weight_bits is None or not torch.onnx.is_in_onnx_export():
            return self.weight
        if self.weight_bits > 8:
            return self.weight  # no int16 Q/DQ below opset 21: exported as the float values
        neg = self.weight_scale < 0
        if self.weight_bits == 8 and bool((neg.view((-1,) + (1,) * (self.weight_codes.dim() - 1))
                                           & (self.weight_codes == -128)).any()):
            raise ValueError("ONNX export: an 8-bit channel with a negative folded scale holds code -128, whose "
                             "negation does not fit int8; export with fold_bn=False (--no-fold-bn)")
        scale = self.weight_scale.abs()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.zeros(scale.shape, dtype=torch.int32, device=scale.device)
        return torch.fake_quantize_per_channel_affine(self.weight, scale, zp, 0, -128, 127)

    def _quant_repr(self) -> str:
        a = "float" if self.act_bits is None else f"{self.act_bits}-bit {'signed' if self.act_signed else 'unsigned'}"
        w = "float" if self.weight_bits is None else f"{self.weight_bits}-bit codes"
        return f"weight={w}, input={a}"


def _onnx_act_quant(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Activation fake-quantization written with torch ops the ONNX exporters know: grids narrower
    than 8 bits clamp first, then quantize on the 8-bit grid of the same sign (identical values)."""
    if qmax - qmin > 255:
        raise ValueError(f"ONNX export: {qmax - qmin + 1}-level activation grids (more than 8 bits) have no "
                         f"QuantizeLinear below opset 21; quantize activations to at most 8 bits")
    s = float(scale.reshape(-1)[0])
    lo, hi = (-128, 127) if qmin < 0 else (0, 255)
    if (qmin, qmax) != (lo, hi):
        x = torch.clamp(x, qmin * s, qmax * s)
    return torch.fake_quantize_per_tensor_affine(x, s, 0, lo, hi)


class QuantizedConv2d(_Quantized, nn.Conv2d):
    """A conv layer of a loaded artifact (see the module docstring). Built from a plain conv's
    geometry with :meth:`like`; its state comes from the artifact."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, padding_mode="zeros", *, weight_bits: Optional[int], act_bits: Optional[int],
                 act_signed: Optional[bool], device=None):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode, device=device)
        self._init_quant(weight_bits, act_bits, act_signed)

    @classmethod
    def like(cls, conv: nn.Conv2d, *, bias: bool, weight_bits, act_bits, act_signed) -> "QuantizedConv2d":
        return cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                   conv.groups, bias, conv.padding_mode, weight_bits=weight_bits, act_bits=act_bits,
                   act_signed=act_signed, device="meta" if conv.weight.is_meta else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        w = self._export_weight()
        if self.padding_mode != "zeros" or torch.onnx.is_in_onnx_export():
            return nn.Conv2d._conv_forward(self, x, w, self.bias)
        from ..nn import conv2d

        return conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._quant_repr()}"


class QuantizedLinear(_Quantized, nn.Linear):
    """A linear layer of a loaded artifact (see the module docstring)."""

    def __init__(self, in_features, out_features, bias=True, *, weight_bits: Optional[int],
                 act_bits: Optional[int], act_signed: Optional[bool], device=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device)
        self._init_quant(weight_bits, act_bits, act_signed)

    @classmethod
    def like(cls, lin: nn.Linear, *, bias: bool, weight_bits, act_bits, act_signed) -> "QuantizedLinear":
        return cls(lin.in_features, lin.out_features, bias, weight_bits=weight_bits, act_bits=act_bits,
                   act_signed=act_signed, device="meta" if lin.weight.is_meta else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self._export_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


QUANTIZED_LAYERS = (QuantizedConv2d, QuantizedLinear)
