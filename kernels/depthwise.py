"""Triton kernels of the depthwise convolution: forward with a fused per-channel affine + activation
epilogue, input gradient, weight (and bias) gradient.

The contract, shared by every backend, is ``pycompress/ops/depthwise_ref.py`` (``depthwise_fwd_ref``,
``depthwise_bwd_input_ref``, ``depthwise_bwd_weight_ref``): x [N, C, H, W] fp32 / fp16 / bf16,
contiguous in NCHW or in channels_last memory (the outputs keep that format), weight [C, 1, kh, kw]
in x's dtype, fp32 scale / shift [C] or empty tensors (1 / 0), zero padding, any stride / padding /
dilation (the op layer allows strides 1 and 2), act 0 none / 1 relu / 2 relu6.

Every kernel exists twice, one per memory format (the format is that of x in the forward and in the
weight gradient, that of grad_out in the input gradient, decided exactly as the reference does: a
tensor contiguous in both formats, i.e. C == 1 or H * W == 1, counts as NCHW, and its memory reads
the same either way):
    NCHW            a program owns a [BH, BW] tile of one (n, c) plane: rows x columns, columns
                    contiguous; the weight taps are scalars.
    channels_last   a program owns a [BH, BW, BC] tile of one image: rows x columns x channels,
                    channels contiguous (coalesced, vectorisable loads); the taps are [BC] vectors.
The kh x kw taps are unrolled (static_range); each tap is one masked load of the shifted input tile
(zero padding = masked lanes; neighbouring taps hit L1), so no load ever leaves the image.

Arithmetic: loads are upcast to fp32 at once, products are accumulated in fp32 with explicit FMAs
(tl.fma), the epilogue rounds z * scale and + shift separately (enable_fp_fusion=False, as the
reference), and the result is cast once to the output dtype (round to nearest even). The
summation order differs from the reference's (per-dtype tolerances). ReLU / ReLU6 are selects that
keep a NaN (as torch.relu / clamp do). Under the interpreter (TRITON_INTERPRET=1, CPU tensors) bf16
is converted by hand (see kernels/_common.py: to_f32 / from_f32).

Tile shapes come from an autotuned (TILE elements per program, WCAP column cap, num_warps), shaped
to the problem by a heuristic (powers of two, capped by the output extent); one config under the
interpreter. The weight gradient is a deterministic two-stage reduction: each program writes its
partial sums to a buffer whose shape depends only on the problem, and torch sums the partials in a
fixed order (fp64) - no float atomics.

The launchers take the op layer's validated arguments; they check, in O(1), what keeps the kernels
in bounds (4-D tensors, weight [C, 1, kh, kw] and scale / shift of 0 or C elements on x's device,
grad_out matching x's batch and channels, dtypes) and raise TypeError / ValueError otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_dims, from_f32, interpreting, soft_bf16, to_f32

__all__ = ["depthwise_fwd", "depthwise_bwd_input", "depthwise_bwd_weight"]

_INTERPRET = interpreting()

# Tile caps (powers of two), on top of each config's WCAP: NCHW tiles take up to _MAX_BW columns,
# channels-last tiles up to _MAX_BC channels and _MAX_BW_CL columns, the rest of TILE in rows.
# Tests lower them to exercise multi-block grids on tiny shapes.
_MAX_BW = 64
_MAX_BC = 64
_MAX_BW_CL = 8
# Weight gradient: aim for this many programs (splitting the rows of the output between them); the
# partial-sum buffer is programs x (kh * kw + 1) floats.
_WGRAD_TARGET_PROGRAMS = 2048

# (TILE elements per program, WCAP column cap, num_warps) tried on a GPU (not yet timed: sweep on the
# H100); one config under the interpreter. 8 - 32 fp32 accumulators per thread. WCAP 8 gives
# 8-column tiles (whole 32-byte sectors, no idle lanes on a 56- or 28-wide plane), WCAP 64 one tile
# across a 56-wide plane.
_GPU_CONFIGS = ((1024, 64, 4), (2048, 64, 4), (2048, 64, 8), (4096, 64, 8), (1024, 8, 4), (2048, 8, 8))
_GPU_CONFIGS_CL = ((1024, 8, 4), (2048, 8, 4), (2048, 8, 8), (4096, 8, 8), (2048, 4, 4), (4096, 16, 8))
_GPU_CONFIGS_WGRAD = ((2048, 64, 4), (4096, 64, 8), (8192, 64, 8), (2048, 8, 4))
_GPU_CONFIGS_WGRAD_CL = ((2048, 8, 4), (4096, 8, 8), (8192, 8, 8))

# tl.fma accumulates; everything else is rounded on its own (the epilogue's z * scale + shift).
_OPTS = {"enable_fp_fusion": False}


def _configs(gpu):
    if _INTERPRET:  # one config: no benchmarking; TILE 1024 keeps tiny test shapes at one tile
        return [triton.Config({"TILE": 1024, "WCAP": gpu[0][1]}, num_warps=4)]
    return [triton.Config({"TILE": t, "WCAP": wc}, num_warps=w) for t, wc, w in gpu]


def _np2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# ---------------------------------------------------------------------------------------------
# tile heuristics (read the caps at call time)


def _bw_nchw(a):
    return min(_np2(a["WT"]), a["WCAP"], _MAX_BW, a["TILE"])


def _bh_nchw(a):
    return max(1, min(_np2(a["HT"]), a["TILE"] // a["BW"]))


def _bc_cl(a):
    return min(_np2(a["C"]), _MAX_BC, a["TILE"])


def _bw_cl(a):
    return max(1, min(_np2(a["WT"]), a["WCAP"], _MAX_BW_CL, a["TILE"] // a["BC"]))


def _bh_cl(a):
    return max(1, min(_np2(a["HT"]), a["TILE"] // (a["BC"] * a["BW"])))


_HEUR_NCHW = {"BW": _bw_nchw, "BH": _bh_nchw}
_HEUR_CL = {"BC": _bc_cl, "BW": _bw_cl, "BH": _bh_cl}


def _bw_wg_nchw(a):
    return max(1, min(_np2(a["WT"]), a["WCAP"], _MAX_BW, a["TILE"] // a["KKP"]))


def _bh_wg_nchw(a):
    return max(1, min(_np2(a["HT"]), a["TILE"] // (a["KKP"] * a["BW"])))


def _bc_wg_cl(a):
    return max(1, min(_np2(a["C"]), _MAX_BC, a["TILE"] // a["KKP"]))


def _bw_wg_cl(a):
    return max(1, min(_np2(a["WT"]), a["WCAP"], _MAX_BW_CL, a["TILE"] // (a["KKP"] * a["BC"])))


_HEUR_WG_NCHW = {"BW": _bw_wg_nchw, "BH": _bh_wg_nchw}
_HEUR_WG_CL = {"BC": _bc_wg_cl, "BW": _bw_wg_cl}

_KEY = ["HT", "WT", "C", "KH", "KW", "SH", "SW"]


# ---------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _epilogue(z, scale_ptr, shift_ptr, c, cmask, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, ACT: tl.constexpr):
    """act(z * scale[c] + shift[c]) in fp32, each step rounded on its own; c a scalar or a vector
    broadcastable against z. The selects keep NaN (z < 0 is false for NaN)."""
    if HAS_SCALE:
        z = z * tl.load(scale_ptr + c, mask=cmask, other=1.0).to(tl.float32)
    if HAS_SHIFT:
        z = z + tl.load(shift_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    return z


# ---------------------------------------------------------------------------------------------
# forward


@triton.autotune(configs=_configs(_GPU_CONFIGS), key=_KEY)
@triton.heuristics(_HEUR_NCHW)
@triton.jit
def _depthwise_fwd_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    C,
    H,
    W,
    HT,
    WT,
    ph,
    pw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Depthwise forward, NCHW: out[n, c, i, j] = act(z * scale[c] + shift[c]) with
    z = sum_{a, b} x[n, c, i*SH - ph + a*DH, j*SW - pw + b*DW] * w[c, 0, a, b] (outside = 0).

    Grid (N * C, cdiv(HT, BH) * cdiv(WT, BW)), HT x WT = Ho x Wo: program (nc, t) owns the [BH, BW]
    output tile t of plane nc; for each of the KH * KW unrolled taps it loads the shifted input tile
    (mask: inside the image) and the tap's scalar weight, upcasts both to fp32 and FMAs into an fp32
    accumulator. Plane offsets are int64, offsets inside a plane int32 (H * W < 2**31).
    """
    pid_nc = tl.program_id(0)
    pid_t = tl.program_id(1)
    nbw = tl.cdiv(WT, BW)
    oh = (pid_t // nbw) * BH + tl.arange(0, BH)
    ow = (pid_t % nbw) * BW + tl.arange(0, BW)
    c = pid_nc % C
    x_base = x_ptr + pid_nc.to(tl.int64) * H * W
    w_base = w_ptr + c * (KH * KW)
    ih0 = oh * SH - ph
    iw0 = ow * SW - pw
    acc = tl.zeros([BH, BW], dtype=tl.float32)
    for a in tl.static_range(KH):
        ih = ih0 + a * DH
        mh = (ih >= 0) & (ih < H)
        for b in tl.static_range(KW):
            iw = iw0 + b * DW
            m = mh[:, None] & ((iw >= 0) & (iw < W))[None, :]
            xv = to_f32(tl.load(x_base + ih[:, None] * W + iw[None, :], mask=m, other=0.0), SOFT_BF16)
            wv = to_f32(tl.load(w_base + (a * KW + b)), SOFT_BF16)
            acc = tl.fma(xv, tl.broadcast_to(wv, [BH, BW]), acc)
    y = _epilogue(acc, scale_ptr, shift_ptr, c, True, HAS_SCALE, HAS_SHIFT, ACT)
    out_base = out_ptr + pid_nc.to(tl.int64) * HT * WT
    om = (oh < HT)[:, None] & (ow < WT)[None, :]
    tl.store(out_base + oh[:, None] * WT + ow[None, :], from_f32(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=om)


@triton.autotune(configs=_configs(_GPU_CONFIGS_CL), key=_KEY)
@triton.heuristics(_HEUR_CL)
@triton.jit
def _depthwise_fwd_cl_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    shift_ptr,
    out_ptr,
    C,
    H,
    W,
    HT,
    WT,
    ph,
    pw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    ACT: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BC: tl.constexpr,
):
    """Depthwise forward, channels_last (element (n, c, h, w) at ((n*H + h)*W + w)*C + c); math as
    _depthwise_fwd_kernel.

    Grid (N * cdiv(HT, BH) * cdiv(WT, BW), cdiv(C, BC)): program (p, cb) owns a [BH, BW, BC] output
    tile of image n (rows x columns x channels); each tap is one masked load of the shifted
    [BH, BW, BC] input tile (contiguous along channels) times the tap's [BC] weight vector.
    Image offsets are int64, offsets inside an image int32 (H * W * C < 2**31).
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    nbw = tl.cdiv(WT, BW)
    nbh = tl.cdiv(HT, BH)
    wb = pid % nbw
    t = pid // nbw
    hb = t % nbh
    n = t // nbh
    oh = hb * BH + tl.arange(0, BH)
    ow = wb * BW + tl.arange(0, BW)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    x_base = x_ptr + n.to(tl.int64) * H * W * C
    ih0 = oh * SH - ph
    iw0 = ow * SW - pw
    acc = tl.zeros([BH, BW, BC], dtype=tl.float32)
    for a in tl.static_range(KH):
        ih = ih0 + a * DH
        mh = (ih >= 0) & (ih < H)
        for b in tl.static_range(KW):
            iw = iw0 + b * DW
            mp = mh[:, None] & ((iw >= 0) & (iw < W))[None, :]
            offs = ((ih[:, None] * W + iw[None, :]) * C)[:, :, None] + c[None, None, :]
            xv = to_f32(tl.load(x_base + offs, mask=mp[:, :, None] & cm[None, None, :], other=0.0), SOFT_BF16)
            wv = to_f32(tl.load(w_ptr + c * (KH * KW) + (a * KW + b), mask=cm, other=0.0), SOFT_BF16)
            acc = tl.fma(xv, tl.broadcast_to(wv[None, None, :], [BH, BW, BC]), acc)
    y = _epilogue(acc, scale_ptr, shift_ptr, c[None, None, :], cm[None, None, :], HAS_SCALE, HAS_SHIFT, ACT)
    out_base = out_ptr + n.to(tl.int64) * HT * WT * C
    om = ((oh < HT)[:, None] & (ow < WT)[None, :])[:, :, None] & cm[None, None, :]
    offs = ((oh[:, None] * WT + ow[None, :]) * C)[:, :, None] + c[None, None, :]
    tl.store(out_base + offs, from_f32(y, out_ptr.dtype.element_ty, SOFT_BF16), mask=om)


# ---------------------------------------------------------------------------------------------
# input gradient (gather: every grad_x element is written once, by one program, no atomics)


@triton.autotune(configs=_configs(_GPU_CONFIGS), key=_KEY)
@triton.heuristics(_HEUR_NCHW)
@triton.jit
def _depthwise_bwd_input_kernel(
    g_ptr,
    w_ptr,
    gx_ptr,
    C,
    H,
    W,
    HT,
    WT,
    Ho,
    Wo,
    ph,
    pw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Depthwise input gradient, NCHW, gather form:
        gx[n, c, h, w] = sum_{a, b} g[n, c, i, j] * w[c, 0, a, b]
    over the taps with h + ph - a*DH = i*SH and w + pw - b*DW = j*SW, 0 <= i < Ho, 0 <= j < Wo.

    Rows are split by parity (SH == 2): program (nc, t) owns rows h = r*SH + par for a [BH] block
    of r (HT = cdiv(H, SH) rows per parity) and a [BW] block of columns (WT = W). For a row parity
    a tap row either never or always divides, a scalar test: the skipped half of the taps costs
    nothing. Along columns (SW == 2) the parity is a per-lane mask. fp32 FMA accumulation, stored
    once in g's dtype. SH, SW in (1, 2).
    """
    pid_nc = tl.program_id(0)
    pid_t = tl.program_id(1)
    nbw = tl.cdiv(W, BW)
    t = pid_t // nbw
    par = t % SH
    r = (t // SH) * BH + tl.arange(0, BH)
    h = r * SH + par
    w = (pid_t % nbw) * BW + tl.arange(0, BW)
    c = pid_nc % C
    g_base = g_ptr + pid_nc.to(tl.int64) * Ho * Wo
    w_base = w_ptr + c * (KH * KW)
    acc = tl.zeros([BH, BW], dtype=tl.float32)
    for a in tl.static_range(KH):
        # h + ph - a*DH = r*SH + e: the tap row is read from output row i = r + e / SH when SH | e
        # (e even for SH == 2, a bit test that is right for negative e too; e // SH is then exact).
        e = par + ph - a * DH
        if (e & (SH - 1)) == 0:
            i = r + e // SH
            mi = (i >= 0) & (i < Ho)
            for b in tl.static_range(KW):
                tw = w + (pw - b * DW)
                if SW == 1:
                    j = tw
                    mj = (j >= 0) & (j < Wo)
                else:
                    j = tw >> 1
                    mj = ((tw & 1) == 0) & (tw >= 0) & (j < Wo)
                m = mi[:, None] & mj[None, :]
                gv = to_f32(tl.load(g_base + i[:, None] * Wo + j[None, :], mask=m, other=0.0), SOFT_BF16)
                wv = to_f32(tl.load(w_base + (a * KW + b)), SOFT_BF16)
                acc = tl.fma(gv, tl.broadcast_to(wv, [BH, BW]), acc)
    gx_base = gx_ptr + pid_nc.to(tl.int64) * H * W
    om = (h < H)[:, None] & (w < W)[None, :]
    tl.store(gx_base + h[:, None] * W + w[None, :], from_f32(acc, gx_ptr.dtype.element_ty, SOFT_BF16), mask=om)


@triton.autotune(configs=_configs(_GPU_CONFIGS_CL), key=_KEY)
@triton.heuristics(_HEUR_CL)
@triton.jit
def _depthwise_bwd_input_cl_kernel(
    g_ptr,
    w_ptr,
    gx_ptr,
    C,
    H,
    W,
    HT,
    WT,
    Ho,
    Wo,
    ph,
    pw,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
    BC: tl.constexpr,
):
    """Depthwise input gradient, channels_last; math and row-parity split as
    _depthwise_bwd_input_kernel, tiles [BH rows of one parity, BW columns, BC channels] of image n.

    Grid (N * SH * cdiv(HT, BH) * cdiv(W, BW), cdiv(C, BC)), HT = cdiv(H, SH).
    """
    pid = tl.program_id(0)
    pid_c = tl.program_id(1)
    nbw = tl.cdiv(W, BW)
    nbh = tl.cdiv(HT, BH)
    wb = pid % nbw
    t = pid // nbw
    par = t % SH
    t = t // SH
    hb = t % nbh
    n = t // nbh
    r = hb * BH + tl.arange(0, BH)
    h = r * SH + par
    w = wb * BW + tl.arange(0, BW)
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    g_base = g_ptr + n.to(tl.int64) * Ho * Wo * C
    acc = tl.zeros([BH, BW, BC], dtype=tl.float32)
    for a in tl.static_range(KH):
        e = par + ph - a * DH
        if (e & (SH - 1)) == 0:
            i = r + e // SH
            mi = (i >= 0) & (i < Ho)
            for b in tl.static_range(KW):
                tw = w + (pw - b * DW)
                if SW == 1:
                    j = tw
                    mj = (j >= 0) & (j < Wo)
                else:
                    j = tw >> 1
                    mj = ((tw & 1) == 0) & (tw >= 0) & (j < Wo)
                mp = mi[:, None] & mj[None, :]
                offs = ((i[:, None] * Wo + j[None, :]) * C)[:, :, None] + c[None, None, :]
                gv = to_f32(tl.load(g_base + offs, mask=mp[:, :, None] & cm[None, None, :], other=0.0), SOFT_BF16)
                wv = to_f32(tl.load(w_ptr + c * (KH * KW) + (a * KW + b), mask=cm, other=0.0), SOFT_BF16)
                acc = tl.fma(gv, tl.broadcast_to(wv[None, None, :], [BH, BW, BC]), acc)
    gx_base = gx_ptr + n.to(tl.int64) * H * W * C
    om = ((h < H)[:, None] & (w < W)[None, :])[:, :, None] & cm[None, None, :]
    offs = ((h[:, None] * W + w[None, :]) * C)[:, :, None] + c[None, None, :]
    tl.store(gx_base + offs, from_f32(acc, gx_ptr.dtype.element_ty, SOFT_BF16), mask=om)


# ---------------------------------------------------------------------------------------------
# weight gradient (two-stage: per-program partials, summed by the launcher)


@triton.autotune(configs=_configs(_GPU_CONFIGS_WGRAD), key=_KEY)
@triton.heuristics(_HEUR_WG_NCHW)
@triton.jit
def _depthwise_bwd_weight_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    C,
    H,
    W,
    HT,
    WT,
    Ho,
    Wo,
    ph,
    pw,
    S,
    RPS,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KKP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BH: tl.constexpr,
    BW: tl.constexpr,
):
    """Depthwise weight (and bias) gradient partials, NCHW:
        part[nc, s, a*KW + b] = sum_{i in rows(s), j} g[n, c, i, j] * x[n, c, i*SH - ph + a*DH, j*SW - pw + b*DW]
        part[nc, s, KH*KW]    = sum_{i in rows(s), j} g[n, c, i, j]                     (HAS_BIAS)
    (fp32, part [N*C, S, KH*KW + 1]; taps outside the image count as 0).

    Grid (N * C, S): program (nc, s) loops over output rows [s*RPS, min((s+1)*RPS, Ho)) in [BH, BW]
    tiles. The taps are a tensor dimension: a [KKP, BH, BW] gather of x (KKP = next power of two
    >= KH*KW, padding taps masked) times the broadcast g tile, FMA'd into one fp32 accumulator and
    reduced over (rows, columns) once at the end. A lane whose g is outside the chunk reads no x
    (an inf there must not meet a 0). The partials' shape depends on the problem only (S, RPS come
    from the launcher), not on the tile, so the result is the same whatever config runs.
    """
    pid_nc = tl.program_id(0)
    s = tl.program_id(1)
    r0 = s * RPS
    r1 = tl.minimum(r0 + RPS, Ho)
    k = tl.arange(0, KKP)
    km = k < KH * KW
    kh_off = (k // KW) * DH
    kw_off = (k % KW) * DW
    g_base = g_ptr + pid_nc.to(tl.int64) * Ho * Wo
    x_base = x_ptr + pid_nc.to(tl.int64) * H * W
    acc = tl.zeros([KKP, BH, BW], dtype=tl.float32)
    accb = tl.zeros([BH, BW], dtype=tl.float32)
    for row0 in range(r0, r1, BH):
        oh = row0 + tl.arange(0, BH)
        mh = oh < r1
        ih = (oh * SH - ph)[None, :] + kh_off[:, None]  # [KKP, BH]
        mih = (ih >= 0) & (ih < H) & mh[None, :] & km[:, None]
        for col0 in range(0, Wo, BW):
            ow = col0 + tl.arange(0, BW)
            mw = ow < Wo
            gv = to_f32(
                tl.load(g_base + oh[:, None] * Wo + ow[None, :], mask=mh[:, None] & mw[None, :], other=0.0), SOFT_BF16
            )
            iw = (ow * SW - pw)[None, :] + kw_off[:, None]  # [KKP, BW]
            miw = (iw >= 0) & (iw < W) & mw[None, :]
            m = mih[:, :, None] & miw[:, None, :]
            xv = to_f32(tl.load(x_base + (ih * W)[:, :, None] + iw[:, None, :], mask=m, other=0.0), SOFT_BF16)
            acc = tl.fma(xv, tl.broadcast_to(gv[None, :, :], [KKP, BH, BW]), acc)
            if HAS_BIAS:
                accb += gv
    p = part_ptr + (pid_nc.to(tl.int64) * S + s) * (KH * KW + 1)
    tl.store(p + k, tl.sum(tl.sum(acc, axis=2), axis=1), mask=km)
    if HAS_BIAS:
        tl.store(p + KH * KW, tl.sum(tl.sum(accb, axis=1), axis=0))


@triton.autotune(configs=_configs(_GPU_CONFIGS_WGRAD_CL), key=_KEY)
@triton.heuristics(_HEUR_WG_CL)
@triton.jit
def _depthwise_bwd_weight_cl_kernel(
    g_ptr,
    x_ptr,
    part_ptr,
    C,
    H,
    W,
    HT,
    WT,
    Ho,
    Wo,
    ph,
    pw,
    S,
    RPS,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    KKP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    TILE: tl.constexpr,
    WCAP: tl.constexpr,
    BW: tl.constexpr,
    BC: tl.constexpr,
):
    """Depthwise weight (and bias) gradient partials, channels_last; math as
    _depthwise_bwd_weight_kernel, partials part[s, k, c] (fp32 [S, KH*KW + 1, C]).

    Grid (cdiv(C, BC), S): program (cb, s) loops over the output rows q = n*Ho + i in
    [s*RPS, min((s+1)*RPS, N*Ho)) (one scalar division per row), each in [BW] column blocks, with a
    [KKP, BW, BC] gather of x (channels contiguous) times the broadcast [BW, BC] g tile.
    """
    pid_c = tl.program_id(0)
    s = tl.program_id(1)
    NR = HT  # N * Ho rows
    q0 = s * RPS
    q1 = tl.minimum(q0 + RPS, NR)
    k = tl.arange(0, KKP)
    km = k < KH * KW
    kh_off = (k // KW) * DH
    kw_off = (k % KW) * DW
    c = pid_c * BC + tl.arange(0, BC)
    cm = c < C
    acc = tl.zeros([KKP, BW, BC], dtype=tl.float32)
    accb = tl.zeros([BW, BC], dtype=tl.float32)
    for it in range(0, q1 - q0):
        q = q0 + it  # a tensor (under the interpreter too), for the int64 cast below
        n = q // Ho
        oh = q - n * Ho
        g_row = g_ptr + q.to(tl.int64) * Wo * C
        x_img = x_ptr + n.to(tl.int64) * H * W * C
        ih = oh * SH - ph + kh_off  # [KKP]
        mih = (ih >= 0) & (ih < H) & km
        for col0 in range(0, Wo, BW):
            ow = col0 + tl.arange(0, BW)
            mw = ow < Wo
            mg = mw[:, None] & cm[None, :]
            gv = to_f32(tl.load(g_row + (ow * C)[:, None] + c[None, :], mask=mg, other=0.0), SOFT_BF16)
            iw = (ow * SW - pw)[None, :] + kw_off[:, None]  # [KKP, BW]
            mp = mih[:, None] & (iw >= 0) & (iw < W) & mw[None, :]
            offs = ((ih[:, None] * W + iw) * C)[:, :, None] + c[None, None, :]
            xv = to_f32(tl.load(x_img + offs, mask=mp[:, :, None] & cm[None, None, :], other=0.0), SOFT_BF16)
            acc = tl.fma(xv, tl.broadcast_to(gv[None, :, :], [KKP, BW, BC]), acc)
            if HAS_BIAS:
                accb += gv
    p = part_ptr + s.to(tl.int64) * (KH * KW + 1) * C
    tl.store(p + k[:, None] * C + c[None, :], tl.sum(acc, axis=1), mask=km[:, None] & cm[None, :])
    if HAS_BIAS:
        tl.store(p + (KH * KW) * C + c, tl.sum(accb, axis=0), mask=cm)


# ---------------------------------------------------------------------------------------------
# launchers


def _is_cl(t: torch.Tensor) -> bool:
    """The reference's memory-format rule: channels_last only when not also NCHW-contiguous."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _normalise(t: torch.Tensor) -> torch.Tensor:
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _as_format(t: torch.Tensor, cl: bool) -> torch.Tensor:
    """t readable with the indexing of the chosen layout (a no-op for a tensor already in it, and
    for one contiguous in both formats)."""
    return t.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


def _check_i32(name: str, n: int) -> None:
    if n >= 2**31:
        raise ValueError(f"depthwise (triton): one {name} has {n} elements; offsets inside it are int32 (< 2**31)")


def _out_size(n: int, k: int, s: int, p: int, d: int) -> int:
    return (n + 2 * p - d * (k - 1) - 1) // s + 1


def _check_x_weight(fn: str, x: torch.Tensor, weight: torch.Tensor, name: str = "x") -> None:
    """x (or grad_out, `name`) 4-D fp32 / fp16 / bf16 [N, C, H, W] (any strides: the launchers
    normalise them), weight [C, 1, kh, kw] in its dtype on its device (read at c * kh * kw + tap for
    every channel c < C)."""
    check_dims(fn, name, x, 4)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"{fn}: weight must have {name}'s dtype {x.dtype}, got {weight.dtype}")
    check_dims(fn, "weight", weight, 4)
    if weight.shape[0] != x.shape[1] or weight.shape[1] != 1 or weight.device != x.device:
        raise ValueError(
            f"{fn}: weight must be [C = {x.shape[1]}, 1, kh, kw] on {x.device}, got "
            f"{tuple(weight.shape)} on {weight.device}"
        )


def _check_affine(fn: str, name: str, v: torch.Tensor, C: int, device: torch.device) -> None:
    """scale / shift: an empty tensor (not read) or fp32 [C] on x's device (made contiguous by the
    launcher)."""
    if v.numel() == 0:
        return
    if v.dtype != torch.float32:
        raise TypeError(f"{fn}: {name} must be float32, got {v.dtype}")
    if v.numel() != C or v.device != device:
        raise ValueError(f"{fn}: {name} must have 0 or C = {C} elements on {device}, got {v.numel()} on {v.device}")


def _geometry(sh, sw, ph, pw, dh, dw):
    sh, sw, ph, pw, dh, dw = (int(v) for v in (sh, sw, ph, pw, dh, dw))
    if sh not in (1, 2) or sw not in (1, 2):
        raise ValueError(f"depthwise (triton): strides must be 1 or 2, got {(sh, sw)}")
    if ph < 0 or pw < 0 or dh < 1 or dw < 1:
        raise ValueError(f"depthwise (triton): bad padding {(ph, pw)} or dilation {(dh, dw)}")
    return sh, sw, ph, pw, dh, dw


def depthwise_fwd(x, weight, scale, shift, sh, sw, ph, pw, dh, dw, act):
    """act(conv(x, weight) * scale + shift), x's dtype and memory format (see depthwise_fwd_ref)."""
    fn = "depthwise_fwd (triton)"
    _check_x_weight(fn, x, weight)
    _check_affine(fn, "scale", scale, x.shape[1], x.device)
    _check_affine(fn, "shift", shift, x.shape[1], x.device)
    if act not in (0, 1, 2):
        raise ValueError(f"{fn}: act must be 0 (none), 1 (relu) or 2 (relu6), got {act!r}")
    sh, sw, ph, pw, dh, dw = _geometry(sh, sw, ph, pw, dh, dw)
    x = _normalise(x)
    weight = weight.contiguous()
    N, C, H, W = x.shape
    KH, KW = int(weight.shape[2]), int(weight.shape[3])
    Ho, Wo = _out_size(H, KH, sh, ph, dh), _out_size(W, KW, sw, pw, dw)
    cl = _is_cl(x)
    out = torch.empty(
        (N, C, max(Ho, 0), max(Wo, 0)),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )
    if out.numel() == 0:
        return out
    has_scale, has_shift = scale.numel() > 0, shift.numel() > 0
    sc = scale.contiguous() if has_scale else out
    sf = shift.contiguous() if has_shift else out
    meta = dict(
        KH=KH,
        KW=KW,
        SH=sh,
        SW=sw,
        DH=dh,
        DW=dw,
        HAS_SCALE=has_scale,
        HAS_SHIFT=has_shift,
        ACT=int(act),
        SOFT_BF16=soft_bf16(),
        **_OPTS,
    )
    if cl:
        _check_i32("image", max(H * W, Ho * Wo) * C)

        def grid(m):
            return N * triton.cdiv(Ho, m["BH"]) * triton.cdiv(Wo, m["BW"]), triton.cdiv(C, m["BC"])

        _depthwise_fwd_cl_kernel[grid](x, weight, sc, sf, out, C, H, W, Ho, Wo, ph, pw, **meta)
    else:
        _check_i32("plane", max(H * W, Ho * Wo))

        def grid(m):
            return N * C, triton.cdiv(Ho, m["BH"]) * triton.cdiv(Wo, m["BW"])

        _depthwise_fwd_kernel[grid](x, weight, sc, sf, out, C, H, W, Ho, Wo, ph, pw, **meta)
    return out


def depthwise_bwd_input(grad_out, weight, H, W, sh, sw, ph, pw, dh, dw):
    """grad_x [N, C, H, W] in grad_out's dtype and memory format (see depthwise_bwd_input_ref)."""
    _check_x_weight("depthwise_bwd_input (triton)", grad_out, weight, "grad_out")
    sh, sw, ph, pw, dh, dw = _geometry(sh, sw, ph, pw, dh, dw)
    H, W = int(H), int(W)
    g = _normalise(grad_out)
    weight = weight.contiguous()
    N, C, Ho, Wo = g.shape
    KH, KW = int(weight.shape[2]), int(weight.shape[3])
    cl = _is_cl(g)
    gx = torch.empty(
        (N, C, H, W),
        dtype=g.dtype,
        device=g.device,
        memory_format=torch.channels_last if cl else torch.contiguous_format,
    )
    if gx.numel() == 0:
        return gx
    if g.numel() == 0:
        return gx.zero_()
    HT = triton.cdiv(H, sh)  # rows per parity class
    meta = dict(KH=KH, KW=KW, SH=sh, SW=sw, DH=dh, DW=dw, SOFT_BF16=soft_bf16(), **_OPTS)
    if cl:
        _check_i32("image", max(H * W, Ho * Wo) * C)

        def grid(m):
            return N * sh * triton.cdiv(HT, m["BH"]) * triton.cdiv(W, m["BW"]), triton.cdiv(C, m["BC"])

        _depthwise_bwd_input_cl_kernel[grid](g, weight, gx, C, H, W, HT, W, Ho, Wo, ph, pw, **meta)
    else:
        _check_i32("plane", max(H * W, Ho * Wo))

        def grid(m):
            return N * C, sh * triton.cdiv(HT, m["BH"]) * triton.cdiv(W, m["BW"])

        _depthwise_bwd_input_kernel[grid](g, weight, gx, C, H, W, HT, W, Ho, Wo, ph, pw, **meta)
    return gx


def depthwise_bwd_weight(grad_out, x, kh, kw, sh, sw, ph, pw, dh, dw, with_bias):
    """(grad_w fp32 [C, 1, kh, kw], grad_b fp32 [C] or an empty fp32 tensor) (see depthwise_bwd_weight_ref).

    Two stages, deterministic: the kernel writes fp32 partial sums (one per program and tap) whose
    layout depends only on the problem, then torch sums them in fp64 in a fixed order.
    """
    fn = "depthwise_bwd_weight (triton)"
    check_dims(fn, "x", x, 4)
    check_dims(fn, "grad_out", grad_out, 4)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or grad_out.dtype != x.dtype:
        raise TypeError(
            f"{fn}: x must be float32, float16 or bfloat16 and grad_out of x's dtype, got {x.dtype} "
            f"and {grad_out.dtype}"
        )
    if grad_out.shape[:2] != x.shape[:2] or grad_out.device != x.device:
        raise ValueError(
            f"{fn}: grad_out must be [N = {x.shape[0]}, C = {x.shape[1]}, Ho, Wo] on {x.device}, got "
            f"{tuple(grad_out.shape)} on {grad_out.device}"
        )
    sh, sw, ph, pw, dh, dw = _geometry(sh, sw, ph, pw, dh, dw)
    KH, KW = int(kh), int(kw)
    if KH < 1 or KW < 1:
        raise ValueError(f"{fn}: kernel size must be >= 1, got {(KH, KW)}")
    x = _normalise(x)
    N, C, H, W = x.shape
    cl = _is_cl(x)
    g = _as_format(grad_out, cl)
    Ho, Wo = g.shape[2], g.shape[3]
    KK = KH * KW
    dev = x.device
    gb_empty = torch.empty(0, dtype=torch.float32, device=dev)
    if g.numel() == 0:
        gw = torch.zeros((C, 1, KH, KW), dtype=torch.float32, device=dev)
        return gw, (torch.zeros(C, dtype=torch.float32, device=dev) if with_bias else gb_empty)
    meta = dict(
        KH=KH, KW=KW, SH=sh, SW=sw, DH=dh, DW=dw, KKP=_np2(KK), HAS_BIAS=bool(with_bias), SOFT_BF16=soft_bf16(), **_OPTS
    )
    if cl:
        _check_i32("image", max(H * W, Ho * Wo) * C)
        rows = N * Ho
        ncb = triton.cdiv(C, min(_np2(C), _MAX_BC))
        S = max(1, min(rows, triton.cdiv(_WGRAD_TARGET_PROGRAMS, ncb)))
        rps = triton.cdiv(rows, S)
        S = triton.cdiv(rows, rps)
        part = torch.empty((S, KK + 1, C), dtype=torch.float32, device=dev)

        def grid(m):
            return triton.cdiv(C, m["BC"]), S

        _depthwise_bwd_weight_cl_kernel[grid](g, x, part, C, H, W, rows, Wo, Ho, Wo, ph, pw, S, rps, **meta)
        sums = part.sum(dim=0, dtype=torch.float64).t()  # [C, KK + 1]
    else:
        _check_i32("plane", max(H * W, Ho * Wo))
        S = max(1, min(Ho, triton.cdiv(_WGRAD_TARGET_PROGRAMS, N * C)))
        rps = triton.cdiv(Ho, S)
        S = triton.cdiv(Ho, rps)
        part = torch.empty((N, C, S, KK + 1), dtype=torch.float32, device=dev)
        grid = (N * C, S)
        _depthwise_bwd_weight_kernel[grid](g, x, part, C, H, W, rps, Wo, Ho, Wo, ph, pw, S, rps, **meta)
        sums = part.sum(dim=(0, 2), dtype=torch.float64)  # [C, KK + 1]
    sums = sums.to(torch.float32)
    gw = sums[:, :KK].reshape(C, 1, KH, KW).contiguous()
    gb = sums[:, KK].contiguous() if with_bias else gb_empty
    return gw, gb
