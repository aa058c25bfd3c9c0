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
  (``pycompress.nn.conv2d``). ``pycompress.export.onnx`` swaps these layers for export-only
  versions that the ONNX exporters turn into QuantizeLinear / DequantizeLinear nodes.
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
        if self.act_bits is not None and prefix + "act_scale" in state_dict:
            # checked once here, so that every forward can skip fake_quantize's value checks
            from ..ops.fake_quantize import check_scale_values

            check_scale_values(self.act_scale, f"{type(self).__name__}: the loaded act_scale", "act_scale")

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits is None:
            return x
        from ..ops import fake_quantize

        qmin, qmax = self.act_range()
        # act_scale is checked when it is loaded: the per-call value checks (tens of us) are skipped
        return fake_quantize(x, self.act_scale, 0, qmin, qmax, check_values=False)

    def _quant_repr(self) -> str:
        a = "float" if self.act_bits is None else f"{self.act_bits}-bit {'signed' if self.act_signed else 'unsigned'}"
        w = "float" if self.weight_bits is None else f"{self.weight_bits}-bit codes"
        return f"weight={w}, input={a}"


class QuantizedConv2d(_Quantized, nn.Conv2d):
    """A conv layer of a loaded artifact (see the module docstring). Built from a plain conv's
    geometry with :meth:`like`; its state comes from the artifact."""

    def __init__(
        self,
        in_channels,
        out_channels,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups=1,
        bias=True,
        padding_mode="zeros",
        *,
        weight_bits: Optional[int],
        act_bits: Optional[int],
        act_signed: Optional[bool],
        device=None,
    ):
        nn.Conv2d.__init__(
            self,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
        )
        self._init_quant(weight_bits, act_bits, act_signed)

    @classmethod
    def like(cls, conv: nn.Conv2d, *, bias: bool, weight_bits, act_bits, act_signed) -> "QuantizedConv2d":
        return cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias,
            conv.padding_mode,
            weight_bits=weight_bits,
            act_bits=act_bits,
            act_signed=act_signed,
            device="meta" if conv.weight.is_meta else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._quant_input(x)
        if self.padding_mode != "zeros":
            return nn.Conv2d._conv_forward(self, x, self.weight, self.bias)
        from ..nn import conv2d

        return conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, {self._quant_repr()}"


class QuantizedLinear(_Quantized, nn.Linear):
    """A linear layer of a loaded artifact (see the module docstring)."""

    def __init__(
        self,
        in_features,
        out_features,
        bias=True,
        *,
        weight_bits: Optional[int],
        act_bits: Optional[int],
        act_signed: Optional[bool],
        device=None,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device)
        self._init_quant(weight_bits, act_bits, act_signed)

    @classmethod
    def like(cls, lin: nn.Linear, *, bias: bool, weight_bits, act_bits, act_signed) -> "QuantizedLinear":
        return cls(
            lin.in_features,
            lin.out_features,
            bias,
            weight_bits=weight_bits,
            act_bits=act_bits,
            act_signed=act_signed,
            device="meta" if lin.weight.is_meta else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._quant_repr()}"


QUANTIZED_LAYERS = (QuantizedConv2d, QuantizedLinear)
