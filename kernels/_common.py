"""Helpers shared by the Triton kernel modules: dtype conversions, the packed-mask bit layout, and the
launchers' cheap memory-safety checks.

dtype conversions. The interpreter converts bf16 <-> fp32 with its own bit manipulation, which
truncates on the way down and mangles subnormals on the way up. Under the interpreter
(``SOFT_BF16``, from :func:`soft_bf16`) bf16 is therefore converted here with integer ops, exactly
as the hardware does (upcast: the 16 bits shifted up; downcast: round to nearest even, NaN stays a
quiet NaN). Compiled kernels use the native conversions (cvt.rn.bf16.f32 and a shift).

Packed masks (``pycompress/ops/mask_layout_ref.py``): n elements in ``ceil(n / 32) * 4`` bytes,
bit ``i % 8`` of byte ``i // 8`` = element i kept, padding bits 0. A kernel reads it in units of
UNIT bits (uint8 bytes, UNIT = 8, or int32 little-endian words, UNIT = 32: bit j of word w =
element 32 w + j) as the rows of a [BLOCK // UNIT, UNIT] tile, so that a program owns whole units
(:func:`pack_bits` / :func:`unpack_bits` convert between such a tile and its units).

Launcher checks (:func:`check_packed`, :func:`check_float`, :func:`check_like`, :func:`check_vector`,
:func:`check_dims`): the launchers trust the op layer's validation of values, but each one checks,
in O(1) and without a GPU sync, what its kernels need to stay in bounds (a packed mask's size,
dtypes, devices, contiguity), as the C++ kernels TORCH_CHECK it (csrc/pycompress.h). A wrong dtype
raises TypeError, anything else ValueError.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = [
    "to_f32",
    "from_f32",
    "interpreting",
    "soft_bf16",
    "pack_bits",
    "unpack_bits",
    "select_tile",
    "packed_mask_bytes",
    "check_packed",
    "check_float",
    "check_like",
    "check_vector",
    "check_dims",
]


@triton.jit
def to_f32(v, SOFT_BF16: tl.constexpr):
    """Upcast a loaded fp32 / fp16 / bf16 tensor to fp32 (exact)."""
    if SOFT_BF16:
        if v.dtype == tl.bfloat16:
            v = (v.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return v.to(tl.float32)


@triton.jit
def from_f32(v, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Round fp32 v to nearest even in `dtype` (a NaN stays NaN)."""
    if SOFT_BF16:
        if dtype == tl.bfloat16:
            b = v.to(tl.uint32, bitcast=True)
            hi = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
            hi = tl.where((b & 0x7FFFFFFF) > 0x7F800000, (b >> 16) | 0x40, hi)
            v = hi.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


def interpreting() -> bool:
    """Running under the Triton interpreter (TRITON_INTERPRET=1, CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def soft_bf16() -> bool:
    """The SOFT_BF16 constexpr of a launch: convert bf16 by hand (see to_f32 / from_f32) under the
    interpreter."""
    return interpreting()


@triton.jit
def pack_bits(keep, UNIT: tl.constexpr, AXIS: tl.constexpr):
    """Pack a [R, UNIT] (AXIS 1) or [R0, R1, UNIT] (AXIS 2) tile of bools / 0-1 ints along its last
    axis into int32 units: unit = sum over j of keep[..., j] << j (distinct bits, so the sum is an
    OR; for UNIT 32 bit 31 is the sign bit). Cast the result to uint8 for byte units."""
    bit = tl.arange(0, UNIT)
    if AXIS == 1:
        units = tl.sum(keep.to(tl.int32) << bit[None, :], axis=1)
    else:
        units = tl.sum(keep.to(tl.int32) << bit[None, None, :], axis=2)
    return units


@triton.jit
def unpack_bits(units, UNIT: tl.constexpr):
    """[R] packed units (uint8 bytes or int32 words) -> [R, UNIT] bool, True where the bit is set:
    element (r, j) is bit j of unit r (an arithmetic shift is harmless: only bit 0 is kept)."""
    bit = tl.arange(0, UNIT)
    return ((units.to(tl.int32)[:, None] >> bit[None, :]) & 1) != 0


@triton.jit
def select_tile(src_ptr, dst_ptr, units_ptr, start, n, UNIT: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """dst[i] = src[i] where bit i of the packed mask is set, else 0, for the BLOCK elements from
    flat index `start` (a multiple of BLOCK, itself a multiple of UNIT), as a [BLOCK // UNIT, UNIT]
    tile with one mask unit per row. No arithmetic: the value is copied (or replaced by the zero of
    its type: on an integer view of float data, the all-zero +0.0 pattern). MASKED False: a full
    block, no bounds checks. dst may be src (every element is read before it is written, by the
    same program)."""
    rows = tl.arange(0, BLOCK // UNIT)
    j = rows[:, None] * UNIT + tl.arange(0, UNIT)[None, :]
    unit_ptr = units_ptr + start // UNIT + rows
    if MASKED:
        inb = j < n - start
        units = tl.load(unit_ptr, mask=rows * UNIT < n - start, other=0)
        v = tl.load(src_ptr + start + j, mask=inb, other=0)
    else:
        units = tl.load(unit_ptr)
        v = tl.load(src_ptr + start + j)
    out = tl.where(unpack_bits(units, UNIT), v, tl.zeros_like(v))
    if MASKED:
        tl.store(dst_ptr + start + j, out, mask=inb)
    else:
        tl.store(dst_ptr + start + j, out)


# ---------------------------------------------------------------------------------------------
# launcher checks: what the C++ kernels TORCH_CHECK (csrc/pycompress.h), so that a launcher called
# with a stale mask or a mismatched tensor raises instead of reading or writing out of bounds. Each
# is a few attribute reads (no GPU sync, no .item()); the message is built only on failure.

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def packed_mask_bytes(n: int) -> int:
    """Bytes of a packed mask of n elements. Must equal pycompress.ops.mask_layout_ref.packed_mask_bytes
    (the layout's specification; the kernels do not import the op layer, hence this copy of its
    one-line formula)."""
    return ((n + 31) // 32) * 4


def check_packed(fn: str, packed: torch.Tensor, n: int, device: torch.device) -> None:
    """packed is a contiguous uint8 mask of exactly packed_mask_bytes(n) bytes on `device`."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"{fn}: packed must be a uint8 packed mask, got {packed.dtype}")
    want = packed_mask_bytes(n)
    if packed.numel() != want or not packed.is_contiguous() or packed.device != device:
        raise ValueError(
            f"{fn}: packed must be a contiguous uint8 tensor of {want} bytes for {n} elements "
            f"(ceil(n / 32) * 4) on {device}, got {packed.numel()} bytes on {packed.device}"
            f"{'' if packed.is_contiguous() else ' (not contiguous)'}; a stale mask, packed for "
            f"another tensor?"
        )


def check_float(fn: str, name: str, t: torch.Tensor) -> None:
    """t is a contiguous fp32 / fp16 / bf16 tensor."""
    if t.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} must be a float32, float16 or bfloat16 tensor, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{fn}: {name} must be contiguous")


def check_like(fn: str, name: str, t: torch.Tensor, like: torch.Tensor, like_name: str) -> None:
    """t is a contiguous tensor with like's dtype, number of elements and device."""
    if t.dtype != like.dtype:
        raise TypeError(f"{fn}: {name} must have {like_name}'s dtype {like.dtype}, got {t.dtype}")
    if t.numel() != like.numel() or t.device != like.device or not t.is_contiguous():
        raise ValueError(
            f"{fn}: {name} must be contiguous and match {like_name} in size and device: got "
            f"{t.numel()} elements on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}, "
            f"{like_name} has {like.numel()} on {like.device}"
        )


def check_vector(
    fn: str, name: str, t: torch.Tensor, numel: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> None:
    """t is a contiguous `dtype` tensor of `numel` elements on `device`."""
    if t.dtype != dtype:
        raise TypeError(f"{fn}: {name} must be {dtype}, got {t.dtype}")
    if t.numel() != numel or t.device != device or not t.is_contiguous():
        raise ValueError(
            f"{fn}: {name} must be contiguous with {numel} elements on {device}, got {t.numel()} "
            f"on {t.device}{'' if t.is_contiguous() else ' (not contiguous)'}"
        )


def check_dims(fn: str, name: str, t: torch.Tensor, ndim: int) -> None:
    """t has `ndim` dimensions."""
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
