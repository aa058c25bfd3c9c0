"""Triton kernels of the bit-packed sparse-mask ops: pack, unpack, apply (out of place and in place)
and the fused masked SGD step.

The contract, shared by every backend, is ``pycompress/ops/sparse_mask_ref.py`` (the
``*_kernel_ref`` functions): a mask of n elements (row-major) is packed into
``ceil(n / 32) * 4`` bytes, bit ``i % 8`` of byte ``i // 8`` = element i kept, padding bits 0
(``pycompress/ops/mask_layout_ref.py``). The kernels read and write it as int32 words (bit j of
word w = element 32 w + j; little endian; UNIT = 32 of ``kernels/_common.py``), so every program
owns whole words: flat blocks of BLOCK elements (a multiple of 32) viewed as [BLOCK // 32, 32]
tiles whose rows are the words.

apply works on the raw bits (fp32 as int32, fp16 / bf16 as int16): a select, exact for every
value (-0.0, inf and NaN where pruned become +0.0, kept ones pass unchanged). The SGD step upcasts
to fp32 right after the loads and rounds once to the parameter dtype on store.

The launchers take the op layer's validated, contiguous arguments, allocate outputs and launch;
they check, in O(1), what keeps the kernels in bounds (a packed mask of exactly ceil(n / 32) * 4
bytes for the tensor, dtypes, devices, contiguity: see ``kernels/_common.py``), so that a stale mask
given to the trusted SGD path raises instead of being read past its end.
Everything runs under the Triton interpreter too (``TRITON_INTERPRET=1``, CPU tensors), which is
how it is tested without a GPU. A program whose block is full runs an unmasked copy of the tile
code (so loads and stores vectorise whatever n is); only the last program bounds-checks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_float,
    check_like,
    check_packed,
    from_f32,
    pack_bits,
    packed_mask_bytes,
    select_tile,
    soft_bf16,
    to_f32,
    unpack_bits,
)

__all__ = ["pack_mask", "unpack_mask", "apply_mask", "apply_mask_", "masked_sgd_step"]

# Elements per program and warps (not yet timed on a GPU: sweep on the H100). Powers of two and
# multiples of 32 (whole mask words). 4096 x 8 warps = 16 elements per thread: four 16-byte fp32
# vectors (two fp16) in flight per thread and stream. The SGD step moves up to three streams
# in and two out, so it takes half the elements per program to stay under ~64 registers.
APPLY_BLOCK = 4096
APPLY_WARPS = 8
SGD_BLOCK = 2048
SGD_WARPS = 8
PACK_BLOCK = 4096
PACK_WARPS = 4

# enable_fp_fusion=False (ignored by the interpreter, which never fuses): the SGD step rounds each
# product on its own, as the reference does.
_OPTS = {"enable_fp_fusion": False}


def _i64(n: int, block: int) -> bool:
    """Block starts need int64 offsets."""
    return n + block >= 2**31


def _words(packed: torch.Tensor) -> torch.Tensor:
    """The packed mask as int32 words (a view; a copy when the bytes do not start on a word)."""
    if packed.storage_offset() % 4 != 0 or packed.data_ptr() % 4 != 0:
        packed = packed.clone()
    return packed.view(torch.int32)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bits of a float tensor as same-size integers (apply copies bits, it does no arithmetic)."""
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


# ---------------------------------------------------------------------------------------------
# pack / unpack


@triton.jit
def _pack_tile(m_ptr, words_ptr, start, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK // 32)
    bit = tl.arange(0, 32)
    j = rows[:, None] * 32 + bit[None, :]
    if MASKED:
        v = tl.load(m_ptr + start + j, mask=j < n - start, other=0)
    else:
        v = tl.load(m_ptr + start + j)
    word = pack_bits(v != 0, 32, 1)
    if MASKED:
        tl.store(words_ptr + start // 32 + rows, word, mask=rows * 32 < n - start)
    else:
        tl.store(words_ptr + start // 32 + rows, word)


@triton.jit
def _pack_mask_kernel(m_ptr, words_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr):
    """Pack a bool mask (read as uint8, nonzero = keep) into int32 words.

    Layout: program p covers elements [p * BLOCK, +BLOCK) as a [BLOCK // 32, 32] tile; row r is
    word w = p * BLOCK // 32 + r = sum over j of (m[32 w + j] != 0) << j (distinct bits, so the
    int32 sum is an OR; bit 31 is the sign bit). In the last program, elements past n load as 0
    (padding bits 0) and words past ceil(n / 32) are not stored. Integer math only.
    """
    if I64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    if start + BLOCK <= n:
        _pack_tile(m_ptr, words_ptr, start, n, False, BLOCK)
    else:
        _pack_tile(m_ptr, words_ptr, start, n, True, BLOCK)


@triton.jit
def _unpack_tile(words_ptr, out_ptr, start, n, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.arange(0, BLOCK // 32)
    j = rows[:, None] * 32 + tl.arange(0, 32)[None, :]
    if MASKED:
        words = tl.load(words_ptr + start // 32 + rows, mask=rows * 32 < n - start, other=0)
    else:
        words = tl.load(words_ptr + start // 32 + rows)
    out = unpack_bits(words, 32).to(tl.uint8)
    if MASKED:
        tl.store(out_ptr + start + j, out, mask=j < n - start)
    else:
        tl.store(out_ptr + start + j, out)


@triton.jit
def _unpack_mask_kernel(words_ptr, out_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr):
    """Unpack int32 words into bytes of 0 / 1 (the bool output read as uint8).

    Layout: program p covers elements [p * BLOCK, +BLOCK) as a [BLOCK // 32, 32] tile; element
    32 w + j = (word w >> j) & 1 (an arithmetic shift: only bit 0 is kept). Integer math only.
    """
    if I64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    if start + BLOCK <= n:
        _unpack_tile(words_ptr, out_ptr, start, n, False, BLOCK)
    else:
        _unpack_tile(words_ptr, out_ptr, start, n, True, BLOCK)


# ---------------------------------------------------------------------------------------------
# apply


@triton.jit
def _apply_mask_kernel(w_ptr, out_ptr, words_ptr, n, BLOCK: tl.constexpr, I64: tl.constexpr):
    """out[i] = w[i] if bit i of the packed mask is set, else 0, on raw bits.

    w / out: contiguous, the float data viewed as int32 (fp32) or int16 (fp16 / bf16), so the
    select copies bits (a pruned -0.0 / inf / NaN becomes the all-zero +0.0 pattern, kept values are
    unchanged); out may be w (in place: every element is read before it is written, by the same
    program). Layout: program p covers [p * BLOCK, +BLOCK) as a [BLOCK // 32, 32] tile, one mask
    word per row, expanded with shifts. No arithmetic, no accumulation.
    """
    if I64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    if start + BLOCK <= n:
        select_tile(w_ptr, out_ptr, words_ptr, start, n, 32, False, BLOCK)
    else:
        select_tile(w_ptr, out_ptr, words_ptr, start, n, 32, True, BLOCK)


# ---------------------------------------------------------------------------------------------
# masked SGD step


@triton.jit
def _sgd_tile(
    p_ptr,
    g_ptr,
    b_ptr,
    words_ptr,
    start,
    n,
    lr,
    momentum,
    weight_decay,
    damp1,
    WD: tl.constexpr,
    MODE: tl.constexpr,
    NEST: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    rows = tl.arange(0, BLOCK // 32)
    j = rows[:, None] * 32 + tl.arange(0, 32)[None, :]
    offs = start + j
    word_ptr = words_ptr + start // 32 + rows
    if MASKED:
        inb = j < n - start
        words = tl.load(word_ptr, mask=rows * 32 < n - start, other=0)
        p = to_f32(tl.load(p_ptr + offs, mask=inb, other=0.0), SOFT_BF16)
        g = to_f32(tl.load(g_ptr + offs, mask=inb, other=0.0), SOFT_BF16)
    else:
        words = tl.load(word_ptr)
        p = to_f32(tl.load(p_ptr + offs), SOFT_BF16)
        g = to_f32(tl.load(g_ptr + offs), SOFT_BF16)
    keep = unpack_bits(words, 32)
    g = tl.where(keep, g, 0.0)
    if WD:
        g = g + weight_decay * p
    d = g
    if MODE != 0:
        if MODE == 1:
            b = g
        else:
            if MASKED:
                b_old = to_f32(tl.load(b_ptr + offs, mask=inb, other=0.0), SOFT_BF16)
            else:
                b_old = to_f32(tl.load(b_ptr + offs), SOFT_BF16)
            b = momentum * b_old + damp1 * g
        b = tl.where(keep, b, 0.0)
        b_out = from_f32(b, b_ptr.dtype.element_ty, SOFT_BF16)
        if MASKED:
            tl.store(b_ptr + offs, b_out, mask=inb)
        else:
            tl.store(b_ptr + offs, b_out)
        if NEST:
            d = g + momentum * b
        else:
            d = b
    p = tl.where(keep, p - lr * d, 0.0)
    p_out = from_f32(p, p_ptr.dtype.element_ty, SOFT_BF16)
    if MASKED:
        tl.store(p_ptr + offs, p_out, mask=inb)
    else:
        tl.store(p_ptr + offs, p_out)


@triton.jit
def _masked_sgd_step_kernel(
    p_ptr,
    g_ptr,
    b_ptr,
    words_ptr,
    n,
    lr,
    momentum,
    weight_decay,
    damp1,
    WD: tl.constexpr,
    MODE: tl.constexpr,
    NEST: tl.constexpr,
    BLOCK: tl.constexpr,
    I64: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """One masked SGD step in place on param p and momentum buffer b (grad g read only).

    Math per element, fp32 whatever the dtype (loads upcast at once, stores rounded to nearest
    even once), each product and sum rounded on its own (no FMA: enable_fp_fusion=False), m = mask bit:
        g = m ? g : 0;  g = g + weight_decay * p                        (WD)
        b = g (MODE 1, first step) | momentum * b + damp1 * g (MODE 2);  b = m ? b : 0
        d = g + momentum * b (NEST) | b;  d = g when MODE 0 (no momentum, b untouched)
        p = m ? p - lr * d : 0
    damp1 = 1 - dampening (computed by the launcher in double, passed as fp32). The selects make a
    pruned p and b exactly +0.0 whatever they held. Layout: contiguous p / g / b of one dtype;
    program q covers [q * BLOCK, +BLOCK) as a [BLOCK // 32, 32] tile, one mask word per row.
    No accumulation across elements.
    """
    if I64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    if start + BLOCK <= n:
        _sgd_tile(
            p_ptr,
            g_ptr,
            b_ptr,
            words_ptr,
            start,
            n,
            lr,
            momentum,
            weight_decay,
            damp1,
            WD,
            MODE,
            NEST,
            False,
            BLOCK,
            SOFT_BF16,
        )
    else:
        _sgd_tile(
            p_ptr,
            g_ptr,
            b_ptr,
            words_ptr,
            start,
            n,
            lr,
            momentum,
            weight_decay,
            damp1,
            WD,
            MODE,
            NEST,
            True,
            BLOCK,
            SOFT_BF16,
        )


# ---------------------------------------------------------------------------------------------
# launchers


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n / 32) * 4] packed mask of a contiguous bool mask (any shape)."""
    if mask.dtype != torch.bool:  # read as one byte per element (reshape copies a non-contiguous one)
        raise TypeError(f"pack_mask (triton): mask must be bool, got {mask.dtype}")
    n = mask.numel()
    out = torch.empty(packed_mask_bytes(n), dtype=torch.uint8, device=mask.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, PACK_BLOCK),)
    _pack_mask_kernel[grid](
        mask.reshape(-1).view(torch.uint8),
        out.view(torch.int32),
        n,
        BLOCK=PACK_BLOCK,
        I64=_i64(n, PACK_BLOCK),
        num_warps=PACK_WARPS,
    )
    return out


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first n bits of a packed mask (of exactly ceil(n / 32) * 4 bytes) as a new bool [n]."""
    check_packed("unpack_mask (triton)", packed, n, packed.device)
    out = torch.empty(n, dtype=torch.bool, device=packed.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, PACK_BLOCK),)
    _unpack_mask_kernel[grid](
        _words(packed), out.view(torch.uint8), n, BLOCK=PACK_BLOCK, I64=_i64(n, PACK_BLOCK), num_warps=PACK_WARPS
    )
    return out


def _apply(fn: str, w: torch.Tensor, out: torch.Tensor, packed: torch.Tensor) -> None:
    check_float(fn, "w", w)  # also what _raw needs: 4- or 2-byte elements
    n = w.numel()
    check_packed(fn, packed, n, w.device)
    if n == 0:
        return
    grid = (triton.cdiv(n, APPLY_BLOCK),)
    _apply_mask_kernel[grid](
        _raw(w), _raw(out), _words(packed), n, BLOCK=APPLY_BLOCK, I64=_i64(n, APPLY_BLOCK), num_warps=APPLY_WARPS
    )


def apply_mask(w: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor: w where kept, +0.0 where pruned (w contiguous fp32 / fp16 / bf16)."""
    out = torch.empty_like(w, memory_format=torch.contiguous_format)
    _apply("apply_mask (triton)", w, out, packed)
    return out


def apply_mask_(w: torch.Tensor, packed: torch.Tensor) -> None:
    """apply_mask in place on a contiguous w."""
    _apply("apply_mask_ (triton)", w, w, packed)


def masked_sgd_step(param, grad, buf, packed, lr, momentum, weight_decay, dampening, nesterov, first) -> None:
    """One masked SGD step in place on param and buf (an empty tensor when momentum == 0)."""
    fn = "masked_sgd_step (triton)"
    check_float(fn, "param", param)
    check_like(fn, "grad", grad, param, "param")
    mode = 0 if momentum == 0 else (1 if first else 2)
    if mode != 0:
        check_like(fn, "buf", buf, param, "param")
    n = param.numel()
    check_packed(fn, packed, n, param.device)
    if n == 0:
        return
    grid = (triton.cdiv(n, SGD_BLOCK),)
    _masked_sgd_step_kernel[grid](
        param,
        grad,
        buf if mode != 0 else param,
        _words(packed),
        n,
        float(lr),
        float(momentum),
        float(weight_decay),
        float(1.0 - dampening),
        WD=weight_decay != 0,
        MODE=mode,
        NEST=bool(nesterov) and mode != 0,
        BLOCK=SGD_BLOCK,
        I64=_i64(n, SGD_BLOCK),
        SOFT_BF16=soft_bf16(),
        num_warps=SGD_WARPS,
        **_OPTS,
    )
