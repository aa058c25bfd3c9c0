"""Triton kernels of fake quantization (forward, straight-through backward, LSQ backward).

The contract, shared by every backend, is ``pycompress/ops/fake_quantize_ref.py``: x contiguous
fp32 / fp16 / bf16 viewed as [outer, C, inner] (channel of element i = (i // inner) % C, C == 1
is per-tensor), fp32 [C] inv_scale / scale / zero_point, arithmetic in fp32, forward and
straight-through backward bit for bit equal to the reference, LSQ sums within float-summation
tolerance of it.

The launchers take the op layer's already validated, normalised arguments: they allocate outputs,
pick a strategy, block sizes and a grid, and launch, after O(1) checks of what keeps the kernels in
bounds (dtypes, devices, contiguity, [C] parameters, a packed mask of exactly ceil(n / 32) * 4
bytes; see ``kernels/_common.py``). Everything also runs under the Triton interpreter
(``TRITON_INTERPRET=1``, CPU tensors), which is how it is tested without a GPU.

Forward launch strategies (B = FWD_BLOCK elements per program):
    C == 1                  flat blocks, the three scalars loaded once per program
    C > 1, inner >= B       flat blocks, which then span at most two channel rows: two sets of
                            scalars and one compare-and-select per element
    C > 1, inner == 1,      (channels-last) column tiles of the [outer, C] matrix: parameters
      outer >= 4, and       loaded as vectors along the columns, no index math
      C % 8 == 0 or no mask
    otherwise               flat blocks, per-element channel gathered; the channel index comes from
                            two multiply-shift divisions by host-computed magic numbers (see
                            ``_magic``), not from a hardware integer division per element
Every program owns whole bytes of the packed mask (flat blocks are multiples of 32 elements;
column tiles need C % 8 == 0), so the mask is written without races or a second pass.
A program whose block is full runs an unmasked copy of the tile code, so loads and stores
vectorise whatever n is; only edge programs run the masked copy. The straight-through backward
is always flat blocks.

LSQ backward: the per-element terms are computed in fp32 exactly as the reference computes them,
then summed in fp64 (a tree inside each program, per-program partials in a small fp64 buffer,
then one torch sum: deterministic, no float atomics), so the fp32 results match the reference's
fp64-summed ones to fp32 rounding even where the terms cancel heavily. Per-tensor uses flat
blocks; per-channel picks, by the size of the partial buffer it needs, either row tiles of the
[outer * C, inner] matrix (reduced along inner; good for large inner) or column tiles of the
[outer, C * inner] matrix that loop over several row tiles (reduced along outer; good for small
inner, e.g. channels-last).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    check_float,
    check_like,
    check_packed,
    check_vector,
    from_f32,
    pack_bits,
    packed_mask_bytes,
    select_tile,
    soft_bf16,
    to_f32,
)

__all__ = ["fake_quantize_fwd", "fake_quantize_bwd", "fake_quantize_bwd_learnable"]

# Elements per program and warps, from ptxas (sm_90) register and SASS instruction counts (not yet
# timed on a GPU: sweep these on the H100). Forward: 4096 x 8 warps = 16 elements per thread
# (four 16-byte fp32 vectors): 40 registers per-tensor, <= 80 per-channel (116 when n needs
# int64), so 3-6 programs fit per SM with ~50-100 KB of loads in flight, and the per-thread
# scalar work (block start, channel of the block) is spread over 16 elements: ~31 SASS
# instructions per element per-tensor, ~41 per-channel with inner >= B, ~51-55 per-channel
# gather (vs 36 / 50 / 61 with 8 elements per thread). LSQ: 2048 x 8 warps keeps it at <= ~80
# registers (its fp64 sums are wider). Constraints: powers of two, multiples of 32 (each program owns whole words of the
# packed mask), FWD_BLOCK <= 2**(_DIV_BITS - 1) (the gather path's multiply-shift division bound).
FWD_BLOCK = 4096
FWD_WARPS = 8
BWD_BLOCK = 4096  # no arithmetic to speak of: 56-58 registers
BWD_WARPS = 8
LRN_BLOCK = 2048
LRN_WARPS = 8
# Channels-last column-tile forward: at most _FWD_COLS columns per tile (so that a tile has
# >= FWD_BLOCK / _FWD_COLS rows); used from _FWD_COLS_MIN_ROWS rows on.
_FWD_COLS = 256
_FWD_COLS_MIN_ROWS = 4
# Column-tile LSQ: aim for this many programs, looping each over up to _LRN_MAX_ITERS row tiles
# so the partial buffer stays a small fraction of the input.
_LRN_TARGET_PROGRAMS = 4096
_LRN_MAX_ITERS = 64
_LRN_COLS = 256

# Numerators of the gather path's divisions are < 2**_DIV_BITS (see _magic).
_DIV_BITS = 14


def _magic(d: int, bits: int = _DIV_BITS) -> tuple[int, int]:
    """(m, s) with (t * m) >> s == t // d for every 0 <= t < 2**bits, all in int32.

    s = bits + ceil(log2 d), m = ceil(2**s / d): the error term t * (m * d - 2**s) / (d * 2**s)
    is below 2**(bits - s) <= 1 / d, too small to cross an integer, and t * m < 2**(2 * bits + 1)
    fits int32 for bits <= 15. A divisor >= 2**bits always gives quotient 0.
    """
    if d >= (1 << bits):
        return 0, 0
    s = bits + (d - 1).bit_length()
    return -(-(1 << s) // d), s


# ---------------------------------------------------------------------------------------------
# element math


@triton.jit
def _quantize(x, inv, scale, zp, qmin, qmax):
    """fp32 fake quantization of x (fp32): returns (out fp32, below, above).

    v = x * inv; q = rint(v) + zp with rint rounding half to even; qc = q clamped to [qmin, qmax]
    by compare-and-select (a NaN q fails both compares and stays NaN; +-inf saturate);
    out = (qc - zp) * scale.

    rint without libdevice, exact in fp32 and with one floor: f = floor(v), t = f + 0.5; round up
    where v > t, or where v == t (a tie), |v| < 2**23 and f is odd. Parity: h = f * 0.5 is exact
    and |h| <= 2**22 when |v| < 2**23, so h + 1.5 * 2**23 lies in [2**23, 2**24], where the
    spacing is 1: it changes h (and (h + M) - M != h) exactly when h is a half-integer, i.e. f odd.
    For |v| >= 2**23 (already integral, f == v) r = f == v; t = f + 0.5 may round down to f there,
    hence the |v| < 2**23 condition on ties. v itself is only compared, never added to, so fp
    contraction (mul + add -> FMA) cannot change which product x * inv gets rounded (the classic
    (v + 1.5 * 2**23) - 1.5 * 2**23 trick would become fma(x, inv, 1.5 * 2**23) and round the
    exact product instead); the only other product, f * 0.5, is exact, so fusing it is harmless.
    inf: f = t = inf, no tie, r = inf. NaN: every compare is false, r = f = NaN.
    """
    v = x * inv
    f = tl.floor(v)
    t = f + 0.5
    h = f * 0.5
    odd = ((h + 12582912.0) - 12582912.0) != h
    up = (v > t) | ((v == t) & odd & (tl.abs(v) < 8388608.0))
    q = tl.where(up, f + 1.0, f) + zp
    below = q < qmin
    above = q > qmax
    qc = tl.where(below, qmin, tl.where(above, qmax, q))
    out = (qc - zp) * scale
    return out, below, above


@triton.jit
def _lsq_terms(x, g, inv, scale, zp, qmin, qmax):
    """Per-element LSQ terms in fp32 (x, g fp32): returns (clamped, d_scale, d_zero_point).

    in range: d_scale = g * (out - x) * inv, d_zero_point = 0
    q < qmin: d_scale = g * (qmin - zp),     d_zero_point = -g * scale
    q > qmax: d_scale = g * (qmax - zp),     d_zero_point = -g * scale
    A NaN x is in range and gives a NaN d_scale (out - x is NaN).
    """
    out, below, above = _quantize(x, inv, scale, zp, qmin, qmax)
    clamped = below | above
    d_scale = tl.where(below, g * (qmin - zp), tl.where(above, g * (qmax - zp), g * (out - x) * inv))
    d_zero = tl.where(clamped, -g * scale, 0.0)
    return clamped, d_scale, d_zero


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_tile(
    x_ptr,
    out_ptr,
    mask_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    start,
    n,
    mask_nbytes,
    inner,
    C,
    div_in_m,
    div_in_s,
    div_c_m,
    div_c_s,
    qmin,
    qmax,
    MODE: tl.constexpr,
    WITH_MASK: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """One block of BLOCK elements from flat index `start`, as a [BLOCK // 8, 8] tile whose rows
    are the bytes of the packed mask. MASKED is False for a full block (no bounds checks). The
    scalar divisions below run once per thread, not per element, but with 16 elements per thread
    they still cost a few instructions per element: hence an int32 `start` unless n needs int64."""
    rows = tl.arange(0, BLOCK // 8)
    bit = tl.arange(0, 8)
    j = rows[:, None] * 8 + bit[None, :]  # int32 offset inside the block, added to `start`
    if MASKED:
        inb = j < n - start
        x = to_f32(tl.load(x_ptr + start + j, mask=inb, other=0.0), SOFT_BF16)
    else:
        x = to_f32(tl.load(x_ptr + start + j), SOFT_BF16)

    if MODE == 0:  # per-tensor
        inv = tl.load(inv_ptr)
        scale = tl.load(scale_ptr)
        zp = tl.load(zp_ptr)
    elif MODE == 1:  # per-channel, inner < BLOCK: gather per element
        row0 = start // inner
        rem = (start - row0 * inner).to(tl.int32)
        c0 = (row0 % C).to(tl.int32)
        # (rem + j) < inner + BLOCK <= 2**_DIV_BITS, so both divisions are exact multiply-shifts.
        drow = ((rem + j) * div_in_m) >> div_in_s  # (rem + j) // inner
        wraps = (drow * div_c_m) >> div_c_s  # drow // C
        c = c0 + (drow - wraps * C)
        c = tl.where(c >= C, c - C, c)
        inv = tl.load(inv_ptr + c)
        scale = tl.load(scale_ptr + c)
        zp = tl.load(zp_ptr + c)
    else:  # per-channel, inner >= BLOCK: the block spans at most two channel rows
        row0 = start // inner
        rem = start - row0 * inner
        c0 = row0 % C
        c1 = tl.where(c0 + 1 == C, 0, c0 + 1)
        second = j >= tl.minimum(inner - rem, BLOCK).to(tl.int32)
        inv = tl.where(second, tl.load(inv_ptr + c1), tl.load(inv_ptr + c0))
        scale = tl.where(second, tl.load(scale_ptr + c1), tl.load(scale_ptr + c0))
        zp = tl.where(second, tl.load(zp_ptr + c1), tl.load(zp_ptr + c0))

    out, below, above = _quantize(x, inv, scale, zp, qmin, qmax)
    out = from_f32(out, out_ptr.dtype.element_ty, SOFT_BF16)
    if MASKED:
        tl.store(out_ptr + start + j, out, mask=inb)
    else:
        tl.store(out_ptr + start + j, out)

    if WITH_MASK:
        keep = (below | above) == 0
        if MASKED:
            keep = keep & inb  # padding bits past n are 0
        byte = pack_bits(keep, 8, 1).to(tl.uint8)
        byte_ptr = mask_ptr + start // 8 + rows
        if MASKED:
            tl.store(byte_ptr, byte, mask=rows < mask_nbytes - start // 8)
        else:
            tl.store(byte_ptr, byte)


@triton.jit
def _fake_quantize_fwd_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    n,
    mask_nbytes,
    inner,
    C,
    div_in_m,
    div_in_s,
    div_c_m,
    div_c_s,
    qmin,
    qmax,
    MODE: tl.constexpr,
    WITH_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    I64: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Fake-quantization forward over flat blocks of BLOCK elements (1D grid, cdiv(n, BLOCK)).

    Math (fp32 whatever x's dtype; x upcast right after the load, out cast to x's dtype once):
        v = x * inv[c]; q = rint_half_even(v) + zp[c]; qc = clamp(q, qmin, qmax) by selects;
        out = (qc - zp[c]) * scale[c]
    bit for bit the reference (see _quantize for the rounding). Layout: x / out contiguous,
    element i in channel (i // inner) % C; MODE 0 per-tensor (C == 1), 1 per-channel gather
    (inner < BLOCK), 2 per-channel with inner >= BLOCK. Packed mask (WITH_MASK): uint8, bit i % 8
    of byte i // 8 is 1 where element i is not clamped (NaN counts as kept), padding bits 0, up to
    mask_nbytes = ceil(n / 32) * 4 bytes; program p writes bytes [p * BLOCK / 8, (p + 1) * BLOCK / 8).
    Offsets: block start int64 when I64 (n + BLOCK >= 2**31), else int32 (cheaper scalar
    divisions), plus int32 inside the block. No accumulation.
    """
    if I64:
        start = tl.program_id(0).to(tl.int64) * BLOCK
    else:
        start = tl.program_id(0) * BLOCK
    if start + BLOCK <= n:
        _fwd_tile(
            x_ptr,
            out_ptr,
            mask_ptr,
            inv_ptr,
            scale_ptr,
            zp_ptr,
            start,
            n,
            mask_nbytes,
            inner,
            C,
            div_in_m,
            div_in_s,
            div_c_m,
            div_c_s,
            qmin,
            qmax,
            MODE,
            WITH_MASK,
            False,
            BLOCK,
            SOFT_BF16,
        )
    else:
        _fwd_tile(
            x_ptr,
            out_ptr,
            mask_ptr,
            inv_ptr,
            scale_ptr,
            zp_ptr,
            start,
            n,
            mask_nbytes,
            inner,
            C,
            div_in_m,
            div_in_s,
            div_c_m,
            div_c_s,
            qmin,
            qmax,
            MODE,
            WITH_MASK,
            True,
            BLOCK,
            SOFT_BF16,
        )


@triton.jit
def _fwd_cols_tile(
    x_ptr,
    out_ptr,
    mask_ptr,
    offs,
    byte_offs,
    inv,
    scale,
    zp,
    rmask,
    cmask,
    bmask,
    qmin,
    qmax,
    WITH_MASK: tl.constexpr,
    MASKED: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """One [RO, BL // 8, 8] tile of _fake_quantize_fwd_cols_kernel; MASKED False: a full tile."""
    if MASKED:
        m = rmask[:, None, None] & cmask[None, :, :]
        x = to_f32(tl.load(x_ptr + offs, mask=m, other=0.0), SOFT_BF16)
    else:
        x = to_f32(tl.load(x_ptr + offs), SOFT_BF16)
    out, below, above = _quantize(x, inv, scale, zp, qmin, qmax)
    out = from_f32(out, out_ptr.dtype.element_ty, SOFT_BF16)
    if MASKED:
        tl.store(out_ptr + offs, out, mask=m)
    else:
        tl.store(out_ptr + offs, out)
    if WITH_MASK:
        keep = (below | above) == 0
        if MASKED:
            keep = keep & m
        byte = pack_bits(keep, 8, 2).to(tl.uint8)
        if MASKED:
            tl.store(mask_ptr + byte_offs, byte, mask=rmask[:, None] & bmask[None, :])
        else:
            tl.store(mask_ptr + byte_offs, byte)


@triton.jit
def _fake_quantize_fwd_cols_kernel(
    x_ptr,
    out_ptr,
    mask_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    outer,
    L,
    ncb,
    n,
    mask_nbytes,
    qmin,
    qmax,
    WITH_MASK: tl.constexpr,
    RO: tl.constexpr,
    BL: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Per-channel fake-quantization forward for channels-last data (inner == 1), on column tiles.

    x viewed as an [outer, L = C] matrix, column l in channel l (L < 2**31). Program pid covers
    rows [rb * RO, +RO) x columns [lb * BL, +BL) (lb = pid % ncb, rb = pid // ncb) as an
    [RO, BL // 8, 8] tile: the channel parameters are contiguous vector loads per column, with
    no per-element index math or gather. Math and rounding as _fake_quantize_fwd_kernel (fp32,
    bit for bit the reference). Packed mask (WITH_MASK, which needs L % 8 == 0 so that every
    tile row starts on a byte): the innermost 8 elements of the tile are one byte; program 0 also
    zeroes the padding bytes [n / 8, mask_nbytes). int64 row offsets.
    """
    pid = tl.program_id(0)
    rb = pid // ncb
    lb = pid % ncb
    r = rb.to(tl.int64) * RO + tl.arange(0, RO)
    col0 = lb * BL
    grp = tl.arange(0, BL // 8)
    cl = col0 + grp[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BL // 8, 8] int32 columns
    cmask = cl < L
    inv = tl.load(inv_ptr + cl, mask=cmask, other=0.0)[None, :, :]
    scale = tl.load(scale_ptr + cl, mask=cmask, other=0.0)[None, :, :]
    zp = tl.load(zp_ptr + cl, mask=cmask, other=0.0)[None, :, :]
    rmask = r < outer
    bmask = grp * 8 < L - col0
    offs = (r * L)[:, None, None] + cl[None, :, :]
    byte_offs = ((r * L + col0) // 8)[:, None] + grp[None, :]
    if (rb.to(tl.int64) * RO + RO <= outer) & (col0 + BL <= L):
        _fwd_cols_tile(
            x_ptr,
            out_ptr,
            mask_ptr,
            offs,
            byte_offs,
            inv,
            scale,
            zp,
            rmask,
            cmask,
            bmask,
            qmin,
            qmax,
            WITH_MASK,
            False,
            SOFT_BF16,
        )
    else:
        _fwd_cols_tile(
            x_ptr,
            out_ptr,
            mask_ptr,
            offs,
            byte_offs,
            inv,
            scale,
            zp,
            rmask,
            cmask,
            bmask,
            qmin,
            qmax,
            WITH_MASK,
            True,
            SOFT_BF16,
        )
    if WITH_MASK:
        if pid == 0:
            pad = n // 8 + tl.arange(0, 4)
            tl.store(mask_ptr + pad, tl.zeros([4], dtype=tl.uint8), mask=pad < mask_nbytes)


# ---------------------------------------------------------------------------------------------
# straight-through backward


@triton.jit
def _fake_quantize_bwd_kernel(g_ptr, mask_ptr, gx_ptr, n, BLOCK: tl.constexpr):
    """Straight-through backward: gx[i] = g[i] where bit i of the packed mask is set, else 0.

    Flat blocks of BLOCK elements as [BLOCK // 8, 8] tiles: one mask byte is read per 8 elements
    and expanded by shifts. g / gx contiguous, x's dtype, copied without arithmetic (a NaN or -0.0
    gradient passes unchanged). int64 block offsets.
    """
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if start + BLOCK <= n:
        select_tile(g_ptr, gx_ptr, mask_ptr, start, n, 8, False, BLOCK)
    else:
        select_tile(g_ptr, gx_ptr, mask_ptr, start, n, 8, True, BLOCK)


# ---------------------------------------------------------------------------------------------
# learnable (LSQ) backward


@triton.jit
def _lsq_flat_tile(
    g_ptr,
    x_ptr,
    gx_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    part_ptr,
    start,
    pid,
    n,
    n_prog,
    qmin,
    qmax,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    j = tl.arange(0, BLOCK)
    if MASKED:
        inb = j < n - start
        g_raw = tl.load(g_ptr + start + j, mask=inb, other=0.0)
        x = to_f32(tl.load(x_ptr + start + j, mask=inb, other=0.0), SOFT_BF16)
    else:
        g_raw = tl.load(g_ptr + start + j)
        x = to_f32(tl.load(x_ptr + start + j), SOFT_BF16)
    clamped, d_scale, d_zero = _lsq_terms(
        x, to_f32(g_raw, SOFT_BF16), tl.load(inv_ptr), tl.load(scale_ptr), tl.load(zp_ptr), qmin, qmax
    )
    # grad_x selects the loaded gradient itself: no fp32 round trip.
    gx = tl.where(clamped, tl.zeros_like(g_raw), g_raw)
    if MASKED:
        tl.store(gx_ptr + start + j, gx, mask=inb)
    else:
        tl.store(gx_ptr + start + j, gx)
    # fp64 sums: fp32 ones lose ~1e-7 of the sum of magnitudes and the LSQ terms cancel heavily
    # (the sum can be 100x smaller than that). Cost: two fp32 -> fp64 conversions per element.
    tl.store(part_ptr + pid, tl.sum(d_scale.to(tl.float64), axis=0))
    tl.store(part_ptr + n_prog + pid, tl.sum(d_zero.to(tl.float64), axis=0))


@triton.jit
def _fake_quantize_bwd_learnable_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    part_ptr,
    n,
    n_prog,
    qmin,
    qmax,
    BLOCK: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Per-tensor LSQ backward over flat blocks of BLOCK elements (1D grid of n_prog programs).

    gx = g where x is not clamped, else 0 (x's dtype). Per element, fp32 (see _lsq_terms):
    d_scale, d_zero_point; each program sums its block in fp64 (tl.sum tree over the fp32 terms)
    and writes part[0, pid], part[1, pid] (fp64 [2, n_prog]); the launcher sums the partials.
    Out-of-range lanes load g = x = 0 and contribute exact zeros. int64 block offsets.
    """
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * BLOCK
    if start + BLOCK <= n:
        _lsq_flat_tile(
            g_ptr,
            x_ptr,
            gx_ptr,
            inv_ptr,
            scale_ptr,
            zp_ptr,
            part_ptr,
            start,
            pid,
            n,
            n_prog,
            qmin,
            qmax,
            False,
            BLOCK,
            SOFT_BF16,
        )
    else:
        _lsq_flat_tile(
            g_ptr,
            x_ptr,
            gx_ptr,
            inv_ptr,
            scale_ptr,
            zp_ptr,
            part_ptr,
            start,
            pid,
            n,
            n_prog,
            qmin,
            qmax,
            True,
            BLOCK,
            SOFT_BF16,
        )


@triton.jit
def _fake_quantize_bwd_learnable_rows_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    part_ptr,
    R,
    inner,
    C,
    ncb,
    part_stride,
    qmin,
    qmax,
    ROWS: tl.constexpr,
    BI: tl.constexpr,
    MASKED: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Per-channel LSQ backward on row tiles: x viewed as a [R = outer * C, inner] matrix, row r
    in channel r % C. Program pid covers rows [rb * ROWS, +ROWS) x columns [kb * BI, +BI) with
    rb = pid // ncb, kb = pid % ncb (ncb = cdiv(inner, BI)); the channel parameters are loaded once
    per row. Per element fp32 terms as _lsq_terms; each row's tile segment is summed in fp64 and
    written to part[0 | 1, r, kb] (fp64, part_stride = R * ncb); the launcher sums them per
    channel. gx = g where not clamped, else 0. MASKED False: R % ROWS == inner % BI == 0.
    """
    pid = tl.program_id(0)
    rb = pid // ncb
    kb = pid % ncb
    r = rb.to(tl.int64) * ROWS + tl.arange(0, ROWS)
    col0 = kb.to(tl.int64) * BI
    k = tl.arange(0, BI)
    offs = (r * inner + col0)[:, None] + k[None, :]
    # Channel of each row, in range even for rows past R (no load mask needed); int32 remainders
    # (C + ROWS < 2**31) are several times cheaper than int64 ones.
    c = ((rb.to(tl.int64) * ROWS) % C).to(tl.int32)
    c = (c + tl.arange(0, ROWS)) % C
    inv = tl.load(inv_ptr + c)[:, None]
    scale = tl.load(scale_ptr + c)[:, None]
    zp = tl.load(zp_ptr + c)[:, None]
    if MASKED:
        m = (r < R)[:, None] & (k < inner - col0)[None, :]
        g_raw = tl.load(g_ptr + offs, mask=m, other=0.0)
        x = to_f32(tl.load(x_ptr + offs, mask=m, other=0.0), SOFT_BF16)
    else:
        g_raw = tl.load(g_ptr + offs)
        x = to_f32(tl.load(x_ptr + offs), SOFT_BF16)
    clamped, d_scale, d_zero = _lsq_terms(x, to_f32(g_raw, SOFT_BF16), inv, scale, zp, qmin, qmax)
    gx = tl.where(clamped, tl.zeros_like(g_raw), g_raw)
    p = part_ptr + r * ncb + kb
    if MASKED:
        tl.store(gx_ptr + offs, gx, mask=m)
        tl.store(p, tl.sum(d_scale.to(tl.float64), axis=1), mask=r < R)
        tl.store(p + part_stride, tl.sum(d_zero.to(tl.float64), axis=1), mask=r < R)
    else:
        tl.store(gx_ptr + offs, gx)
        tl.store(p, tl.sum(d_scale.to(tl.float64), axis=1))
        tl.store(p + part_stride, tl.sum(d_zero.to(tl.float64), axis=1))


@triton.jit
def _fake_quantize_bwd_learnable_cols_kernel(
    g_ptr,
    x_ptr,
    gx_ptr,
    inv_ptr,
    scale_ptr,
    zp_ptr,
    part_ptr,
    outer,
    L,
    inner,
    ncb,
    iters,
    part_stride,
    qmin,
    qmax,
    RO: tl.constexpr,
    BL: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    """Per-channel LSQ backward on column tiles: x viewed as an [outer, L = C * inner] matrix,
    column l in channel l // inner. Program pid covers columns [lb * BL, +BL) (lb = pid % ncb) and
    `iters` consecutive tiles of RO rows starting at row (pid // ncb) * iters * RO; the channel
    parameters are loaded once per column. Per element fp32 terms as _lsq_terms; column sums
    accumulate in fp64 registers over the row tiles and are written to part[0 | 1, ob, l] (fp64,
    part_stride = nob * L); the launcher sums them per channel. gx = g where not clamped.
    """
    pid = tl.program_id(0)
    ob = pid // ncb
    lb = pid % ncb
    col0 = lb.to(tl.int64) * BL
    cols = col0 + tl.arange(0, BL)
    cmask = cols < L
    # Channel per column: one scalar int64 division, then int32 ones (inner + BL < 2**31).
    c0 = col0 // inner
    c = c0 + ((col0 - c0 * inner).to(tl.int32) + tl.arange(0, BL)) // inner
    inv = tl.load(inv_ptr + c, mask=cmask, other=0.0)[None, :]
    scale = tl.load(scale_ptr + c, mask=cmask, other=0.0)[None, :]
    zp = tl.load(zp_ptr + c, mask=cmask, other=0.0)[None, :]
    acc_s = tl.zeros([BL], dtype=tl.float64)
    acc_z = tl.zeros([BL], dtype=tl.float64)
    row0 = ob.to(tl.int64) * iters * RO
    for it in range(iters):
        r = row0 + it * RO + tl.arange(0, RO)
        offs = (r * L)[:, None] + cols[None, :]
        m = (r < outer)[:, None] & cmask[None, :]
        g_raw = tl.load(g_ptr + offs, mask=m, other=0.0)
        x = to_f32(tl.load(x_ptr + offs, mask=m, other=0.0), SOFT_BF16)
        clamped, d_scale, d_zero = _lsq_terms(x, to_f32(g_raw, SOFT_BF16), inv, scale, zp, qmin, qmax)
        tl.store(gx_ptr + offs, tl.where(clamped, tl.zeros_like(g_raw), g_raw), mask=m)
        acc_s += tl.sum(d_scale.to(tl.float64), axis=0)
        acc_z += tl.sum(d_zero.to(tl.float64), axis=0)
    p = part_ptr + ob * L + cols
    tl.store(p, acc_s, mask=cmask)
    tl.store(p + part_stride, acc_z, mask=cmask)


# ---------------------------------------------------------------------------------------------
# launchers

# enable_fp_fusion=False (ignored by the interpreter, which never fuses) keeps every product
# rounded on its own, as in the reference: the forward does not depend on it (see _quantize; with
# fusion on, the only FMA ptxas forms there is the exact f * 0.5 + M), but LSQ's g * (out - x)
# would otherwise contract (qc - zp) * scale - x into an FMA and drift from the reference's terms.
_OPTS = {"enable_fp_fusion": False}


def _check_args(fn: str, x, inv_scale, scale, zero_point, inner) -> None:
    """What the kernels need to stay in bounds (O(1), as the C++ kernels check it): x contiguous
    fp32 / fp16 / bf16, the three parameters contiguous fp32 [C] on x's device, x viewed as
    [outer, C, inner]."""
    check_float(fn, "x", x)
    C = inv_scale.numel()
    for name, t in (("inv_scale", inv_scale), ("scale", scale), ("zero_point", zero_point)):
        check_vector(fn, name, t, C, x.device)
    n = x.numel()
    if C < 1 or inner < 1 or (n != 0 and (inner > n // C or n % (C * inner) != 0)):
        raise ValueError(f"{fn}: x of {n} elements cannot be viewed as [outer, C = {C}, inner = {inner}]")


def fake_quantize_fwd(x, inv_scale, scale, zero_point, qmin, qmax, inner, with_mask):
    """(out like x, packed uint8 keep-mask of ceil(n / 32) * 4 bytes, or an empty uint8 tensor)."""
    _check_args("fake_quantize_fwd (triton)", x, inv_scale, scale, zero_point, inner)
    n = x.numel()
    out = torch.empty_like(x)
    mask = torch.empty(packed_mask_bytes(n) if with_mask else 0, dtype=torch.uint8, device=x.device)
    if n == 0:
        return out, mask
    C = inv_scale.numel()
    block = FWD_BLOCK
    L = C * inner
    outer = n // L
    if C > 1 and inner == 1 and outer >= _FWD_COLS_MIN_ROWS and L < 2**31 - block and (L % 8 == 0 or not with_mask):
        # Channels-last: column tiles, parameters loaded as vectors, no per-element index math. (For
        # 1 < inner < B the channel of a column needs a division or a gather per element anyway,
        # and the flat gather path below does that more cheaply.)
        bl = max(8, min(triton.next_power_of_2(L), _FWD_COLS, block))  # >= 8: one mask byte per tile row
        ro = min(block // bl, triton.next_power_of_2(outer))
        bl = max(bl, min(triton.next_power_of_2(L), block // ro))  # few rows: widen the tile instead
        ncb = triton.cdiv(L, bl)
        _fake_quantize_fwd_cols_kernel[(triton.cdiv(outer, ro) * ncb,)](
            x,
            out,
            mask if with_mask else out,
            inv_scale,
            scale,
            zero_point,
            outer,
            L,
            ncb,
            n,
            mask.numel(),
            float(qmin),
            float(qmax),
            WITH_MASK=bool(with_mask),
            RO=ro,
            BL=bl,
            SOFT_BF16=soft_bf16(),
            num_warps=FWD_WARPS,
            **_OPTS,
        )
        return out, mask
    if C == 1:
        mode = 0
    elif inner < block:
        mode = 1  # needs block <= 2**(_DIV_BITS - 1): (rem + j) < inner + block <= 2**_DIV_BITS
    else:
        mode = 2
    div_in = _magic(inner) if mode == 1 else (0, 0)
    div_c = _magic(C) if mode == 1 else (0, 0)
    grid = (triton.cdiv(n, block),)
    assert mode != 1 or block <= 1 << (_DIV_BITS - 1)
    _fake_quantize_fwd_kernel[grid](
        x,
        out,
        mask if with_mask else out,
        inv_scale,
        scale,
        zero_point,
        n,
        mask.numel(),
        inner,
        C,
        div_in[0],
        div_in[1],
        div_c[0],
        div_c[1],
        float(qmin),
        float(qmax),
        MODE=mode,
        WITH_MASK=bool(with_mask),
        BLOCK=block,
        I64=n + block >= 2**31,
        SOFT_BF16=soft_bf16(),
        num_warps=FWD_WARPS,
        **_OPTS,
    )
    return out, mask


def fake_quantize_bwd(grad, mask):
    """grad where the packed mask bit is set, else 0 (grad's dtype and shape)."""
    fn = "fake_quantize_bwd (triton)"
    check_float(fn, "grad", grad)
    n = grad.numel()
    check_packed(fn, mask, n, grad.device)
    grad_x = torch.empty_like(grad)
    if n == 0:
        return grad_x
    block = BWD_BLOCK
    _fake_quantize_bwd_kernel[(triton.cdiv(n, block),)](
        grad, mask, grad_x, n, BLOCK=block, num_warps=BWD_WARPS, **_OPTS
    )
    return grad_x


def _learnable_plan(outer: int, C: int, inner: int, kind: str | None = None) -> dict:
    """Per-channel LSQ tiling: row tiles or column tiles, whichever needs the smaller partial buffer
    (`kind` forces one, for tests)."""
    block = LRN_BLOCK
    R = outer * C
    bi = min(triton.next_power_of_2(inner), block)
    rows = min(block // bi, triton.next_power_of_2(R))
    ncb_r = triton.cdiv(inner, bi)
    plan_rows = dict(kind="rows", ROWS=rows, BI=bi, ncb=ncb_r, nprog=triton.cdiv(R, rows) * ncb_r, buf=R * ncb_r)

    L = C * inner
    bl = min(triton.next_power_of_2(L), _LRN_COLS, block)
    ro = min(block // bl, triton.next_power_of_2(outer))
    bl = min(triton.next_power_of_2(L), block // ro)  # few rows: widen the tile instead
    ncb_c = triton.cdiv(L, bl)
    tiles = triton.cdiv(outer, ro)
    iters = max(1, min(_LRN_MAX_ITERS, tiles * ncb_c // _LRN_TARGET_PROGRAMS))
    nob = triton.cdiv(tiles, iters)
    plan_cols = dict(kind="cols", RO=ro, BL=bl, ncb=ncb_c, iters=iters, nob=nob, nprog=nob * ncb_c, buf=nob * L)
    if kind is not None:
        return plan_rows if kind == "rows" else plan_cols
    if inner >= 2**30:  # the column kernel's int32 channel arithmetic
        return plan_rows
    return plan_rows if plan_rows["buf"] <= plan_cols["buf"] else plan_cols


def fake_quantize_bwd_learnable(grad, x, inv_scale, scale, zero_point, qmin, qmax, inner, grad_factor):
    """(grad_x like x, d_scale fp32 [C], d_zero_point fp32 [C]); the sums are multiplied by grad_factor."""
    fn = "fake_quantize_bwd_learnable (triton)"
    _check_args(fn, x, inv_scale, scale, zero_point, inner)
    check_like(fn, "grad", grad, x, "x")
    n = x.numel()
    C = inv_scale.numel()
    grad_x = torch.empty_like(x)
    if n == 0:
        z = torch.zeros(C, dtype=torch.float32, device=x.device)
        return grad_x, z, z.clone()
    qmin_f, qmax_f = float(qmin), float(qmax)
    if C == 1:
        block = LRN_BLOCK
        nprog = triton.cdiv(n, block)
        part = torch.empty((2, nprog), dtype=torch.float64, device=x.device)
        _fake_quantize_bwd_learnable_kernel[(nprog,)](
            grad,
            x,
            grad_x,
            inv_scale,
            scale,
            zero_point,
            part,
            n,
            nprog,
            qmin_f,
            qmax_f,
            BLOCK=block,
            SOFT_BF16=soft_bf16(),
            num_warps=LRN_WARPS,
            **_OPTS,
        )
        sums = part.sum(dim=1, dtype=torch.float64).view(2, 1)
    else:
        outer = n // (C * inner)
        plan = _learnable_plan(outer, C, inner)
        if plan["kind"] == "rows":
            R, ncb = outer * C, plan["ncb"]
            part = torch.empty((2, R * ncb), dtype=torch.float64, device=x.device)
            masked = R % plan["ROWS"] != 0 or inner % plan["BI"] != 0
            _fake_quantize_bwd_learnable_rows_kernel[(plan["nprog"],)](
                grad,
                x,
                grad_x,
                inv_scale,
                scale,
                zero_point,
                part,
                R,
                inner,
                C,
                ncb,
                R * ncb,
                qmin_f,
                qmax_f,
                ROWS=plan["ROWS"],
                BI=plan["BI"],
                MASKED=masked,
                SOFT_BF16=soft_bf16(),
                num_warps=LRN_WARPS,
                **_OPTS,
            )
            sums = part.view(2, outer, C, ncb).sum(dim=(1, 3), dtype=torch.float64)
        else:
            L, nob = C * inner, plan["nob"]
            part = torch.empty((2, nob * L), dtype=torch.float64, device=x.device)
            _fake_quantize_bwd_learnable_cols_kernel[(plan["nprog"],)](
                grad,
                x,
                grad_x,
                inv_scale,
                scale,
                zero_point,
                part,
                outer,
                L,
                inner,
                plan["ncb"],
                plan["iters"],
                nob * L,
                qmin_f,
                qmax_f,
                RO=plan["RO"],
                BL=plan["BL"],
                SOFT_BF16=soft_bf16(),
                num_warps=LRN_WARPS,
                **_OPTS,
            )
            sums = part.view(2, nob, C, inner).sum(dim=(1, 3), dtype=torch.float64)
    # As the reference: fp32 sums, then times grad_factor in fp32; two separate (non-aliasing) outputs.
    sums = sums.to(torch.float32)
    return grad_x, sums[0] * grad_factor, sums[1] * grad_factor
