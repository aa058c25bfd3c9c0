"""Bit-packed sparse masks: pack_mask, unpack_mask, apply_mask and a fused masked SGD step.

A mask of n elements is stored in 1 bit per element (uint8, whole 32-bit words; the layout is
``pycompress.ops.mask_layout_ref``, the arithmetic ``pycompress.ops.sparse_mask_ref``, the
specification of every op here). The public functions validate their arguments before any kernel
runs, choose a backend (``pycompress.backends``) and call the registered ops
(``pycompress::pack_mask``, ...) through their entries (``pycompress.ops.registry``: fakes, apply_mask's
autograd formula and one eager path), so ``torch.compile`` sees one node per op and
``torch.library.opcheck`` passes.
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from . import sparse_mask_ref as _ref
from .mask_layout_ref import packed_mask_bytes
from .registry import Kernel, KernelSet, call, declare, dtype_in, on_device

__all__ = ["pack_mask", "unpack_mask", "apply_mask", "masked_sgd_step", "packed_mask_bytes"]

# --------------------------------------------------------------------------------------------
# the declaration: kernels, supports, registered ops


def _pack_fake(mask):
    return mask.new_empty((packed_mask_bytes(mask.numel()),), dtype=torch.uint8)


def _unpack_fake(packed, n):
    return packed.new_empty((n,), dtype=torch.bool)


def _apply_fake(w, packed):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _returns_none(*args):  # the in-place kernels return nothing (schema "-> ()")
    return None


# The kernel-level functions every backend implements (contracts: the *_kernel_ref of sparse_mask_ref).
KERNELS = KernelSet(
    "sparse_mask",
    triton_module="sparse_mask",
    pack=Kernel(_ref.pack_kernel_ref, cpp="_pack_mask", triton="pack_mask", fake=_pack_fake),
    unpack=Kernel(_ref.unpack_kernel_ref, cpp="_unpack_mask", triton="unpack_mask", fake=_unpack_fake),
    apply=Kernel(_ref.apply_kernel_ref, cpp="_apply_mask", triton="apply_mask", fake=_apply_fake),
    apply_inplace=Kernel(_ref.apply_inplace_kernel_ref, cpp="_apply_mask_", triton="apply_mask_", fake=_returns_none),
    sgd_step=Kernel(_ref.sgd_step_kernel_ref, cpp="_masked_sgd_step", triton="masked_sgd_step", fake=_returns_none),
)

PACK_MASK = declare("pack_mask", reference=_ref.pack_mask_ref, kernels=KERNELS, supports=[on_device("mask")])
UNPACK_MASK = declare("unpack_mask", reference=_ref.unpack_mask_ref, kernels=KERNELS, supports=[on_device("packed")])
APPLY_MASK = declare(
    "apply_mask", reference=_ref.apply_mask_ref, kernels=KERNELS, supports=[on_device("w"), dtype_in("w")]
)
MASKED_SGD_STEP = declare(
    "masked_sgd_step",
    reference=_ref.masked_sgd_step_ref,
    kernels=KERNELS,
    supports=[on_device("param"), dtype_in("param")],
)


def _pack(mask: torch.Tensor, backend: str) -> torch.Tensor:
    return KERNELS.table(backend).pack(mask.contiguous())


def _unpack(packed: torch.Tensor, shape: Sequence[int], backend: str) -> torch.Tensor:
    return KERNELS.table(backend).unpack(packed, math.prod(shape)).view(shape)


def _unpack_op_fake(packed, shape, backend):
    return packed.new_empty(list(shape), dtype=torch.bool)


def _apply(w: torch.Tensor, packed: torch.Tensor, backend: str) -> torch.Tensor:
    return KERNELS.table(backend).apply(w.contiguous(), packed)


def _apply_setup(ctx, inputs, output):
    _, packed, backend = inputs
    ctx.save_for_backward(packed)
    ctx.backend = backend


def _apply_backward(ctx, grad):
    (packed,) = ctx.saved_tensors
    # d(w * m)/dw = m: the gradient of a pruned element is 0 (itself differentiable: apply_mask again).
    return call(ctx, _APPLY, grad, packed, ctx.backend), None, None


def _apply_inplace(w: torch.Tensor, packed: torch.Tensor, backend: str) -> None:
    kernel = KERNELS.table(backend).apply_inplace
    if w.is_contiguous():
        kernel(w, packed)
    else:
        tmp = w.contiguous()
        kernel(tmp, packed)
        w.copy_(tmp)


def _sgd_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    buf: torch.Tensor,
    packed: torch.Tensor,
    lr: float,
    momentum: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    first: bool,
    backend: str,
) -> None:
    step = KERNELS.table(backend).sgd_step
    if param.is_contiguous():
        step(param, grad.contiguous(), buf, packed, lr, momentum, weight_decay, dampening, nesterov, first)
    else:
        tmp = param.contiguous()
        step(tmp, grad.contiguous(), buf, packed, lr, momentum, weight_decay, dampening, nesterov, first)
        param.copy_(tmp)


# The registered ops (pycompress::pack_mask, ...) and their eager entries.
_PACK = PACK_MASK.define("pack_mask", _pack, fake=lambda mask, backend: _pack_fake(mask))
_UNPACK = UNPACK_MASK.define("unpack_mask", _unpack, fake=_unpack_op_fake)
_APPLY = APPLY_MASK.define(
    "apply_mask",
    _apply,
    fake=lambda w, packed, backend: _apply_fake(w, packed),
    setup_context=_apply_setup,
    backward=_apply_backward,
    differentiable_backward=True,
)
_APPLY_INPLACE = APPLY_MASK.define("apply_mask_", _apply_inplace, fake=_returns_none, mutates_args=("w",))
_SGD_STEP = MASKED_SGD_STEP.define("masked_sgd_step_", _sgd_step, fake=_returns_none, mutates_args=("param", "buf"))


# --------------------------------------------------------------------------------------------
# argument checks


def _check_tensor(name: str, t, fn: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    return t


def _check_packed(packed, w_numel: int, device: torch.device, fn: str, what: str = "w") -> torch.Tensor:
    _check_tensor("packed", packed, fn)
    if packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be a uint8 tensor from pack_mask, got {packed.dtype}")
    want = packed_mask_bytes(w_numel)
    if packed.dim() != 1 or packed.numel() != want:
        raise ValueError(
            f"{fn}: packed must be 1-D with {want} bytes for {w_numel} elements of {what} "
            f"(ceil(n / 32) * 4), got shape {tuple(packed.shape)}; was the mask packed for another tensor?"
        )
    if packed.device != device:
        raise ValueError(f"{fn}: packed is on {packed.device} but {what} is on {device}; put them on one device")
    return packed.contiguous()


def _check_shape(shape, fn: str) -> List[int]:
    if isinstance(shape, torch.Size):
        shape = list(shape)
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = [int(shape)]
    if not isinstance(shape, (list, tuple)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise TypeError(f"{fn}: shape must be a sequence of non-negative ints, got {shape!r}")
    return [int(s) for s in shape]


def _check_real(name: str, v, fn: str, minimum: Optional[float] = 0.0) -> float:
    if type(v) is float and math.isfinite(v) and (minimum is None or v >= minimum):
        return v  # the common case, cheaply (an optimizer calls this every step)
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
        raise ValueError(f"{fn}: {name} must be a finite number, got {v!r}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{fn}: {name} must be >= {minimum}, got {v}")
    return float(v)


# --------------------------------------------------------------------------------------------
# public ops


def pack_mask(mask: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """Pack a bool mask (any shape; True = keep) into 1 bit per element.

    Returns a uint8 tensor of ``packed_mask_bytes(mask.numel())`` bytes on mask's device: bit
    (i % 8) of byte (i // 8) is element i of ``mask.reshape(-1)`` (row-major order, whatever the
    strides); padding bits are 0. ``unpack_mask(packed, mask.shape)`` is the exact inverse.
    """
    fn = "pack_mask"
    _check_tensor("mask", mask, fn)
    if mask.dtype != torch.bool:
        raise TypeError(f"{fn}: mask must be a bool tensor (True = keep), got {mask.dtype}; pass mask != 0")
    return _PACK(mask, PACK_MASK.select(backend, mask=mask))


def unpack_mask(packed: torch.Tensor, shape: Sequence[int], *, backend: Optional[str] = None) -> torch.Tensor:
    """The bool mask of ``shape`` stored in ``packed`` (the inverse of pack_mask)."""
    fn = "unpack_mask"
    shape = _check_shape(shape, fn)
    _check_tensor("packed", packed, fn)
    packed = _check_packed(packed, math.prod(shape), packed.device, fn, what=f"shape {tuple(shape)}")
    return _UNPACK(packed, shape, UNPACK_MASK.select(backend, packed=packed))


def apply_mask(
    w: torch.Tensor, packed: torch.Tensor, *, inplace: bool = False, backend: Optional[str] = None
) -> torch.Tensor:
    """``w`` where the packed mask keeps it, exactly +0.0 where it is pruned.

    Args:
        w: float32 / float16 / bfloat16 tensor (float64 on the reference backend), any strides.
        packed: the mask from ``pack_mask`` (of a tensor with w's number of elements, row-major).
        inplace: write into w and return it (not differentiable); otherwise a new tensor is
            returned and the gradient of w is the upstream gradient masked the same way.
    """
    fn = "apply_mask"
    _check_tensor("w", w, fn)
    if not w.is_floating_point():
        raise TypeError(f"{fn}: w must be a floating-point tensor, got {w.dtype}")
    packed = _check_packed(packed, w.numel(), w.device, fn)
    name = APPLY_MASK.select(backend, w=w)
    if inplace:
        if w.requires_grad and torch.is_grad_enabled() and w.is_leaf:
            raise RuntimeError(
                f"{fn}: inplace=True on a leaf tensor that requires grad; wrap it in torch.no_grad() "
                "(e.g. masking a parameter between steps) or use inplace=False"
            )
        _APPLY_INPLACE(w, packed, name)
        return w
    return _APPLY(w, packed, name)


def masked_sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: List[Optional[torch.Tensor]],
    masks: Sequence[Optional[torch.Tensor]],
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    backend: Optional[str] = None,
) -> List[Optional[torch.Tensor]]:
    """One SGD step over a list of tensors with the gradient, momentum and result masked, in one
    fused pass per tensor: equals ``torch.optim.SGD``'s step followed by re-masking, so a pruned
    weight stays exactly 0 (see sparse_mask_ref for the arithmetic).

    Args:
        params: the parameters (updated in place; float32 / float16 / bfloat16, or float64 on the
            reference backend); one device and dtype per tensor triple.
        grads: their gradients (same shape, dtype and device; read only).
        momentum_buffers: one entry per parameter, None before its first step; entries created
            on the first step are written back into this list (as torch's functional SGD does).
            Ignored (may hold None) when momentum is 0.
        masks: packed masks (pack_mask) or None for a dense parameter (a plain SGD step).
        lr, momentum, weight_decay, dampening, nesterov: as torch.optim.SGD.

    Returns the momentum_buffers list.
    """
    fn = "masked_sgd_step"
    lr = _check_real("lr", lr, fn)
    momentum = _check_real("momentum", momentum, fn)
    weight_decay = _check_real("weight_decay", weight_decay, fn)
    dampening = _check_real("dampening", dampening, fn, minimum=None)
    if not isinstance(nesterov, bool):
        raise TypeError(f"{fn}: nesterov must be a bool, got {nesterov!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError(
            f"{fn}: nesterov momentum requires momentum > 0 and zero dampening "
            f"(got momentum={momentum}, dampening={dampening})"
        )
    n = len(params)
    for what, seq in (("grads", grads), ("momentum_buffers", momentum_buffers), ("masks", masks)):
        if len(seq) != n:
            raise ValueError(f"{fn}: {what} has {len(seq)} entries but params has {n}")
    chosen: dict = {}
    for i, (p, g, b, mk) in enumerate(zip(params, grads, momentum_buffers, masks)):
        # The common case first, in as few Python operations as possible (a model of many small
        # layers calls this per tensor per step); anything else gets the full checks below.
        if not (
            (type(p) is _Param or type(p) is _Tensor)
            and type(g) is _Tensor
            and p.is_floating_point()
            and g.dtype is p.dtype
            and g.shape == p.shape
            and g.device == p.device
            and not g.is_sparse
        ):
            _check_step_tensors(fn, i, p, g)
        first = b is None
        if momentum != 0:
            if first:
                b = torch.zeros_like(p, memory_format=torch.contiguous_format)
                momentum_buffers[i] = b
            elif not (
                isinstance(b, _Tensor)
                and b.shape == p.shape
                and b.dtype is p.dtype
                and b.device == p.device
                and b.is_contiguous()
            ):
                _check_tensor(f"momentum_buffers[{i}]", b, fn)
                raise ValueError(
                    f"{fn}: momentum_buffers[{i}] must be a contiguous tensor matching params[{i}] "
                    f"in shape, dtype and device"
                )
        if mk is None:
            with torch.no_grad():
                _dense_sgd(p, g, b if momentum != 0 else None, lr, momentum, weight_decay, dampening, nesterov, first)
            continue
        if not (
            mk.dtype is _U8
            and mk.dim() == 1
            and mk.numel() == ((p.numel() + 31) >> 5) << 2
            and mk.device == p.device
            and mk.is_contiguous()
        ):
            mk = _check_packed(mk, p.numel(), p.device, fn, what=f"params[{i}]")
        key = (p.device, p.dtype)
        name = chosen.get(key)
        if name is None:  # supports() depends on the device and dtype only
            name = chosen[key] = MASKED_SGD_STEP.select(backend, param=p)
        if momentum == 0:
            b = _empty(p)
        _SGD_STEP(p.detach(), g.detach(), b, mk, lr, momentum, weight_decay, dampening, nesterov, first, name)
    return momentum_buffers


_Param, _Tensor, _U8 = torch.nn.Parameter, torch.Tensor, torch.uint8
_EMPTY: dict = {}


def _empty(p: torch.Tensor) -> torch.Tensor:
    """An empty buffer of p's dtype and device (the momentum buffer when momentum is 0), cached."""
    key = (p.device, p.dtype)
    b = _EMPTY.get(key)
    if b is None:
        b = _EMPTY[key] = p.new_empty(0)
    return b


def _check_step_tensors(fn: str, i: int, p, g) -> None:
    where = f"params[{i}]"
    _check_tensor(where, p, fn)
    if not p.is_floating_point():
        raise TypeError(f"{fn}: {where} must be floating point, got {p.dtype}")
    _check_tensor(f"grads[{i}]", g, fn)
    if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
        raise ValueError(
            f"{fn}: grads[{i}] must match {where} in shape, dtype and device: "
            f"{tuple(g.shape)} {g.dtype} {g.device} vs {tuple(p.shape)} {p.dtype} {p.device}"
        )
    if g.is_sparse:
        raise TypeError(f"{fn}: grads[{i}] is a sparse tensor; masked SGD needs dense gradients")


def _dense_sgd(p, g, buf, lr, momentum, weight_decay, dampening, nesterov, first) -> None:
    d = g
    if weight_decay != 0:
        d = d.add(p, alpha=weight_decay)
    if momentum != 0:
        if first:
            buf.copy_(d)
        else:
            buf.mul_(momentum).add_(d, alpha=1 - dampening)
        d = d.add(buf, alpha=momentum) if nesterov else buf
    p.add_(d, alpha=-lr)
