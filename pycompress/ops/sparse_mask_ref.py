"""Plain-torch specification of the bit-packed sparse-mask ops.

Every backend (cpu, cuda, triton) implements the kernel-level functions below on the same
normalised arguments (prepared by ``pycompress.ops.sparse_mask``) and must match them: packing,
unpacking and apply_mask bit for bit, the fused SGD step within per-dtype float tolerance (the
fused kernels may contract a multiply and an add).

Packed layout: ``pycompress.ops.mask_layout_ref`` (shared with fake_quantize's clamp mask): a mask
of n elements, flattened in row-major (C) order, is a uint8 tensor of ``packed_mask_bytes(n) =
ceil(n / 32) * 4`` bytes; bit (i % 8) of byte (i // 8) is 1 where element i is kept.

apply_mask: ``out[i] = w[i] if bit i else +0.0``. A select, not a multiply: a pruned element is
exactly +0.0 whatever it held (also -0.0, inf and NaN), so pruned weights are bit-identical zeros.

masked_sgd_step, per element, in fp32 whatever the parameter dtype (fp64 in this reference only),
with m = bit i, p the parameter, g its gradient, b its momentum buffer:
    g = m ? g : 0
    g = g + weight_decay * p                         (when weight_decay != 0)
    b = first ? g : momentum * b + (1 - dampening) * g     (when momentum != 0)
    b = m ? b : 0
    d = nesterov ? g + momentum * b : b              (d = g when momentum == 0)
    p = m ? p - lr * d : 0
``first`` is True on a buffer's first step (torch.optim.SGD then copies the gradient into the
buffer without dampening). This is torch.optim.SGD's step (maximize=False) followed by re-masking,
with the gradient and the momentum buffer masked too, so a pruned weight is exactly 0 after every
step and nothing can regrow it through momentum or weight decay.
"""

from __future__ import annotations

import torch

from .mask_layout_ref import pack_bits_ref, packed_mask_bytes, unpack_bits_ref

__all__ = [
    "packed_mask_bytes",
    "pack_mask_ref",
    "unpack_mask_ref",
    "apply_mask_ref",
    "masked_sgd_step_ref",
    "pack_kernel_ref",
    "unpack_kernel_ref",
    "apply_kernel_ref",
    "apply_inplace_kernel_ref",
    "sgd_step_kernel_ref",
]


# ----------------------------------------------------------------------------- kernel level
# Arguments are validated and contiguous; these are what the fused backends implement.


def pack_kernel_ref(mask: torch.Tensor) -> torch.Tensor:
    """mask: bool, contiguous, any shape -> uint8 [packed_mask_bytes(numel)]."""
    return pack_bits_ref(mask)


def unpack_kernel_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """packed: uint8 [packed_mask_bytes(n)] -> bool [n]."""
    return unpack_bits_ref(packed, n)


def apply_kernel_ref(w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """w: contiguous float tensor -> a new contiguous tensor, w where kept, +0.0 where pruned."""
    keep = unpack_bits_ref(packed, w.numel()).view(w.shape)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def apply_inplace_kernel_ref(w: torch.Tensor, packed: torch.Tensor) -> None:
    """In-place apply_kernel_ref on a contiguous w."""
    w.copy_(apply_kernel_ref(w, packed))


def sgd_step_kernel_ref(
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
) -> None:
    """One masked SGD step on one contiguous tensor, in place on param and buf (see the module
    docstring). buf is an empty tensor when momentum == 0; grad is read only."""
    if param.numel() == 0:
        return
    compute = torch.float64 if param.dtype == torch.float64 else torch.float32
    m = unpack_bits_ref(packed, param.numel()).view(param.shape)
    zero = torch.zeros((), dtype=compute, device=param.device)
    p = param.to(compute)
    g = torch.where(m, grad.to(compute), zero)
    if weight_decay != 0:
        g = g + weight_decay * p
    if momentum != 0:
        b = g if first else momentum * buf.to(compute) + (1 - dampening) * g
        b = torch.where(m, b, zero)
        buf.copy_(b)
        d = g + momentum * b if nesterov else b
    else:
        d = g
    param.copy_(torch.where(m, p - lr * d, zero))


# ----------------------------------------------------------------------------- op level


def pack_mask_ref(mask: torch.Tensor) -> torch.Tensor:
    """The specification of pycompress.ops.pack_mask (no argument checks)."""
    return pack_bits_ref(mask.bool().contiguous())


def unpack_mask_ref(packed: torch.Tensor, shape) -> torch.Tensor:
    """The specification of pycompress.ops.unpack_mask (no argument checks)."""
    shape = torch.Size(shape)
    return unpack_bits_ref(packed, shape.numel()).view(shape)


def apply_mask_ref(w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """The specification of pycompress.ops.apply_mask (out of place, no argument checks)."""
    keep = unpack_mask_ref(packed, w.shape)
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device))


def masked_sgd_step_ref(
    params,
    grads,
    momentum_buffers,
    masks,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
):
    """The specification of pycompress.ops.masked_sgd_step: updates params (and the buffers) in
    place; a None buffer is created on its first step, a None mask means dense. Returns the list of
    momentum buffers."""
    out = []
    for p, g, b, mk in zip(params, grads, momentum_buffers, masks):
        first = b is None
        if momentum != 0 and first:
            b = torch.zeros_like(p, memory_format=torch.contiguous_format)
        if mk is None:  # a dense parameter: every bit set
            mk = pack_bits_ref(torch.ones(p.shape, dtype=torch.bool, device=p.device))
        pc = p.contiguous()
        sgd_step_kernel_ref(
            pc,
            g.contiguous(),
            b if momentum != 0 else p.new_empty(0),
            mk,
            lr,
            momentum,
            weight_decay,
            dampening,
            nesterov,
            first,
        )
        if pc.data_ptr() != p.data_ptr():
            p.copy_(pc)
        out.append(b if momentum != 0 else None)
    return out
