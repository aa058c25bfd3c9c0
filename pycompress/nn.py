"""Layers on pycompress's fused ops.

- :class:`DepthwiseConv2d`: a drop-in for ``nn.Conv2d(C, C, k, groups=C)`` (same parameters, same
  state-dict keys) whose forward runs ``pycompress.ops.depthwise_conv2d`` on the backend
  ``pycompress.backends`` selects.
- :class:`DepthwiseConvBNAct`: depthwise conv + BatchNorm (folded, inference) + ReLU6 / ReLU in one
  kernel (``pycompress.ops.depthwise_conv2d_bn_act``).
- :func:`swap_depthwise`: replaces, in place, every depthwise ``nn.Conv2d`` of a model that the
  kernels support by a :class:`DepthwiseConv2d` sharing its parameters; with ``fuse=True`` (a model
  in eval mode) it also fuses each depthwise conv -> BatchNorm2d -> ReLU6/ReLU run inside an
  ``nn.Sequential``.
- :func:`conv2d`: ``F.conv2d`` that routes supported depthwise convolutions to the fused op (the
  QAT conv layer uses it, so quantized depthwise layers keep the fast kernel).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import backends
from .ops.depthwise import KERNEL_SIZES, depthwise_conv2d, depthwise_conv2d_bn_act

__all__ = ["DepthwiseConv2d", "DepthwiseConvBNAct", "swap_depthwise", "conv2d", "depthwise_supported"]


def _pair(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def depthwise_supported(conv: nn.Conv2d) -> Optional[str]:
    """None when pycompress's depthwise kernels can run ``conv``, else the reason they cannot."""
    if not isinstance(conv, nn.Conv2d):
        return f"{type(conv).__name__} is not an nn.Conv2d"
    c = conv.in_channels
    if not (conv.groups == c == conv.out_channels):
        return f"not depthwise with channel multiplier 1 (in {c}, out {conv.out_channels}, groups {conv.groups})"
    kh, kw = _pair(conv.kernel_size)
    if kh != kw or kh not in KERNEL_SIZES:
        return f"kernel {kh}x{kw}: the kernels take square kernels of size {list(KERNEL_SIZES)}"
    if any(s not in (1, 2) for s in _pair(conv.stride)):
        return f"stride {conv.stride}: the kernels take strides 1 and 2"
    if isinstance(conv.padding, str):
        return f"padding {conv.padding!r}: give explicit padding"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: the kernels zero-pad"
    return None


def _autocast(x: torch.Tensor, weight: torch.Tensor):
    """The dtypes F.conv2d would compute in under autocast: both cast to the autocast dtype."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return x.to(dt), weight.to(dt)
    return x, weight


def _conv_geometry_reason(x: torch.Tensor, weight: torch.Tensor, stride, padding, groups: int) -> Optional[str]:
    """None when a depthwise convolution (groups == in channels == out channels) fits the kernels,
    else why not."""
    kh, kw = weight.shape[2], weight.shape[3]
    if kh != kw or kh not in KERNEL_SIZES:
        return f"kernel {kh}x{kw}: the kernels take square kernels of size {list(KERNEL_SIZES)}"
    if isinstance(padding, str):
        return f"padding {padding!r}: give explicit padding"
    if any(s not in (1, 2) for s in _pair(stride)):
        return f"stride {stride}: the kernels take strides 1 and 2"
    return None


def conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> torch.Tensor:
    """``F.conv2d``, except that a depthwise convolution (groups = in channels = out channels, 4-D
    input) runs on ``pycompress.ops.depthwise_conv2d`` where the kernels support it (square odd
    kernel up to 7, stride 1 or 2, numeric padding).

    Other depthwise geometries run on ``F.conv2d`` under the automatic backend choice; when a
    backend is pinned (``pycompress.backends.use``, ``PYCOMPRESS_BACKEND``) they raise
    ``BackendError`` instead, as an explicit backend never falls back silently. Convolutions that
    are not depthwise are not a pycompress op and always run on ``F.conv2d``."""
    if x.dim() == 4 and weight.dim() == 4 and groups > 1 and groups == x.shape[1] == weight.shape[0]:
        reason = _conv_geometry_reason(x, weight, stride, padding, groups)
        if reason is None:
            xx, ww = _autocast(x, weight)
            if xx.dtype == ww.dtype and xx.is_floating_point():
                return depthwise_conv2d(xx, ww, bias, stride, padding, dilation)
            reason = f"x is {xx.dtype} but the weight is {ww.dtype}"
        pinned = backends.current()
        if pinned != "auto":
            raise backends.BackendError(
                f"backend {pinned!r} cannot run depthwise_conv2d: {reason} (F.conv2d would run it under the "
                "automatic backend choice)"
            )
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(channels, channels, kernel_size, stride, padding, dilation, groups=channels, bias)``
    computed by ``pycompress.ops.depthwise_conv2d``. Same parameters and state-dict keys as the
    nn.Conv2d it replaces; the backend is chosen per call (``pycompress.backends.use``, ...)."""

    def __init__(
        self, channels: int, kernel_size, stride=1, padding=0, dilation=1, bias: bool = True, device=None, dtype=None
    ):
        super().__init__(
            channels,
            channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups=channels,
            bias=bias,
            padding_mode="zeros",
            device=device,
            dtype=dtype,
        )
        reason = depthwise_supported(self)
        if reason:
            raise ValueError(f"DepthwiseConv2d: {reason}")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d holding ``conv``'s own Parameters and buffers (nothing is copied)."""
        reason = depthwise_supported(conv)
        if reason:
            raise ValueError(f"DepthwiseConv2d.from_conv: {reason}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.__dict__.update(
            {k: v for k, v in conv.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")}
        )
        new._parameters = conv._parameters
        new._buffers = conv._buffers
        new._modules = conv._modules
        return new

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x, w = _autocast(input, weight)
        return depthwise_conv2d(x, w, bias, self.stride, self.padding, self.dilation)


_ACTS = {nn.ReLU6: "relu6", nn.ReLU: "relu"}


class DepthwiseConvBNAct(nn.Module):
    """Inference-time fusion of a depthwise conv, a BatchNorm2d (running statistics) and a
    ReLU6 / ReLU (or none): ``act(conv(x) * scale + shift)`` in one kernel, with
    ``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta + (bias - running_mean) * scale``.
    Build it with :meth:`fuse`; it holds the conv weight as a Parameter and scale / shift as buffers."""

    def __init__(
        self,
        weight: torch.Tensor,
        scale: torch.Tensor,
        shift: torch.Tensor,
        stride,
        padding,
        dilation,
        act: str = "relu6",
    ):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("shift", shift.detach().float().clone())
        self.stride, self.padding, self.dilation, self.act = _pair(stride), _pair(padding), _pair(dilation), act

    @classmethod
    @torch.no_grad()
    def fuse(cls, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], act: Optional[nn.Module]) -> "DepthwiseConvBNAct":
        reason = depthwise_supported(conv)
        if reason:
            raise ValueError(f"DepthwiseConvBNAct.fuse: {reason}")
        C = conv.out_channels
        w = conv.weight
        bias = conv.bias.float() if conv.bias is not None else torch.zeros(C, device=w.device)
        if bn is not None:
            if bn.running_var is None or not bn.track_running_stats:
                raise ValueError("DepthwiseConvBNAct.fuse: the BatchNorm has no running statistics")
            scale = (bn.weight.float() if bn.weight is not None else torch.ones(C, device=w.device)) / torch.sqrt(
                bn.running_var.float() + bn.eps
            )
            beta = bn.bias.float() if bn.bias is not None else torch.zeros(C, device=w.device)
            shift = beta + (bias - bn.running_mean.float()) * scale
        else:
            scale, shift = torch.ones(C, device=w.device), bias
        name = "none" if act is None else _ACTS.get(type(act))
        if name is None:
            raise ValueError(
                f"DepthwiseConvBNAct.fuse: activation {type(act).__name__} is not fusable (ReLU6, ReLU or none)"
            )
        return cls(w, scale, shift, conv.stride, conv.padding, conv.dilation, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, w = _autocast(x, self.weight)
        return depthwise_conv2d_bn_act(x, w, self.scale, self.shift, self.stride, self.padding, self.dilation, self.act)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[0]}, kernel_size={tuple(self.weight.shape[2:])}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, act={self.act}"
        )


def _is_plain_depthwise(m: nn.Module) -> bool:
    return type(m) in (nn.Conv2d, DepthwiseConv2d) and depthwise_supported(m) is None


def swap_depthwise(model: nn.Module, fuse: bool = False) -> int:
    """Replace every supported depthwise ``nn.Conv2d`` of ``model`` (in place) by a
    :class:`DepthwiseConv2d` sharing its parameters; returns how many layers changed.

    ``fuse=True`` (the model must be in eval mode: BatchNorm is folded with its running statistics)
    instead replaces each depthwise conv that is followed, inside an ``nn.Sequential``, by a
    BatchNorm2d and optionally a ReLU6 / ReLU, by one :class:`DepthwiseConvBNAct` (the BatchNorm and
    activation become ``nn.Identity``), and swaps the remaining depthwise convs. Outputs are
    unchanged up to float rounding. Subclasses of nn.Conv2d (QAT layers, ...) are left alone.
    """
    if fuse and model.training:
        raise ValueError("swap_depthwise(fuse=True) folds BatchNorm running statistics: call model.eval() first")
    changed = 0
    if fuse:
        for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
            keys = list(seq._modules)
            i = 0
            while i < len(keys):
                m = seq._modules[keys[i]]
                nxt = seq._modules[keys[i + 1]] if i + 1 < len(keys) else None
                if _is_plain_depthwise(m) and isinstance(nxt, nn.BatchNorm2d):
                    act = seq._modules[keys[i + 2]] if i + 2 < len(keys) else None
                    act = act if type(act) in _ACTS else None
                    seq._modules[keys[i]] = DepthwiseConvBNAct.fuse(m, nxt, act)
                    seq._modules[keys[i + 1]] = nn.Identity()
                    if act is not None:
                        seq._modules[keys[i + 2]] = nn.Identity()
                    changed += 1
                    i += 3 if act is not None else 2
                    continue
                i += 1
    for parent in model.modules():
        for name, child in list(parent._modules.items()):
            if child is not None and type(child) is nn.Conv2d and depthwise_supported(child) is None:
                parent._modules[name] = DepthwiseConv2d.from_conv(child)
                changed += 1
    return changed
