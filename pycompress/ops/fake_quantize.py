"""fake_quantize: quantize-dequantize with straight-through and LSQ gradients, in four backends.

The public function validates every argument before any kernel runs, chooses a backend
(pycompress.backends), and calls the registered op ``pycompress::fake_quantize`` through its entry
(``pycompress.ops.registry``: one declaration gives the op, its fake, its autograd and the eager
path). ``torch.compile(fullgraph=True)`` sees one node and ``torch.library.opcheck`` passes. The
arithmetic and the non-finite behaviour are specified in ``pycompress.ops.fake_quantize_ref``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import os
import struct
from typing import Iterator, Optional, Sequence, Union

import torch

from . import fake_quantize_ref as _ref
from .mask_layout_ref import packed_mask_bytes
from .registry import Kernel, KernelSet, call, declare, dtype_in, on_device

__all__ = ["fake_quantize", "quant_range", "value_checks", "QMIN_LIMIT", "QMAX_LIMIT"]

QMIN_LIMIT = -(2**15)
QMAX_LIMIT = 2**16 - 1

Number = Union[int, float]


# --------------------------------------------------------------------------------------------
# argument checks


_value_checks: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("pycompress_value_checks", default=None)


def _value_checks_enabled() -> bool:
    v = _value_checks.get()
    if v is not None:
        return v
    return os.environ.get("PYCOMPRESS_VALUE_CHECKS", "1") != "0"


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the checks that read tensor values (scale > 0 and finite, zero point in range) on or off.

    They are on by default. For a scale or zero point tensor on a GPU they cost one host sync per
    call; a training loop whose quantizer parameters are known to be valid may turn them off
    (also: ``PYCOMPRESS_VALUE_CHECKS=0``). They are always skipped inside torch.compile.
    """
    token = _value_checks.set(bool(enabled))
    try:
        yield
    finally:
        _value_checks.reset(token)


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-bit integer grid: signed two's complement or unsigned."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"quant_range: bits must be an int in 1..16, got {bits!r}")
    if not 1 <= bits <= 16:
        raise ValueError(f"quant_range: bits must be in 1..16, got {bits}")
    if not isinstance(signed, bool):
        raise TypeError(f"quant_range: signed must be a bool, got {signed!r}")
    bits = int(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_range(qmin, qmax) -> tuple[int, int]:
    for name, v in (("qmin", qmin), ("qmax", qmax)):
        if not _is_int(v):
            raise TypeError(f"fake_quantize: {name} must be an int, got {v!r}")
    qmin, qmax = int(qmin), int(qmax)
    if qmin >= qmax:
        raise ValueError(f"fake_quantize: qmin must be less than qmax, got qmin={qmin}, qmax={qmax}")
    if qmin < QMIN_LIMIT or qmax > QMAX_LIMIT:
        raise ValueError(
            f"fake_quantize: the range [qmin, qmax] = [{qmin}, {qmax}] must lie inside "
            f"[{QMIN_LIMIT}, {QMAX_LIMIT}] (1 to 16 bits, signed or unsigned)"
        )
    return qmin, qmax


def _as_param(value, name: str, x: torch.Tensor, per_channel: bool, length: int) -> torch.Tensor:
    """scale / zero_point as a tensor on x's device: Python numbers become 0-d fp32 tensors."""
    if isinstance(value, torch.Tensor):
        if value.device != x.device:
            raise ValueError(
                f"fake_quantize: {name} is on {value.device} but x is on {x.device}; put them on one device"
            )
        if per_channel:
            if value.dim() != 1 or value.numel() != length:
                raise ValueError(
                    f"fake_quantize: per-channel {name} must be 1-D with {length} elements (x.shape[axis]), "
                    f"got shape {tuple(value.shape)}"
                )
        elif value.numel() != 1:
            raise ValueError(
                f"fake_quantize: per-tensor {name} (axis=None) must be a number or a 1-element tensor, "
                f"got shape {tuple(value.shape)}; pass axis= for per-channel quantization"
            )
        if name == "scale" and not value.is_floating_point():
            raise TypeError(f"fake_quantize: scale must be a floating-point tensor, got {value.dtype}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"fake_quantize: {name} must be a real number tensor, got {value.dtype}")
        return value
    if per_channel:
        raise TypeError(f"fake_quantize: per-channel {name} must be a 1-D tensor of length {length}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fake_quantize: {name} must be a number or a tensor, got {type(value).__name__}")
    return torch.full((), float(value), dtype=torch.float32, device=x.device)


def _check_python_scale(scale) -> None:
    # fp32 arithmetic in plain Python (struct), so torch.compile traces no tensor branch here.
    try:
        s32 = struct.unpack("f", struct.pack("f", float(scale)))[0]
        ok = s32 > 0 and math.isfinite(s32) and math.isfinite(struct.unpack("f", struct.pack("f", 1.0 / s32))[0])
    except (OverflowError, ZeroDivisionError):
        ok = False
    if not ok:
        raise ValueError(f"fake_quantize: scale must be positive and finite with a finite fp32 reciprocal, got {scale}")


def check_scale_values(scale: torch.Tensor, what: str = "fake_quantize: scale", name: str = "scale") -> None:
    """Raise ValueError, naming ``what`` and the first bad element, unless every element of
    ``scale`` is positive and finite with a finite fp32 reciprocal (what fake_quantize requires;
    quantizers that skip the per-call checks run this when a scale is loaded)."""
    s = scale.detach().to(torch.float32)
    bad = ~(s > 0) | ~torch.isfinite(s) | ~torch.isfinite(torch.reciprocal(s))
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        raise ValueError(
            f"{what} must be positive and finite with a finite fp32 reciprocal; "
            f"{name}[{i}] = {float(scale.reshape(-1)[i])}"
        )


def _check_scale_values(scale: torch.Tensor) -> None:  # fake_quantize's per-call check
    check_scale_values(scale)


def _check_zero_point_values(zero_point: torch.Tensor, qmin: int, qmax: int) -> None:
    z = zero_point.detach()
    if not z.is_floating_point():
        out = (z < qmin) | (z > qmax)
        if bool(out.any()):
            i = int(out.reshape(-1).nonzero()[0, 0])
            raise ValueError(
                f"fake_quantize: an integer zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}]; "
                f"zero_point[{i}] = {int(z.reshape(-1)[i])}"
            )
    else:
        nonfinite = ~torch.isfinite(z)
        if bool(nonfinite.any()):
            i = int(nonfinite.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"fake_quantize: zero_point must be finite; zero_point[{i}] = {float(z.reshape(-1)[i])}")


def _check_python_zero_point(zero_point, qmin: int, qmax: int) -> None:
    if _is_int(zero_point) and not qmin <= int(zero_point) <= qmax:
        raise ValueError(f"fake_quantize: zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got {zero_point}")
    if isinstance(zero_point, float) and not math.isfinite(zero_point):
        raise ValueError(f"fake_quantize: zero_point must be finite, got {zero_point}")


# --------------------------------------------------------------------------------------------
# layout: kernels see a contiguous tensor viewed as [outer, C, inner]


def _dense_perm(x: torch.Tensor) -> Optional[list[int]]:
    """A permutation making x contiguous without a copy, None when x is contiguous or not dense."""
    if x.is_contiguous() or x.dim() < 2:
        return None
    perm = sorted(range(x.dim()), key=lambda d: (-x.stride(d), d))
    if x.permute(perm).is_contiguous():
        return perm
    return None


def _inverse(perm: Sequence[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


class _Layout:
    """How x maps to the kernels' contiguous [outer, C, inner] view, and back."""

    def __init__(self, x: torch.Tensor, axis: Optional[int]):
        self.perm = _dense_perm(x)
        shape = [x.shape[p] for p in self.perm] if self.perm else list(x.shape)
        if axis is None:
            self.inner = max(x.numel(), 1)
        else:
            axis_c = self.perm.index(axis) if self.perm else axis
            self.inner = math.prod(shape[axis_c + 1 :])

    def to_kernel(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(self.perm).contiguous() if self.perm else t.contiguous()

    def from_kernel(self, t: torch.Tensor) -> torch.Tensor:
        return t.permute(_inverse(self.perm)) if self.perm else t

    def empty(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm:
            return x.new_empty([x.shape[p] for p in self.perm]).permute(_inverse(self.perm))
        return x.new_empty(x.shape)


def _kernel_params(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, dtype: torch.dtype):
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.detach().reshape(-1).to(compute).contiguous()
    inv = torch.reciprocal(s)
    # A learnable (float) zero point is rounded half to even and clamped, as torch's learnable
    # fake-quant does in its forward; an integer one is already validated to lie in range.
    zp = zero_point.detach().reshape(-1).to(compute).round().clamp(qmin, qmax).contiguous()
    return inv, s, zp


# --------------------------------------------------------------------------------------------
# the declaration: kernels, supports, registered ops


def _empty_mask(x: torch.Tensor, with_mask: bool) -> torch.Tensor:
    n = packed_mask_bytes(x.numel()) if with_mask else 0
    return x.new_empty((n,), dtype=torch.uint8)


def _fwd_fake(x, inv_scale, scale, zero_point, qmin, qmax, inner, with_mask):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _empty_mask(x, with_mask)


def _bwd_fake(grad, mask):
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


def _bwd_learnable_fake(grad, x, inv_scale, scale, zero_point, qmin, qmax, inner, grad_factor):
    c = inv_scale.shape[0]
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        x.new_empty((c,), dtype=torch.float32),
        x.new_empty((c,), dtype=torch.float32),
    )


# The kernel-level functions every backend implements (contracts: fake_quantize_ref).
KERNELS = KernelSet(
    "fake_quantize",
    triton_module="fake_quantize",
    fwd=Kernel(_ref.fake_quantize_fwd_ref, cpp="_fake_quantize_fwd", triton="fake_quantize_fwd", fake=_fwd_fake),
    bwd=Kernel(_ref.fake_quantize_bwd_ref, cpp="_fake_quantize_bwd", triton="fake_quantize_bwd", fake=_bwd_fake),
    bwd_learnable=Kernel(
        _ref.fake_quantize_bwd_learnable_ref,
        cpp="_fake_quantize_bwd_learnable",
        triton="fake_quantize_bwd_learnable",
        fake=_bwd_learnable_fake,
    ),
)

OP = declare(
    "fake_quantize", reference=_ref.fake_quantize_ref, kernels=KERNELS, supports=[on_device("x"), dtype_in("x")]
)


def _forward(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    grad_factor: float,
    backend: str,
    with_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, packed keep-mask of x in kernel layout, empty unless with_mask)."""
    layout = _Layout(x, axis)
    inv, s, zp = _kernel_params(scale, zero_point, qmin, qmax, x.dtype)
    out, mask = KERNELS.table(backend).fwd(layout.to_kernel(x), inv, s, zp, qmin, qmax, layout.inner, with_mask)
    return layout.from_kernel(out), mask


def _forward_fake(x, scale, zero_point, qmin, qmax, axis, grad_factor, backend, with_mask):
    return _Layout(x, axis).empty(x), _empty_mask(x, with_mask)


def _backward_ste(grad: torch.Tensor, mask: torch.Tensor, backend: str) -> torch.Tensor:
    """Straight-through backward: grad (kernel layout, contiguous) where the packed bit is set, else 0."""
    return KERNELS.table(backend).bwd(grad.contiguous(), mask)


def _backward_ste_fake(grad, mask, backend):
    return grad.new_empty(grad.shape)


def _backward_learnable(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: Optional[int],
    grad_factor: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_scale, grad_zero_point); the last two shaped and typed like scale / zero_point."""
    layout = _Layout(x, axis)
    inv, s, zp = _kernel_params(scale, zero_point, qmin, qmax, x.dtype)
    gx, gs, gz = KERNELS.table(backend).bwd_learnable(
        layout.to_kernel(grad), layout.to_kernel(x), inv, s, zp, qmin, qmax, layout.inner, grad_factor
    )
    return (
        layout.from_kernel(gx),
        gs.reshape(scale.shape).to(scale.dtype),
        gz.reshape(zero_point.shape).to(zero_point.dtype if zero_point.is_floating_point() else torch.float32),
    )


def _backward_learnable_fake(grad, x, scale, zero_point, qmin, qmax, axis, grad_factor, backend):
    zdt = zero_point.dtype if zero_point.is_floating_point() else torch.float32
    return _Layout(x, axis).empty(x), scale.new_empty(scale.shape), zero_point.new_empty(zero_point.shape, dtype=zdt)


_BACKWARD_STE = OP.define("fake_quantize_backward", _backward_ste, fake=_backward_ste_fake)
_BACKWARD_LEARNABLE = OP.define("fake_quantize_backward_learnable", _backward_learnable, fake=_backward_learnable_fake)


def _setup_context(ctx, inputs, output):
    x, scale, zero_point, qmin, qmax, axis, grad_factor, backend, with_mask = inputs
    ctx.args = (qmin, qmax, axis, grad_factor, backend)
    ctx.learnable = scale.requires_grad or zero_point.requires_grad
    if ctx.learnable:
        ctx.save_for_backward(x, scale, zero_point)
    else:
        ctx.save_for_backward(output[1])
        ctx.perm = _dense_perm(x)
        ctx.numel = x.numel()


def _backward(ctx, grad_out, _grad_mask):
    qmin, qmax, axis, grad_factor, backend = ctx.args
    if ctx.learnable:
        x, scale, zero_point = ctx.saved_tensors
        gx, gs, gz = call(
            ctx, _BACKWARD_LEARNABLE, grad_out, x, scale, zero_point, qmin, qmax, axis, grad_factor, backend
        )
        return (
            gx if ctx.needs_input_grad[0] else None,
            gs if ctx.needs_input_grad[1] else None,
            gz if ctx.needs_input_grad[2] else None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    (mask,) = ctx.saved_tensors
    if ctx.numel > 0 and mask.numel() == 0:
        raise RuntimeError(
            "fake_quantize: backward needs the clamp mask, but the forward ran with with_mask=False "
            "(call pycompress.ops.fake_quantize, which sets it when x requires grad)"
        )
    perm = ctx.perm
    g = grad_out.permute(perm).contiguous() if perm else grad_out.contiguous()
    gx = call(ctx, _BACKWARD_STE, g, mask, backend)
    if perm:
        gx = gx.permute(_inverse(perm))
    return gx, None, None, None, None, None, None, None, None


# pycompress::fake_quantize: fake, autograd, and the eager path (FAKE_QUANTIZE(...)).
FAKE_QUANTIZE = OP.define(
    "fake_quantize", _forward, fake=_forward_fake, setup_context=_setup_context, backward=_backward
)


# --------------------------------------------------------------------------------------------
# public op


def fake_quantize(
    x: torch.Tensor,
    scale: Union[Number, torch.Tensor],
    zero_point: Union[Number, torch.Tensor],
    qmin: int,
    qmax: int,
    axis: Optional[int] = None,
    *,
    grad_factor: float = 1.0,
    backend: Optional[str] = None,
    check_values: Optional[bool] = None,
) -> torch.Tensor:
    """Quantize x to the integer grid [qmin, qmax] and dequantize: ``(clamp(rint(x/scale) + zp) - zp) * scale``.

    Args:
        x: float32, float16, bfloat16 (float64 on the reference backend) tensor of any shape and
            strides; fp16/bf16 compute in fp32 and return x's dtype.
        scale: per-tensor (``axis=None``): a positive number or a 1-element tensor; per-channel: a
            1-D tensor of length ``x.shape[axis]``. A tensor that requires grad is learned (LSQ).
        zero_point: like scale. Integers must lie in [qmin, qmax]; a float tensor (learnable) is
            rounded half to even and clamped to [qmin, qmax], as torch's learnable fake-quant does.
        qmin, qmax: the integer range, qmin < qmax, inside [-2**15, 2**16 - 1]; see quant_range().
        axis: None for per-tensor, else the channel axis (negative allowed).
        grad_factor: multiplies the scale and zero-point gradients (LSQ's g).
        backend: "reference", "cpu", "cuda", "triton" or "auto"; see pycompress.backends.
        check_values: whether to run the checks that read scale / zero-point tensor values (see
            value_checks(); None: as value_checks() / PYCOMPRESS_VALUE_CHECKS say). They cost
            tens of microseconds per call on a CPU and a host sync on a GPU; a caller that keeps
            its quantizer state valid itself (pycompress.quant.FakeQuantizer) passes False.

    Forward: bit for bit ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``.
    Backward: straight-through, zero where clamped; scale / zero-point gradients equal
    ``torch._fake_quantize_learnable_per_*_affine``. +-inf saturate; NaN propagates (see
    pycompress.ops.fake_quantize_ref).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"fake_quantize: x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"fake_quantize: x must be a floating-point tensor, got {x.dtype}")
    qmin, qmax = _check_range(qmin, qmax)
    if axis is not None:
        if not _is_int(axis):
            raise TypeError(f"fake_quantize: axis must be an int or None, got {axis!r}")
        if x.dim() == 0 or not -x.dim() <= axis < x.dim():
            raise ValueError(f"fake_quantize: axis {axis} is out of range for x with {x.dim()} dimensions")
        axis = int(axis) % x.dim()
    if isinstance(grad_factor, bool) or not isinstance(grad_factor, numbers.Real) or not math.isfinite(grad_factor):
        raise ValueError(f"fake_quantize: grad_factor must be a finite number, got {grad_factor!r}")
    per_channel = axis is not None
    length = x.shape[axis] if per_channel else 1
    scale_t = _as_param(scale, "scale", x, per_channel, length)
    zp_t = _as_param(zero_point, "zero_point", x, per_channel, length)
    # skipped inside torch.compile (before reading their setting: a ContextVar, which dynamo
    # traces only from torch 2.14 on)
    check_tensors = not torch.compiler.is_compiling() and (
        _value_checks_enabled() if check_values is None else check_values
    )
    if not isinstance(scale, torch.Tensor):
        _check_python_scale(scale)
    elif check_tensors:
        _check_scale_values(scale_t)
    if not isinstance(zero_point, torch.Tensor):
        _check_python_zero_point(zero_point, qmin, qmax)
    elif check_tensors:
        _check_zero_point_values(zp_t, qmin, qmax)
    name = OP.select(backend, x=x)
    learnable = scale_t.requires_grad or zp_t.requires_grad
    with_mask = bool(x.requires_grad and torch.is_grad_enabled() and not learnable)
    out, _ = FAKE_QUANTIZE(x, scale_t, zp_t, qmin, qmax, axis, float(grad_factor), name, with_mask)
    return out
