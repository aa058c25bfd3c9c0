"""depthwise_conv2d and depthwise_conv2d_bn_act: depthwise 3x3 / 5x5 / 7x7 convolution, forward and
backward, in four backends, with a fused per-channel affine + activation epilogue.

Both public functions validate every argument before any kernel runs, choose a backend
(pycompress.backends) and call the registered op ``pycompress::depthwise_conv2d`` through its entry
(``pycompress.ops.registry``), which has a fake kernel and an autograd formula
(``torch.compile(fullgraph=True)`` sees one node; opcheck passes). Plain eager calls run the same
forward and backward without the custom-op dispatch (the registry's eager path).
The arithmetic is specified in ``pycompress.ops.depthwise_ref``.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import depthwise_ref as _ref
from .depthwise_ref import ACTS, out_size
from .registry import Kernel, KernelSet, call, declare, dtype_in, on_device

__all__ = ["depthwise_conv2d", "depthwise_conv2d_bn_act", "KERNEL_SIZES"]

KERNEL_SIZES = (1, 3, 5, 7)
IntPair = Union[int, Sequence[int]]


# --------------------------------------------------------------------------------------------
# the declaration: layout helpers, kernels, supports, registered ops


def _layout(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels take it: contiguous NCHW, or channels_last kept as it is."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def _format(x: torch.Tensor):
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _empty_out(x, weight, params):
    sh, sw, ph, pw, dh, dw = params
    N, C, H, W = x.shape
    kh, kw = weight.shape[2], weight.shape[3]
    shape = (N, C, out_size(H, kh, sh, ph, dh), out_size(W, kw, sw, pw, dw))
    return x.new_empty(shape).contiguous(memory_format=_format(x))


def _fwd_fake(x, weight, scale, shift, sh, sw, ph, pw, dh, dw, act):
    return _empty_out(x, weight, (sh, sw, ph, pw, dh, dw))


def _bwd_input_fake(grad_out, weight, H, W, sh, sw, ph, pw, dh, dw):
    N, C = grad_out.shape[:2]
    return grad_out.new_empty((N, C, H, W)).contiguous(memory_format=_format(grad_out))


def _bwd_weight_fake(grad_out, x, kh, kw, sh, sw, ph, pw, dh, dw, with_bias):
    C = x.shape[1]
    return (
        x.new_empty((C, 1, kh, kw), dtype=torch.float32),
        x.new_empty((C,) if with_bias else (0,), dtype=torch.float32),
    )


# The kernel-level functions every backend implements (contracts: depthwise_ref).
KERNELS = KernelSet(
    "depthwise",
    triton_module="depthwise",
    fwd=Kernel(_ref.depthwise_fwd_ref, cpp="_depthwise_fwd", triton="depthwise_fwd", fake=_fwd_fake),
    bwd_input=Kernel(
        _ref.depthwise_bwd_input_ref, cpp="_depthwise_bwd_input", triton="depthwise_bwd_input", fake=_bwd_input_fake
    ),
    bwd_weight=Kernel(
        _ref.depthwise_bwd_weight_ref, cpp="_depthwise_bwd_weight", triton="depthwise_bwd_weight", fake=_bwd_weight_fake
    ),
)

OP = declare(
    "depthwise_conv2d", reference=_ref.depthwise_conv2d_ref, kernels=KERNELS, supports=[on_device("x"), dtype_in("x")]
)


def _forward_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    params: Sequence[int],
    act: int,
    backend: str,
) -> torch.Tensor:
    """act(conv(x, weight) * scale + shift); scale / shift fp32 [C] or empty (1 / 0)."""
    sh, sw, ph, pw, dh, dw = params
    if x.numel() == 0:
        return torch.zeros_like(_empty_out(x, weight, params))
    return KERNELS.table(backend).fwd(_layout(x), weight.contiguous(), scale, shift, sh, sw, ph, pw, dh, dw, act)


def _forward_fake(x, weight, scale, shift, params, act, backend):
    return _empty_out(x, weight, params)


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, params, act, backend = inputs
    ctx.params, ctx.act, ctx.backend = list(params), act, backend
    ctx.save_for_backward(x, weight, scale, shift)


def _backward_impl(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    params: Sequence[int],
    act: int,
    backend: str,
    needs: Sequence[bool],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_weight, grad_scale, grad_shift); an entry not asked for in ``needs`` (or for an
    empty scale / shift) is an empty tensor."""
    sh, sw, ph, pw, dh, dw = params
    need_x, need_w, need_scale, need_shift = needs
    need_scale, need_shift = need_scale and scale.numel() > 0, need_shift and shift.numel() > 0
    C = x.shape[1]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    kernels = KERNELS.table(backend)
    fwd, bwd_in, bwd_w = kernels.fwd, kernels.bwd_input, kernels.bwd_weight
    grad = _layout(grad.contiguous(memory_format=_format(x)))
    g_scale = g_shift = None
    if x.numel() == 0:
        gc = grad
    elif act != 0 or scale.numel() > 0:
        # Recompute the convolution (cheaper than keeping it alive) for the activation's mask and
        # the scale's gradient: z = c * scale + shift; grad_c = grad * act'(z) * scale.
        c = fwd(_layout(x), weight.contiguous(), scale.new_empty(0), shift.new_empty(0), sh, sw, ph, pw, dh, dw, 0)
        cf = c.to(ct)
        z = cf
        if scale.numel():
            z = z * scale.view(1, C, 1, 1)
        if shift.numel():
            z = z + shift.view(1, C, 1, 1)
        gz = grad.to(ct)
        zero = torch.zeros((), dtype=ct, device=gz.device)
        if act == 1:
            gz = torch.where(z > 0, gz, zero)
        elif act == 2:
            gz = torch.where((z > 0) & (z < 6), gz, zero)
        if need_shift:
            g_shift = gz.sum(dim=(0, 2, 3))
        if need_scale:
            g_scale = (gz * cf).sum(dim=(0, 2, 3))
        gc = gz * scale.view(1, C, 1, 1) if scale.numel() else gz
        gc = _layout(gc.to(x.dtype).contiguous(memory_format=_format(x)))
    else:
        gc = grad
    g_x, g_w = x.new_empty(0), x.new_empty(0)  # distinct objects: outputs may not alias each other
    if need_x:
        g_x = (
            torch.zeros_like(x)
            if x.numel() == 0
            else bwd_in(gc, weight.contiguous(), x.shape[2], x.shape[3], sh, sw, ph, pw, dh, dw)
        )
        # x's format, as the fake promises: the kernels take the format from grad, which is both
        # NCHW- and channels_last-contiguous when the output is 1x1 (and x may be a permuted view)
        g_x = g_x.contiguous(memory_format=_format(x))
    bias_via_kernel = need_shift and g_shift is None
    if need_w or bias_via_kernel:
        if x.numel() == 0:
            gw32 = torch.zeros(weight.shape, dtype=ct, device=x.device)
            gb32 = torch.zeros(C, dtype=ct, device=x.device)
        else:
            gw32, gb32 = bwd_w(
                gc, _layout(x), weight.shape[2], weight.shape[3], sh, sw, ph, pw, dh, dw, bias_via_kernel
            )
        if need_w:
            g_w = gw32.to(weight.dtype)
        if bias_via_kernel:
            g_shift = gb32
    g_scale = x.new_empty(0, dtype=scale.dtype) if g_scale is None else g_scale.to(scale.dtype)
    g_shift = x.new_empty(0, dtype=shift.dtype) if g_shift is None else g_shift.to(shift.dtype)
    # A registered op's outputs may not alias its inputs or each other (a kernel may hand back a
    # buffer it was given, e.g. a 1x1 kernel's input gradient).
    seen = [t.untyped_storage().data_ptr() for t in (grad, x, weight, scale, shift) if t.numel()]
    outs = []
    for t in (g_x, g_w, g_scale, g_shift):
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in seen:
                t = t.clone()
                ptr = t.untyped_storage().data_ptr()
            seen.append(ptr)
        outs.append(t)
    return tuple(outs)


def _backward_fake(grad, x, weight, scale, shift, params, act, backend, needs):
    need_x, need_w, need_scale, need_shift = needs
    gx = torch.empty_like(x, memory_format=_format(x)) if need_x else x.new_empty(0)
    gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else x.new_empty(0)
    gs = scale.new_empty(scale.shape if need_scale and scale.numel() else (0,))
    gb = shift.new_empty(shift.shape if need_shift and shift.numel() else (0,))
    return gx, gw, gs, gb


# pycompress::depthwise_conv2d_backward: the whole backward as one registered op, so AOTAutograd
# traces it as one node whatever the backend.
_BACKWARD = OP.define("depthwise_conv2d_backward", _backward_impl, fake=_backward_fake)


def _backward(ctx, grad):
    """Inputs that need no gradient (and an empty scale / shift) get None."""
    x, weight, scale, shift = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad[:4]]
    gx, gw, gs, gb = call(ctx, _BACKWARD, grad, x, weight, scale, shift, ctx.params, ctx.act, ctx.backend, needs)
    return (
        gx if needs[0] else None,
        gw if needs[1] else None,
        gs if needs[2] and scale.numel() else None,
        gb if needs[3] and shift.numel() else None,
        None,
        None,
        None,
    )


# pycompress::depthwise_conv2d: act(conv(x, weight) * scale + shift); scale / shift fp32 [C] or
# empty (1 / 0). Its fake, its autograd and the eager path (DEPTHWISE(...)).
DEPTHWISE = OP.define(
    "depthwise_conv2d", _forward_impl, fake=_forward_fake, setup_context=_setup_context, backward=_backward
)


# --------------------------------------------------------------------------------------------
# argument checks


def _pair(name: str, v, fn: str, low: int, allowed: Optional[Tuple[int, ...]] = None) -> Tuple[int, int]:
    if type(v) is int:  # the common cases first: the ABC checks below cost microseconds per call
        vals = (v, v)
    elif type(v) in (tuple, list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        vals = tuple(v)
    else:
        vals = [v, v] if isinstance(v, numbers.Integral) and not isinstance(v, bool) else v
        if (
            not isinstance(vals, (list, tuple))
            or len(vals) != 2
            or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in vals)
        ):
            raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
        vals = [int(t) for t in vals]
    for t in vals:
        if t < low:
            raise ValueError(f"{fn}: {name} must be >= {low}, got {v!r}")
        if allowed is not None and t not in allowed:
            raise ValueError(f"{fn}: {name} must be one of {list(allowed)} (the kernels' strides), got {v!r}")
    return vals[0], vals[1]


_GEOMETRY_LIMIT = 1 << 24


def _check(fn: str, x, weight, stride, padding, dilation) -> List[int]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: weight must be a tensor, got {type(weight).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"{fn}: x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    C = x.shape[1]
    if weight.dim() != 4 or weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(
            f"{fn}: weight must be [C, 1, k, k] with C = x.shape[1] = {C} (a depthwise conv: groups = channels, "
            f"channel multiplier 1), got shape {tuple(weight.shape)}"
        )
    kh, kw = weight.shape[2], weight.shape[3]
    if kh != kw or kh not in KERNEL_SIZES:
        raise ValueError(f"{fn}: the kernel must be square with an odd size in {list(KERNEL_SIZES)}, got {kh}x{kw}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{fn}: weight has dtype {weight.dtype} but x has {x.dtype}; cast one of them")
    if weight.device != x.device:
        raise ValueError(f"{fn}: weight is on {weight.device} but x is on {x.device}; put them on one device")
    sh, sw = _pair("stride", stride, fn, 1, (1, 2))
    ph, pw = _pair("padding", padding, fn, 0)
    dh, dw = _pair("dilation", dilation, fn, 1)
    if max(ph, pw, dh, dw) > _GEOMETRY_LIMIT:
        # the kernels index a padded plane in 32 bits; no real layer comes near this
        raise ValueError(
            f"{fn}: padding and dilation must be at most 2**24, got padding {(ph, pw)}, dilation {(dh, dw)}"
        )
    H, W = x.shape[2], x.shape[3]
    if H < 1 or W < 1:
        raise ValueError(f"{fn}: x must have a spatial size of at least 1x1, got {H}x{W}")
    Ho, Wo = out_size(H, kh, sh, ph, dh), out_size(W, kw, sw, pw, dw)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{fn}: the output would be empty ({Ho}x{Wo}): input {H}x{W}, kernel {kh}, stride {(sh, sw)}, "
            f"padding {(ph, pw)}, dilation {(dh, dw)}"
        )
    return [sh, sw, ph, pw, dh, dw]


def _channel_vector(name: str, v, x: torch.Tensor, fn: str) -> torch.Tensor:
    C = x.shape[1]
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor of {C} elements, got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {v.dtype}")
    if v.dim() != 1 or v.numel() != C:
        raise ValueError(f"{fn}: {name} must be 1-D with C = {C} elements, got shape {tuple(v.shape)}")
    if v.device != x.device:
        raise ValueError(f"{fn}: {name} is on {v.device} but x is on {x.device}; put them on one device")
    # fp32 for the kernels; fp64 inputs (reference backend) keep fp64 throughout
    return v.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()


# --------------------------------------------------------------------------------------------
# public ops


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Depthwise 2-D convolution: ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16 (float64 on the reference backend), NCHW or
            channels_last (the output keeps x's memory format; other strides are made contiguous).
        weight: [C, 1, k, k], k in 1, 3, 5, 7, x's dtype and device.
        bias: None or [C] (any float dtype; added in fp32).
        stride: 1 or 2 (an int or a pair); padding: >= 0 (zero padding); dilation: >= 1.
    Forward and backward (x, weight and bias gradients) accumulate in fp32. Anything the kernels do
    not support (other strides, even or non-square kernels, a channel multiplier other than 1) is
    refused with a ValueError, never computed wrongly.
    """
    fn = "depthwise_conv2d"
    params = _check(fn, x, weight, stride, padding, dilation)
    pdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    shift = x.new_empty(0, dtype=pdt) if bias is None else _channel_vector("bias", bias, x, fn)
    return DEPTHWISE(x, weight, x.new_empty(0, dtype=pdt), shift, params, 0, OP.select(backend, x=x))


def depthwise_conv2d_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    act: str = "relu6",
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``act(depthwise_conv2d(x, weight) * scale[c] + shift[c])`` in one pass over the output.

    ``scale`` / ``shift`` ([C], any float dtype, computed in fp32) are a folded BatchNorm
    (``gamma / sqrt(var + eps)`` and ``beta - mean * scale``, plus the conv bias times scale) or any
    per-channel affine; ``act`` is "relu6", "relu" or "none". Differentiable in x, weight, scale and
    shift (the backward recomputes the convolution instead of keeping it).

    Batch-statistics (training-mode) BatchNorm: compute ``var, mean = torch.var_mean(z, (0, 2, 3),
    correction=0)`` of ``z = depthwise_conv2d(x, weight)``, ``scale = gamma * rsqrt(var + eps)``,
    ``shift = beta - mean * scale``, and pass them here: gradients flow through scale and shift into
    the statistics, which reproduces training-mode BatchNorm exactly (tested against
    ``relu6(batch_norm(conv(x), training=True))``). It convolves twice; on the CPU it measured no
    faster than conv + torch's BatchNorm, so pycompress.nn fuses for inference only.
    """
    fn = "depthwise_conv2d_bn_act"
    params = _check(fn, x, weight, stride, padding, dilation)
    if act not in ACTS:
        raise ValueError(f"{fn}: act must be one of {list(ACTS)}, got {act!r}")
    s = _channel_vector("scale", scale, x, fn)
    b = _channel_vector("shift", shift, x, fn)
    return DEPTHWISE(x, weight, s, b, params, ACTS[act], OP.select(backend, x=x))
