"""How results are compared with the reference: one tolerance table shared by the op tests
(tests/ops/) and `pycompress bench ops`' correctness check, so the two cannot drift apart.

``TOLERANCES[(family, dtype)] = (rtol, atol)``; a value passes when
``|actual - expected| <= atol' + rtol * |expected|`` elementwise, where ``atol'`` is ``atol`` scaled
as ``ATOL_SCALE[family]`` says (sums of many terms round in proportion to their size). ``(0, 0)`` is
bit for bit (NaN matching NaN where ``equal_nan``). Families named ``*_vs_torch`` compare the
reference itself with stock torch; the others compare a backend with the reference.

``assert_close(actual, expected, "depthwise", torch.bfloat16, "grad_w")`` raises an AssertionError
that names the family, dtype, tolerance, the number of mismatches and the worst element;
``mismatch(...)`` returns that text (None when the tensors agree) for callers that report instead
of raising.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["TOLERANCES", "ATOL_SCALE", "tolerance", "mismatch", "assert_close"]

_F32, _F16, _BF16, _F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64
_ALL = (_F32, _F16, _BF16, _F64)

TOLERANCES: dict[tuple[str, torch.dtype], tuple[float, float]] = {
    # fake_quantize outputs and straight-through input gradients: bit for bit (the spec), every dtype.
    **{("fake_quantize", dt): (0.0, 0.0) for dt in _ALL},
    # LSQ scale / zero-point gradients: fp32 per-channel sums taken in another order than the
    # reference's; atol relative to the sum of |expected| over the channels.
    ("fake_quantize_lsq", _F32): (2e-5, 2e-5),
    # The same over millions of elements per sum (the GPU large-shape tests, `pycompress bench ops`):
    # atol relative to the largest |expected|.
    ("fake_quantize_lsq_large", _F32): (1e-4, 1e-4),
    # The reference's LSQ gradients vs torch._fake_quantize_learnable_per_{tensor,channel}_affine.
    ("fake_quantize_lsq_vs_torch", _F32): (1e-5, 1e-5),
    # pack_mask / unpack_mask / apply_mask: bit for bit.
    **{("sparse_mask", dt): (0.0, 0.0) for dt in _ALL},
    # masked_sgd_step: the spec allows a contracted multiply-add; the stores round once to the
    # dtype, so fp16 / bf16 differ by at most an ulp of the result. fp64 runs on the reference only.
    ("masked_sgd_step", _F32): (1e-5, 1e-6),
    ("masked_sgd_step", _F16): (1e-3, 1e-4),
    ("masked_sgd_step", _BF16): (8e-3, 1e-3),
    ("masked_sgd_step", _F64): (0.0, 0.0),
    # The reference step vs torch.optim.SGD followed by re-masking (20 steps, fp32).
    ("masked_sgd_step_vs_torch", _F32): (1e-6, 1e-6),
    # Depthwise convolution (and the fused BN + activation): backends and the reference accumulate
    # in fp32 in different orders and round once to the dtype (an ulp: 2^-11 fp16, 2^-8 bf16); atol
    # relative to the largest |expected| of the compared tensor.
    ("depthwise", _F32): (1e-4, 1e-5),
    ("depthwise", _F16): (2e-3, 1e-3),
    ("depthwise", _BF16): (1.6e-2, 8e-3),
    ("depthwise", _F64): (1e-10, 1e-12),
    # The CPU kernels called directly vs their references (tests/ops/test_depthwise.py, either
    # path: AVX2 or PYCOMPRESS_CPU_SCALAR=1's portable one), on O(1) inputs, absolute atol; checked
    # together with the depthwise family above. The weight / bias gradients are fp32 sums.
    ("depthwise_kernel", _F32): (1e-5, 1e-4),
    ("depthwise_kernel", _F16): (2e-3, 2e-2),
    ("depthwise_kernel", _BF16): (2e-2, 2e-1),
    ("depthwise_kernel_grad_weight", _F32): (1e-4, 1e-3),
    # The fused reference vs conv -> BatchNorm2d (eval) -> ReLU6 in torch.
    ("depthwise_bn_act_vs_torch", _F32): (1e-5, 1e-5),
    ("depthwise_bn_act_vs_torch", _F64): (1e-12, 1e-12),
}

# How a family's atol scales with the expected tensor (finite values only): "max": times
# max(1, max |expected|); "sum": times max(1, sum |expected|). Families not listed: atol as is.
ATOL_SCALE: dict[str, str] = {
    "fake_quantize_lsq": "sum",
    "fake_quantize_lsq_large": "max",
    "depthwise": "max",
}


def _families() -> list[str]:
    return sorted({f for f, _ in TOLERANCES})


def tolerance(op: str, dtype: torch.dtype, expected: Optional[torch.Tensor] = None) -> tuple[float, float]:
    """(rtol, atol) of family `op` for `dtype`; atol scaled by `expected` as ATOL_SCALE says."""
    if (op, dtype) not in TOLERANCES:
        known = [str(d).replace("torch.", "") for f, d in TOLERANCES if f == op]
        if not known:
            raise ValueError(f"no tolerances for op family {op!r}; families: {', '.join(_families())}")
        raise ValueError(f"no tolerance for {op} in {dtype}; it has: {', '.join(known)}")
    rtol, atol = TOLERANCES[(op, dtype)]
    rule = ATOL_SCALE.get(op)
    if rule is not None and expected is not None and expected.numel():
        mag = expected.detach().abs().double()
        mag = mag[torch.isfinite(mag)]
        if mag.numel():
            atol *= max(1.0, float(mag.max() if rule == "max" else mag.sum()))
    return rtol, atol


def mismatch(
    actual: torch.Tensor,
    expected: torch.Tensor,
    op: str,
    dtype: Optional[torch.dtype] = None,
    *,
    equal_nan: bool = True,
) -> Optional[str]:
    """None when `actual` equals `expected` within family `op`'s tolerance for `dtype` (default:
    expected's dtype), else what differs. Shapes and dtypes must match; integer and bool tensors
    must be equal."""
    if not isinstance(actual, torch.Tensor) or not isinstance(expected, torch.Tensor):
        return f"expected two tensors, got {type(actual).__name__} and {type(expected).__name__}"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    a, b = actual.detach().cpu(), expected.detach().cpu()
    if not b.is_floating_point():
        bad = a != b
        if not bool(bad.any()):
            return None
        i = int(bad.reshape(-1).nonzero()[0])
        return (
            f"{int(bad.sum())} of {b.numel()} elements differ (exact comparison); first at flat index {i}: "
            f"{a.reshape(-1)[i].item()} vs expected {b.reshape(-1)[i].item()}"
        )
    dtype = dtype or expected.dtype
    rtol, atol = tolerance(op, dtype, b)
    a64, b64 = a.double(), b.double()
    ok = torch.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=equal_nan)
    if bool(ok.all()):
        return None
    bad = ~ok
    diff = (a64 - b64).abs()
    diff = torch.where(bad & torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    worst = int(torch.where(bad, diff, torch.full_like(diff, -1.0)).reshape(-1).argmax())
    av, bv = a64.reshape(-1)[worst].item(), b64.reshape(-1)[worst].item()
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), b.shape)) if b.dim() else ()
    rel = abs(av - bv) / abs(bv) if bv != 0 and math.isfinite(bv) else float("inf")
    return (
        f"{int(bad.sum())} of {b.numel()} elements differ beyond {op} {str(dtype).replace('torch.', '')} "
        f"tolerance (rtol={rtol:.3g}, atol={atol:.3g}{', NaN == NaN' if equal_nan else ''}); "
        f"worst at index {index}: {av!r} vs expected {bv!r} (abs diff {abs(av - bv):.3g}, rel diff {rel:.3g})"
    )


def assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    op: str,
    dtype: Optional[torch.dtype] = None,
    msg: str = "",
    *,
    equal_nan: bool = True,
) -> None:
    """Raise AssertionError (prefixed with `msg`) when mismatch(...) finds a difference."""
    text = mismatch(actual, expected, op, dtype, equal_nan=equal_nan)
    if text is not None:
        raise AssertionError(f"{msg}: {text}" if msg else text)
