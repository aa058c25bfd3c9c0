"""Bit-packed sparse masks: pack_mask, unpack_mask, apply_mask and a fused masked SGD step.

A mask of n elements is stored in 1 bit per element (uint8, whole 32-bit words; the layout is in
``pycompress.ops.sparse_mask_ref``, which is the specification of every op here). The public
functions validate their arguments before any kernel runs, choose a backend
(``pycompress.backends``) and call registered ops (``pycompress::pack_mask``, ...), which have fake
kernels (and, for apply_mask, an autograd formula), so ``torch.compile`` sees one node per op and
``torch.library.opcheck`` passes.
"""
from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from .. import _ext, backends
from . import sparse_mask_ref as _ref
from .sparse_mask_ref import packed_mask_bytes

__all__ = ["pack_mask", "unpack_mask", "apply_mask", "masked_sgd_step", "packed_mask_bytes"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# backends


@torch.compiler.assume_constant_result
def _cpp_has_kernels() -> bool:
    return _ext.loaded() and hasattr(torch.ops.pycompress, "_masked_sgd_step")


def _kernels(backend: str):
    """(pack, unpack, apply, apply_inplace, sgd_step) kernel-level functions of a backend; their
    contracts are the ``*_kernel_ref`` functions of sparse_mask_ref."""
    if backend == "reference":
        return (_ref.pack_kernel_ref, _ref.unpack_kernel_ref, _ref.apply_kernel_ref,
                _ref.apply_inplace_kernel_ref, _ref.sgd_step_kernel_ref)
    if backend in ("cpu", "cuda"):
        ops = torch.ops.pycompress
        return ops._pack_mask, ops._unpack_mask, ops._apply_mask, ops._apply_mask_, ops._masked_sgd_step
    if backend == "triton":
        from ..kernels import sparse_mask as tk

        return tk.pack_mask, tk.unpack_mask, tk.apply_mask, tk.apply_mask_, tk.masked_sgd_step
    raise ValueError(f"unknown backend {backend!r}")


def _device_reason(backend: str, t: torch.Tensor) -> Optional[str]:
    if backend in ("cpu", "cuda") and not _cpp_has_kernels():
        return "the compiled extension pycompress._C has no sparse-mask kernels (an old build: rebuild it)"
    if backend == "cpu" and t.device.type != "cpu":
        return f"the tensors are on {t.device}, the cpu backend runs CPU tensors"
    if backend == "cuda" and t.device.type != "cuda":
        return f"the tensors are on {t.device}, the cuda backend runs CUDA tensors"
    if backend == "triton" and t.device.type != "cuda" and not (t.device.type == "cpu" and backends.triton_interpreting()):
        return f"the tensors are on {t.device}; triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    return None


def _supports(backend: str):
    def supports(t: torch.Tensor, float_op: bool = False) -> Optional[str]:
        reason = _device_reason(backend, t)
        if reason is None and float_op and t.dtype not in _FLOAT_DTYPES:
            reason = f"dtype {t.dtype}; this backend supports float32, float16 and bfloat16 (float64 runs on reference)"
        return reason

    return supports


for _op in ("pack_mask", "unpack_mask", "apply_mask", "masked_sgd_step"):
    backends.register_op(
        _op, {"reference": lambda t, float_op=False: None, **{b: _supports(b) for b in ("cpu", "cuda", "triton")}}
    )


# --------------------------------------------------------------------------------------------
# registered ops


@torch.library.custom_op("pycompress::pack_mask", mutates_args=())
def _pack_mask_op(mask: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend)[0](mask.contiguous())


@_pack_mask_op.register_fake
def _(mask, backend):
    return mask.new_empty((packed_mask_bytes(mask.numel()),), dtype=torch.uint8)


@torch.library.custom_op("pycompress::unpack_mask", mutates_args=())
def _unpack_mask_op(packed: torch.Tensor, shape: Sequence[int], backend: str) -> torch.Tensor:
    return _kernels(backend)[1](packed, math.prod(shape)).view(shape)


@_unpack_mask_op.register_fake
def _(packed, shape, backend):
    return packed.new_empty(list(shape), dtype=torch.bool)


@torch.library.custom_op("pycompress::apply_mask", mutates_args=())
def _apply_mask_op(w: torch.Tensor, packed: torch.Tensor, backend: str) -> torch.Tensor:
    return _kernels(backend)[2](w.contiguous(), packed)


@_apply_mask_op.register_fake
def _(w, packed, backend):
    return torch.empty_like(w, memory_format=torch.contiguous_format)


def _apply_setup(ctx, inputs, output):
    _, packed, backend = inputs
    ctx.save_for_backward(packed)
    ctx.backend = backend


def _apply_backward(ctx, grad):
    (packed,) = ctx.saved_tensors
    # d(w * m)/dw = m: the gradient of a pruned element is 0.
    return torch.ops.pycompress.apply_mask(grad, packed, ctx.backend), None, None


_apply_mask_op.register_autograd(_apply_backward, setup_context=_apply_setup)


@torch.library.custom_op("pycompress::apply_mask_", mutates_args=("w",))
def _apply_mask_inplace_op(w: torch.Tensor, packed: torch.Tensor, backend: str) -> None:
    if w.is_contiguous():
        _kernels(backend)[3](w, packed)
    else:
        tmp = w.contiguous()
        _kernels(backend)[3](tmp, packed)
        w.copy_(tmp)


@_apply_mask_inplace_op.register_fake
def _(w, packed, backend):
    return None


@torch.library.custom_op("pycompress::masked_sgd_step_", mutates_args=("param", "buf"))
def _masked_sgd_step_op(param: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor, packed: torch.Tensor,
                        lr: float, momentum: float, weight_decay: float, dampening: float, nesterov: bool,
                        first: bool, backend: str) -> None:
    step = _kernels(backend)[4]
    if param.is_contiguous():
        step(param, grad.contiguous(), buf, packed, lr, momentum, weight_decay, dampening, nesterov, first)
    else:
        tmp = param.contiguous()
        step(tmp, grad.contiguous(), buf, packed, lr, momentum, weight_decay, dampening, nesterov, first)
        param.copy_(tmp)


@_masked_sgd_step_op.register_fake
def _(param, grad, buf, packed, lr, momentum, weight_decay, dampening, nesterov, first, backend):
    return None


def _register_cpp_fakes() -> None:
    """Fake kernels for the C++ kernel ops, so they work under torch.compile and opcheck."""
    if not _ext.loaded() or not hasattr(torch.ops.pycompress, "_pack_mask"):
        return

    @torch.library.register_fake("pycompress::_pack_mask")
    def _(mask):
        return mask.new_empty((packed_mask_bytes(mask.numel()),), dtype=torch.uint8)

    @torch.library.register_fake("pycompress::_unpack_mask")
    def _(packed, n):
        return packed.new_empty((n,), dtype=torch.bool)

    @torch.library.register_fake("pycompress::_apply_mask")
    def _(w, packed):
        return torch.empty_like(w, memory_format=torch.contiguous_format)

    # The in-place kernels return nothing (schema "-> ()"): their fakes return None.
    @torch.library.register_fake("pycompress::_apply_mask_")
    def _(w, packed):
        return None

    @torch.library.register_fake("pycompress::_masked_sgd_step")
    def _(param, grad, buf, packed, lr, momentum, weight_decay, dampening, nesterov, first):
        return None


_register_cpp_fakes()


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
    name = backends.select(fn, backend, t=mask)
    return torch.ops.pycompress.pack_mask(mask, name)


def unpack_mask(packed: torch.Tensor, shape: Sequence[int], *, backend: Optional[str] = None) -> torch.Tensor:
    """The bool mask of ``shape`` stored in ``packed`` (the inverse of pack_mask)."""
    fn = "unpack_mask"
    shape = _check_shape(shape, fn)
    _check_tensor("packed", packed, fn)
    packed = _check_packed(packed, math.prod(shape), packed.device, fn, what=f"shape {tuple(shape)}")
    name = backends.select(fn, backend, t=packed)
    return torch.ops.pycompress.unpack_mask(packed, shape, name)


def apply_mask(w: torch.Tensor, packed: torch.Tensor, *, inplace: bool = False,
               backend: Optional[str] = None) -> torch.Tensor:
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
    name = backends.select(fn, backend, t=w, float_op=True)
    if inplace:
        if w.requires_grad and torch.is_grad_enabled() and w.is_leaf:
            raise RuntimeError(
                f"{fn}: inplace=True on a leaf tensor that requires grad; wrap it in torch.no_grad() "
                "(e.g. masking a parameter between steps) or use inplace=False"
            )
        torch.ops.pycompress.apply_mask_(w, packed, name)
        return w
    return torch.ops.pycompress.apply_mask(w, packed, name)


def masked_sgd_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                    momentum_buffers: List[Optional[torch.Tensor]], masks: Sequence[Optional[torch.Tensor]], *,
                    lr: float, momentum: float = 0.0, weight_decay: float = 0.0, dampening: float = 0.0,
                    nesterov: bool = False, backend: Optional[str] = None) -> List[Optional[torch.Tensor]]:
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
        raise ValueError(f"{fn}: nesterov momentum requires momentum > 0 and zero dampening "
                         f"(got momentum={momentum}, dampening={dampening})")
    n = len(params)
    for what, seq in (("grads", grads), ("momentum_buffers", momentum_buffers), ("masks", masks)):
        if len(seq) != n:
            raise ValueError(f"{fn}: {what} has {len(seq)} entries but params has {n}")
    chosen: dict = {}
    eager = not torch.compiler.is_compiling()
    for i, (p, g, b, mk) in enumerate(zip(params, grads, momentum_buffers, masks)):
        where = f"params[{i}]"
        _check_tensor(where, p, fn)
        if not p.is_floating_point():
            raise TypeError(f"{fn}: {where} must be floating point, got {p.dtype}")
        _check_tensor(f"grads[{i}]", g, fn)
        if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
            raise ValueError(f"{fn}: grads[{i}] must match {where} in shape, dtype and device: "
                             f"{tuple(g.shape)} {g.dtype} {g.device} vs {tuple(p.shape)} {p.dtype} {p.device}")
        if g.is_sparse:
            raise TypeError(f"{fn}: grads[{i}] is a sparse tensor; masked SGD needs dense gradients")
        first = b is None
        if momentum != 0:
            if first:
                b = torch.zeros_like(p, memory_format=torch.contiguous_format)
                momentum_buffers[i] = b
            else:
                _check_tensor(f"momentum_buffers[{i}]", b, fn)
                if b.shape != p.shape or b.dtype != p.dtype or b.device != p.device or not b.is_contiguous():
                    raise ValueError(f"{fn}: momentum_buffers[{i}] must be contiguous and match {where} in shape, "
                                     f"dtype and device")
        if mk is None:
            with torch.no_grad():
                _dense_sgd(p, g, momentum_buffers[i] if momentum != 0 else None, lr, momentum, weight_decay,
                           dampening, nesterov, first)
            continue
        mk = _check_packed(mk, p.numel(), p.device, fn, what=where)
        key = (p.device, p.dtype)
        if key not in chosen:  # supports() depends on the device and dtype only
            chosen[key] = backends.select(fn, backend, t=p, float_op=True)
        name = chosen[key]
        buf = momentum_buffers[i] if momentum != 0 else p.new_empty(0)
        if eager and p.is_contiguous() and g.is_contiguous():
            # the registered op's kernel, without the custom-op dispatch (tens of microseconds per
            # tensor, which dominates models of many small layers)
            _kernels(name)[4](p.detach(), g.detach(), buf, mk, lr, momentum, weight_decay, dampening, nesterov, first)
        else:
            torch.ops.pycompress.masked_sgd_step_(p.detach(), g.detach(), buf, mk, lr, momentum, weight_decay,
                                                  dampening, nesterov, first, name)
    return momentum_buffers


def _masked_sgd_step_trusted(params, grads, momentum_buffers, masks, *, lr: float, momentum: float,
                             weight_decay: float, dampening: float, nesterov: bool,
                             backend: Optional[str] = None) -> None:
    """masked_sgd_step for an optimizer whose arguments are known to be valid (pycompress.prune.MaskedSGD
    checks its masks when they are set and its hyper-parameters at construction; gradients come from
    autograd). In eager mode it skips the per-tensor checks and calls the backend's kernel directly,
    which matters for models of many small tensors; anything unusual (non-contiguous tensors,
    torch.compile) takes the public path."""
    if torch.compiler.is_compiling():
        masked_sgd_step(params, grads, momentum_buffers, masks, lr=lr, momentum=momentum, weight_decay=weight_decay,
                        dampening=dampening, nesterov=nesterov, backend=backend)
        return
    chosen = {}
    for i, (p, g, mk) in enumerate(zip(params, grads, masks)):
        b = momentum_buffers[i]
        first = b is None
        if mk is None or not (p.is_contiguous() and g.is_contiguous()) or g.dtype != p.dtype:
            one = [b]
            masked_sgd_step([p], [g], one, [mk], lr=lr, momentum=momentum, weight_decay=weight_decay,
                            dampening=dampening, nesterov=nesterov, backend=backend)
            momentum_buffers[i] = one[0]
            continue
        key = (p.device, p.dtype)
        if key not in chosen:
            chosen[key] = _kernels(backends.select("masked_sgd_step", backend, t=p, float_op=True))[4]
        if momentum != 0:
            if first:
                b = torch.zeros_like(p, memory_format=torch.contiguous_format)
                momentum_buffers[i] = b
        else:
            b = _EMPTY.get(key)
            if b is None:
                b = _EMPTY[key] = p.new_empty(0)
        chosen[key](p.detach(), g.detach(), b, mk, lr, momentum, weight_decay, dampening, nesterov, first)


_EMPTY: dict = {}


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
