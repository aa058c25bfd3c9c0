"""QuantConv2d and QuantLinear: nn.Conv2d / nn.Linear that fake-quantize their weight and input.

    forward(x) = layer(act_quant(x), weight_quant(weight), bias)

``weight_quant``: per output channel (axis 0), symmetric signed, s_c = max|w_c| / (2^(b-1) - 1) in mode
"max"; in mode "als" MicroNet's alternating-least-squares scale, fit when the quantizer is built
and refit by pycompress.quant.refit_als / ALSRefit (once per epoch), 0 for an all-zero (fully
pruned) output channel (see pycompress.quant.quantizer). ``act_quant``: per tensor on the layer input, zero point 0,
signed or unsigned ("auto": unsigned iff the calibrated minimum is >= 0), its range observed by
``act_observer`` ("minmax" | "percentile" with ``act_percentile``) during calibration. Either is None when its
bit width is None (first / last layer exceptions). The float ``weight`` / ``bias`` Parameters are
the very objects of the float layer (``from_float`` moves them, it does not copy), so state-dict
keys ``weight`` / ``bias`` and an optimizer built on them stay valid; gradients reach the float
weight through the straight-through estimator.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .quantizer import DEFAULT_PERCENTILE, LSQ_EPS, OBSERVERS, FakeQuantizer, check_percentile

__all__ = ["QuantConv2d", "QuantLinear", "QAT_LAYERS", "layer_type"]

_FORWARD_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _is_parametrized(module: nn.Module) -> bool:
    return isinstance(getattr(module, "parametrizations", None), nn.ModuleDict)


def _transfer_state(src: nn.Module, dst: nn.Module) -> None:
    """Move src's parameters, buffers, forward hooks and train/eval mode onto dst (same objects).

    Besides plain layers this carries torch.nn.utils.prune-style masking (``weight_orig`` +
    ``weight_mask`` + a forward pre-hook that sets ``weight``), so pruning and QAT compose.
    """
    dst._parameters = dict(src._parameters)
    dst._buffers = dict(src._buffers)
    dst._non_persistent_buffers_set = set(src._non_persistent_buffers_set)
    for name in ("weight", "bias"):
        if name not in src._parameters and name in src.__dict__:
            object.__setattr__(dst, name, src.__dict__[name])
    for attr in _FORWARD_HOOK_DICTS:
        if hasattr(src, attr) and hasattr(dst, attr):
            getattr(dst, attr).update(getattr(src, attr))
    dst.training = src.training


def _is_depthwise_layer(module: nn.Module) -> bool:
    from ..nn import DepthwiseConv2d

    return type(module) is DepthwiseConv2d


def _check_scale_mode(what: str, value, allowed) -> str:
    if value not in allowed:
        raise ValueError(f"{what} must be one of {list(allowed)}, got {value!r}")
    return value


def _check_bits(what: str, value) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16):
        raise ValueError(f"{what} must be an int in 1..16 or None, got {value!r}")
    return value


class _QuantLayer:
    """Shared quantizer plumbing of QuantConv2d / QuantLinear (a mixin placed before the torch class)."""

    _float_cls: type
    _type_name: str

    def _init_quant(
        self,
        weight_bits,
        act_bits,
        weight_scale,
        act_scale,
        act_signed,
        calib_batches,
        act_observer="minmax",
        act_percentile=DEFAULT_PERCENTILE,
    ) -> None:
        self.register_module("weight_quant", None)
        self.register_module("act_quant", None)
        self.weight_bits: Optional[int] = None
        self.act_bits: Optional[int] = None
        self.weight_scale = "max"
        self.act_scale = "frozen"
        self.act_signed = "auto"
        self.act_observer = "minmax"
        self.act_percentile = DEFAULT_PERCENTILE
        self.calib_batches = 4
        self.configure(
            weight_bits=weight_bits,
            act_bits=act_bits,
            weight_scale=weight_scale,
            act_scale=act_scale,
            act_signed=act_signed,
            calib_batches=calib_batches,
            act_observer=act_observer,
            act_percentile=act_percentile,
        )

    def configure(
        self,
        *,
        weight_bits: Optional[int] = 8,
        act_bits: Optional[int] = 8,
        weight_scale: str = "max",
        act_scale: str = "frozen",
        act_signed="auto",
        calib_batches: int = 4,
        act_observer: str = "minmax",
        act_percentile: float = DEFAULT_PERCENTILE,
    ) -> None:
        """(Re)build the quantizers. The weight is untouched. A quantizer whose configuration is
        unchanged is kept with its state; a changed weight quantizer is re-initialised from the
        current weight; a changed activation quantizer needs calibration again, unless only its
        scale mode changed (then it keeps the calibrated range and scale). act_observer /
        act_percentile choose how calibrate observes the input's range (changing them asks for
        calibration again, except act_percentile while the observer is "minmax")."""
        cls = type(self).__name__
        _check_bits(f"{cls}: weight_bits", weight_bits)
        _check_bits(f"{cls}: act_bits", act_bits)
        _check_scale_mode(f"{cls}: weight_scale", weight_scale, ("max", "frozen", "lsq", "als"))
        _check_scale_mode(f"{cls}: act_scale", act_scale, ("frozen", "lsq"))
        if act_signed not in ("auto", True, False) or (act_signed != "auto" and not isinstance(act_signed, bool)):
            raise ValueError(f"{cls}: act_signed must be 'auto', True or False, got {act_signed!r}")
        if isinstance(calib_batches, bool) or not isinstance(calib_batches, int) or calib_batches < 1:
            raise ValueError(f"{cls}: calib_batches must be an int >= 1, got {calib_batches!r}")
        _check_scale_mode(f"{cls}: act_observer", act_observer, OBSERVERS)
        if not check_percentile(act_percentile):
            raise ValueError(f"{cls}: act_percentile must be a number in (50, 100], got {act_percentile!r}")
        act_percentile = float(act_percentile)
        weight = self.weight
        device = weight.device

        if weight_bits is None:
            self.weight_quant = None
        else:
            cfg = dict(
                bits=weight_bits,
                signed=True,
                axis=0,
                num_channels=weight.shape[0],
                mode=weight_scale,
                kind="weight",
                eps=LSQ_EPS,
            )
            old = self.weight_quant
            if old is None or old.config() != cfg:
                wq = FakeQuantizer(**cfg, device=device)
                if not weight.is_meta:  # a meta layer gets its scale from load_state_dict later
                    wq.init_from(weight.detach())
                self.weight_quant = wq

        if act_bits is None:
            self.act_quant = None
        else:
            cfg = dict(
                bits=act_bits,
                signed=act_signed,
                axis=None,
                num_channels=1,
                mode=act_scale,
                kind="act",
                eps=LSQ_EPS,
                observer=act_observer,
                percentile=act_percentile,
            )
            old = self.act_quant
            if old is None or old.config() != cfg:
                aq = FakeQuantizer(**cfg, device=device)
                same_range = (
                    old is not None
                    and old.observer == act_observer
                    and (act_observer == "minmax" or old.percentile == act_percentile)
                )
                if same_range and old.bits == act_bits and old.signed_config == act_signed:
                    aq.copy_calibration_from(old)
                self.act_quant = aq

        self.weight_bits, self.act_bits = weight_bits, act_bits
        self.weight_scale, self.act_scale, self.act_signed = weight_scale, act_scale, act_signed
        self.act_observer, self.act_percentile = act_observer, act_percentile
        self.calib_batches = calib_batches

    def qconfig(self) -> dict:
        """This layer's entry of pycompress.quant.qat_plan (JSON-serialisable)."""
        return {
            "type": self._type_name,
            "weight_bits": self.weight_bits,
            "act_bits": self.act_bits,
            "weight_scale": self.weight_scale,
            "act_scale": self.act_scale,
            "act_signed": self.act_signed,
            "act_observer": self.act_observer,
            "act_percentile": self.act_percentile,
            "calib_batches": self.calib_batches,
        }

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight the forward uses (differentiable)."""
        w = self.weight
        return w if self.weight_quant is None else self.weight_quant(w)

    def weight_codes(self) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
        """``(codes, scale, bits, qmin)``: the integer codes of the weight (int32, the weight's
        shape) and the fp32 per-output-channel scale the forward uses, so that
        ``codes * scale[c] == quantized_weight()`` bit for bit. No state changes (in mode "max"
        the scale is computed from the current weight, as the next forward would). In mode "als"
        a channel whose stored scale is 0 (all zero when it was fit) has scale 0 and codes 0
        here; its forward output is exactly 0 (pycompress.quant.quantizer.kernel_scale)."""
        from ..ops import quant_range
        from .quantizer import _minmax, kernel_scale, scale_from_range

        wq = self.weight_quant
        if wq is None:
            raise ValueError(f"{type(self).__name__}: the weight is not quantized (weight_bits is None)")
        w = self.weight.detach().float()
        if wq.mode == "max":
            scale = scale_from_range(*_minmax(w, wq.axis), wq.bits, True).float()
        else:
            scale = wq.scale.detach().float()
            if wq.mode == "lsq":
                scale = scale.clamp_min(wq.eps)
        qmin, qmax = quant_range(wq.bits, True)
        c = w.shape[0]
        ks = kernel_scale(scale) if wq.mode == "als" else scale
        codes = torch.round(w.reshape(c, -1) * torch.reciprocal(ks).view(c, 1)).clamp(qmin, qmax)
        if wq.mode == "als":  # code 0 under the stand-in already (finite weights); made explicit
            codes = torch.where(scale.view(c, 1) > 0, codes, torch.zeros_like(codes))
        return codes.reshape(w.shape).to(torch.int32), scale, wq.bits, qmin

    def _quant_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.act_quant is None else self.act_quant(x)

    @classmethod
    def from_float(cls, module: nn.Module, **qconfig):
        """A QAT layer holding module's own Parameters, buffers and forward hooks.

        qconfig: weight_bits, act_bits, weight_scale, act_scale, act_signed, calib_batches,
        act_observer, act_percentile (see configure). The module itself is not modified, but it
        shares its Parameters with the result.
        """
        if type(module) is not cls._float_cls and not _is_depthwise_layer(module):
            raise TypeError(
                f"{cls.__name__}.from_float expects a plain {cls._float_cls.__module__}.{cls._float_cls.__name__}, "
                f"got {type(module).__name__}"
                + (
                    " (remove its torch.nn.utils.parametrize parametrizations first)"
                    if _is_parametrized(module)
                    else ""
                )
            )
        new = cls._empty_like(module)
        _transfer_state(module, new)
        new._float_type = type(module)
        new.configure(**qconfig)
        return new

    def to_float(self, bake: bool = False) -> nn.Module:
        """A plain float layer with this layer's weight, bias, buffers and forward hooks.

        bake=False: the very same Parameters. bake=True: the weight is a new Parameter holding the
        fake-quantized values (the QAT layer is left unchanged); needs ``weight`` to be a Parameter.
        """
        new = self._float_empty_like()
        _transfer_state(self, new)
        if bake and self.weight_quant is not None:
            w = self._parameters.get("weight")
            if not isinstance(w, nn.Parameter):
                raise ValueError(
                    f"{type(self).__name__}.to_float(bake=True) needs weight to be an nn.Parameter; it is computed "
                    f"by a hook or reparametrization here (remove that first, e.g. torch.nn.utils.prune.remove)"
                )
            with torch.no_grad():
                wq = self.weight_quant(w.detach())
            new._parameters["weight"] = nn.Parameter(wq.to(w.dtype), requires_grad=w.requires_grad)
        return new


class QuantConv2d(_QuantLayer, nn.Conv2d):
    """nn.Conv2d with a per-output-channel weight quantizer and a per-tensor input quantizer.

    Same constructor as nn.Conv2d (grouped / depthwise, stride, padding, dilation, padding_mode)
    plus keyword-only quantization settings; ``QuantConv2d.from_float(conv, ...)`` wraps an
    existing layer.
    """

    _float_cls = nn.Conv2d
    _type_name = "conv"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        weight_bits: Optional[int] = 8,
        act_bits: Optional[int] = 8,
        weight_scale: str = "max",
        act_scale: str = "frozen",
        act_signed="auto",
        calib_batches: int = 4,
        act_observer: str = "minmax",
        act_percentile: float = DEFAULT_PERCENTILE,
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
            device,
            dtype,
        )
        self._init_quant(
            weight_bits, act_bits, weight_scale, act_scale, act_signed, calib_batches, act_observer, act_percentile
        )

    @staticmethod
    def _conv_args(m: nn.Conv2d) -> dict:
        return dict(
            in_channels=m.in_channels,
            out_channels=m.out_channels,
            kernel_size=m.kernel_size,
            stride=m.stride,
            padding=m.padding,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
            padding_mode=m.padding_mode,
            device="meta",
        )

    @classmethod
    def _empty_like(cls, m: nn.Conv2d) -> "QuantConv2d":
        return cls(**cls._conv_args(m), weight_bits=None, act_bits=None)

    def _float_empty_like(self) -> nn.Conv2d:
        m = nn.Conv2d(**self._conv_args(self))
        if getattr(self, "_float_type", None) is not None and self._float_type is not nn.Conv2d:
            m.__class__ = self._float_type  # pycompress.nn.DepthwiseConv2d: same state, another forward
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if self.padding_mode != "zeros":
            return nn.Conv2d._conv_forward(self, input, weight, bias)
        # supported depthwise convolutions run on pycompress's depthwise kernel, the rest on F.conv2d
        from ..nn import conv2d

        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{nn.Conv2d.extra_repr(self)}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


class QuantLinear(_QuantLayer, nn.Linear):
    """nn.Linear with a per-output-row weight quantizer and a per-tensor input quantizer."""

    _float_cls = nn.Linear
    _type_name = "linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        weight_bits: Optional[int] = 8,
        act_bits: Optional[int] = 8,
        weight_scale: str = "max",
        act_scale: str = "frozen",
        act_signed="auto",
        calib_batches: int = 4,
        act_observer: str = "minmax",
        act_percentile: float = DEFAULT_PERCENTILE,
    ):
        nn.Linear.__init__(self, in_features, out_features, bias, device, dtype)
        self._init_quant(
            weight_bits, act_bits, weight_scale, act_scale, act_signed, calib_batches, act_observer, act_percentile
        )

    @classmethod
    def _empty_like(cls, m: nn.Linear) -> "QuantLinear":
        return cls(m.in_features, m.out_features, m.bias is not None, device="meta", weight_bits=None, act_bits=None)

    def _float_empty_like(self) -> nn.Linear:
        return nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, weight_bits={self.weight_bits}, act_bits={self.act_bits}"


QAT_LAYERS = (QuantConv2d, QuantLinear)


def layer_type(module: nn.Module) -> Optional[str]:
    """ "conv" for an nn.Conv2d (depthwise and QAT ones included), "linear" for an nn.Linear, else None."""
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    return None
