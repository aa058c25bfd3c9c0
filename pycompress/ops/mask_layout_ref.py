"""The packed bit-mask layout, shared by every op that stores one bit per element: fake_quantize's
clamp mask (its straight-through backward), the sparse-mask ops (pack_mask, apply_mask,
masked_sgd_step) and the exported artifact's sparse tensors.

A mask of n elements, flattened in row-major (C) order, is a uint8 tensor of
``packed_mask_bytes(n) = ceil(n / 32) * 4`` bytes: bit (i % 8) of byte (i // 8) is element i
(1 = kept / not clamped). Padding bits past n are 0. Whole 32-bit words, so a GPU warp builds a
word with one ballot and a kernel reads a word per 32 elements (little-endian: bit j of word w is
element 32 w + j). The C++ / CUDA kernels (csrc/) and the Triton kernels (kernels/_common.py) use
this layout; these functions are its specification.
"""

from __future__ import annotations

import torch

__all__ = ["packed_mask_bytes", "pack_bits_ref", "unpack_bits_ref"]


def packed_mask_bytes(n: int) -> int:
    """Bytes of a packed mask for n elements (whole 32-bit words)."""
    return ((n + 31) // 32) * 4


def pack_bits_ref(bits: torch.Tensor) -> torch.Tensor:
    """Pack a bool tensor (any shape, flattened row-major) into the layout above."""
    flat = bits.reshape(-1).to(torch.uint8)
    n = flat.numel()
    padded = torch.zeros(packed_mask_bytes(n) * 8, dtype=torch.uint8, device=flat.device)
    padded[:n] = flat
    weights = (1 << torch.arange(8, device=flat.device, dtype=torch.int32)).to(torch.uint8)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits_ref(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_bits_ref: the first n bits as a flat bool tensor."""
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32)
    bits = (packed.to(torch.int32).unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool()
