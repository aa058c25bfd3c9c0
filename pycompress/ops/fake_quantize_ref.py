"""Plain-torch specification of fake quantization.

Every backend (cpu, cuda, triton) implements the three kernel-level functions below on the same
normalised arguments and must match them: the forward bit for bit, the straight-through backward
bit for bit, and the learnable-scale (LSQ) sums within float-summation tolerance.

Normalised arguments (prepared by ``pycompress.ops.fake_quantize``):
    x           fp32 / fp16 / bf16 (fp64 in this reference only), contiguous, viewed as
                [outer, C, inner]; element i belongs to channel (i // inner) % C. Per-tensor is C == 1.
    inv_scale   fp32 [C], ``torch.reciprocal(scale)`` (computed once by torch, shared by backends)
    scale       fp32 [C], positive and finite
    zero_point  fp32 [C], integer-valued, inside [qmin, qmax]

Arithmetic, in fp32 whatever the input dtype (fp16/bf16 are upcast on load, the result is cast
back to the input dtype once):
    v   = x * inv_scale[c]                 one rounded fp32 product (no fused multiply-add)
    q   = rint(v) + zero_point[c]          rint rounds half to even (torch.round, std::nearbyint)
    qc  = qmin if q < qmin, qmax if q > qmax, else q      (a NaN q stays NaN)
    out = (qc - zero_point[c]) * scale[c]
This is bit for bit ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine`` with an
integer zero point.

Non-finite inputs (the same in every backend): +inf and -inf saturate to qmax / qmin like any other
out-of-range value and get zero gradient; NaN propagates (the output is NaN), counts as in range
for the straight-through gradient (grad passes), and makes the learnable scale gradient NaN, so a
diverged activation is never silently turned into a finite number.

Packed mask: the layout of ``pycompress.ops.mask_layout_ref`` (1 bit per element, whole 32-bit
words); a bit is 1 where the element was not clamped.
"""

from __future__ import annotations

import torch

from .mask_layout_ref import pack_bits_ref, unpack_bits_ref

__all__ = [
    "fake_quantize_ref",
    "fake_quantize_fwd_ref",
    "fake_quantize_bwd_ref",
    "fake_quantize_bwd_learnable_ref",
]


def _quantize(x: torch.Tensor, inv_scale, scale, zero_point, qmin: int, qmax: int, inner: int):
    """Returns (xf, out, below, above) in the compute dtype, x viewed as [outer, C, inner]."""
    C = inv_scale.numel()
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.reshape(-1, C, inner).to(compute)
    inv, s, zp = (t.to(compute).view(1, C, 1) for t in (inv_scale, scale, zero_point))
    q = torch.round(xf * inv) + zp
    below = q < qmin
    above = q > qmax
    qc = torch.where(below, torch.full_like(q, qmin), torch.where(above, torch.full_like(q, qmax), q))
    out = (qc - zp) * s
    return xf, out, below, above, inv, s, zp


def fake_quantize_fwd_ref(x, inv_scale, scale, zero_point, qmin: int, qmax: int, inner: int, with_mask: bool):
    """Forward: (out in x's dtype and shape, packed keep-mask or an empty uint8 tensor)."""
    if x.numel() == 0:
        return torch.empty_like(x), torch.empty(0, dtype=torch.uint8, device=x.device)
    _, out, below, above, *_ = _quantize(x, inv_scale, scale, zero_point, qmin, qmax, inner)
    mask = pack_bits_ref(~(below | above)) if with_mask else torch.empty(0, dtype=torch.uint8, device=x.device)
    return out.to(x.dtype).view(x.shape), mask


def fake_quantize_bwd_ref(grad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Straight-through backward: grad where the packed mask bit is 1, else 0."""
    keep = unpack_bits_ref(mask, grad.numel()).view(grad.shape)
    return torch.where(keep, grad, torch.zeros_like(grad))


def fake_quantize_bwd_learnable_ref(
    grad, x, inv_scale, scale, zero_point, qmin: int, qmax: int, inner: int, grad_factor: float
):
    """LSQ backward: (grad_x, grad_scale [C] fp32, grad_zero_point [C] fp32).

    Per element (fp32), as torch._fake_quantize_learnable_*_backward:
        in range:   d_scale = g * (out - x) * inv_scale,   d_zero_point = 0,       grad_x = g
        q < qmin:   d_scale = g * (qmin - zero_point),     d_zero_point = -g * scale, grad_x = 0
        q > qmax:   d_scale = g * (qmax - zero_point),     d_zero_point = -g * scale, grad_x = 0
    summed per channel, then multiplied by grad_factor.
    """
    C = inv_scale.numel()
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if x.numel() == 0:
        z = torch.zeros(C, dtype=acc, device=x.device)
        return torch.empty_like(x), z, z.clone()
    xf, out, below, above, inv, s, zp = _quantize(x, inv_scale, scale, zero_point, qmin, qmax, inner)
    g = grad.reshape(xf.shape).to(xf.dtype)
    clamped = below | above
    zero = torch.zeros_like(g)
    grad_x = torch.where(clamped, zero, g)
    d_scale = torch.where(below, g * (qmin - zp), torch.where(above, g * (qmax - zp), g * (out - xf) * inv))
    d_zero = torch.where(clamped, -g * s, zero)
    # Sum in fp64 so the reference is the most accurate of the implementations it judges.
    d_scale = d_scale.double().sum(dim=(0, 2)).to(acc) * grad_factor
    d_zero = d_zero.double().sum(dim=(0, 2)).to(acc) * grad_factor
    return grad_x.to(x.dtype).view(x.shape), d_scale, d_zero


class _FakeQuantizeRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis, grad_factor):
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = scale.detach().reshape(-1).to(compute)
        zp = zero_point.detach().reshape(-1).to(compute).round().clamp(qmin, qmax)
        inner = x[(0,) * (axis + 1)].numel() if axis is not None else max(x.numel(), 1)
        ctx.params = (torch.reciprocal(s), s, zp, qmin, qmax, inner)
        ctx.grad_factor = grad_factor
        ctx.meta = (scale.shape, scale.dtype, zero_point.shape, zero_point.dtype)
        ctx.save_for_backward(x)
        out, _ = fake_quantize_fwd_ref(x.contiguous(), *ctx.params, False)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s_shape, s_dtype, z_shape, z_dtype = ctx.meta
        gx, gs, gz = fake_quantize_bwd_learnable_ref(grad.contiguous(), x.contiguous(), *ctx.params, ctx.grad_factor)
        return gx, gs.reshape(s_shape).to(s_dtype), gz.reshape(z_shape).to(z_dtype), None, None, None, None


def fake_quantize_ref(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int, axis=None, grad_factor: float = 1.0):
    """The specification of pycompress.ops.fake_quantize in plain torch (no argument checks).

    Differentiable: straight-through gradient for x (zero where clamped) and LSQ gradients for
    scale and zero point when they are float tensors, multiplied by grad_factor.
    """
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=x.device)
    if not isinstance(zero_point, torch.Tensor) or not zero_point.is_floating_point():
        zero_point = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    if axis is not None:
        axis = axis % x.dim()
    return _FakeQuantizeRef.apply(x, scale, zero_point, qmin, qmax, axis, grad_factor)
