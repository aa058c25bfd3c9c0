"""Plain-torch specification of the depthwise convolution ops.

Every backend (cpu, cuda, triton) implements the three kernel-level functions below on the same
normalised arguments (prepared by ``pycompress.ops.depthwise``) and must match them within the
per-dtype tolerances of tests/ops/test_depthwise.py (summation order differs between kernels).

Normalised arguments:
    x        [N, C, H, W], fp32 / fp16 / bf16 (fp64 in this reference only), contiguous in NCHW
             *or* in channels_last (NHWC) memory; outputs use the same memory format as x.
    weight   [C, 1, kh, kw], x's dtype, contiguous; kh, kw odd, <= 7 (square in the public op).
    scale    fp32 [C] or an empty tensor (= 1);  shift  fp32 [C] or an empty tensor (= 0).
    sh, sw   strides (1 or 2); ph, pw paddings (>= 0, zero padding); dh, dw dilations (>= 1).
    act      0 none, 1 relu, 2 relu6.

Forward, per output element, accumulated in fp32 (fp64 for fp64):
    z[n, c, i, j] = sum_{a, b} x[n, c, i*sh - ph + a*dh, j*sw - pw + b*dw] * weight[c, 0, a, b]
                    (taps outside the image count as 0)
    y = act(z * scale[c] + shift[c])          (one fp32 multiply, then one add)
cast once to x's dtype. Plain depthwise conv with a bias is scale = empty, shift = bias.
Output size: Ho = (H + 2 ph - dh (kh - 1) - 1) // sh + 1, likewise Wo.

Backward of the convolution (z), fp32 accumulation:
    grad_x[n, c, h, w] = sum over the (i, j, a, b) with h = i*sh - ph + a*dh, w = j*sw - pw + b*dw
                         of grad_z[n, c, i, j] * weight[c, 0, a, b]       (x's dtype and layout)
    grad_w[c, 0, a, b] = sum_{n, i, j} grad_z[n, c, i, j] * x[n, c, i*sh - ph + a*dh, j*sw - pw + b*dw]
    grad_b[c]          = sum_{n, i, j} grad_z[n, c, i, j]                  (both fp32)
The affine + activation backward is plain torch in the op layer (see depthwise.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ACTS",
    "out_size",
    "depthwise_fwd_ref",
    "depthwise_bwd_input_ref",
    "depthwise_bwd_weight_ref",
    "depthwise_conv2d_ref",
    "depthwise_conv2d_bn_act_ref",
]

ACTS = {"none": 0, "relu": 1, "relu6": 2}


def out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _act(z: torch.Tensor, act: int) -> torch.Tensor:
    if act == 1:
        return torch.relu(z)
    if act == 2:
        return torch.clamp(z, 0.0, 6.0)
    return z


def _memory_format(x: torch.Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def depthwise_fwd_ref(
    x, weight, scale, shift, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int, act: int
) -> torch.Tensor:
    ct = _compute_dtype(x)
    C = x.shape[1]
    z = F.conv2d(x.to(ct), weight.to(ct), None, (sh, sw), (ph, pw), (dh, dw), C)
    if scale.numel():
        z = z * scale.to(ct).view(1, C, 1, 1)
    if shift.numel():
        z = z + shift.to(ct).view(1, C, 1, 1)
    return _act(z, act).to(x.dtype).contiguous(memory_format=_memory_format(x))


def depthwise_bwd_input_ref(
    grad_out, weight, H: int, W: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int
) -> torch.Tensor:
    ct = _compute_dtype(grad_out)
    N, C = grad_out.shape[:2]
    gx = torch.nn.grad.conv2d_input((N, C, H, W), weight.to(ct), grad_out.to(ct), (sh, sw), (ph, pw), (dh, dw), C)
    return gx.to(grad_out.dtype).contiguous(memory_format=_memory_format(grad_out))


def depthwise_bwd_weight_ref(
    grad_out, x, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int, dh: int, dw: int, with_bias: bool
):
    ct = _compute_dtype(x)
    C = x.shape[1]
    gw = torch.nn.grad.conv2d_weight(x.to(ct), (C, 1, kh, kw), grad_out.to(ct), (sh, sw), (ph, pw), (dh, dw), C)
    gb = grad_out.to(ct).sum(dim=(0, 2, 3)) if with_bias else grad_out.new_empty(0, dtype=ct)
    return gw, gb


def depthwise_conv2d_ref(x, weight, bias=None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """The specification of pycompress.ops.depthwise_conv2d (differentiable, no argument checks):
    ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)`` computed in fp32 for
    fp16 / bf16 inputs and cast back once."""
    ct = _compute_dtype(x)
    b = None if bias is None else bias.to(ct)
    return F.conv2d(x.to(ct), weight.to(ct), b, stride, padding, dilation, x.shape[1]).to(x.dtype)


def depthwise_conv2d_bn_act_ref(
    x, weight, scale, shift, stride=1, padding=0, dilation=1, act: str = "relu6"
) -> torch.Tensor:
    """The specification of pycompress.ops.depthwise_conv2d_bn_act (differentiable):
    ``act(depthwise_conv2d(x, weight) * scale[c] + shift[c])``, in fp32, cast back once."""
    ct = _compute_dtype(x)
    C = x.shape[1]
    z = F.conv2d(x.to(ct), weight.to(ct), None, stride, padding, dilation, C)
    z = z * scale.to(ct).view(1, C, 1, 1) + shift.to(ct).view(1, C, 1, 1)
    return _act(z, ACTS[act]).to(x.dtype)
