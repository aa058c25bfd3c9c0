"""`pycompress bench overhead`: the fixed per-call cost of every op, eager, on the CPU
(``python -m pycompress.bench.overhead`` prints the same table).

Each case calls one public op on tiny tensors (a few dozen elements, so the kernels' own work is
negligible) the way a training step does: a forward and, where the op is differentiable, the
backward of that forward (``torch.autograd.grad``), as one pair. What is left is the price of the
op layer itself: argument checks, backend selection, the custom-op / autograd dispatch, the
layout bookkeeping and the kernel launch. A ``torch`` row times the stock torch op doing the
same work, for scale (torch's own dispatch and autograd floor).

Numbers are microseconds per call (per forward + backward pair), the median and the minimum
over ``repeats`` repeats of ``calls`` calls each, with Python's garbage collector off while a
repeat runs (as ``timeit``). Value checks are left at their default (on), as a user gets them.
"""

from __future__ import annotations

import dataclasses
import gc
import platform
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Row", "run", "format_table", "CASES", "DEFAULT_BACKENDS"]

DEFAULT_BACKENDS = ("cpu", "reference")
_REPEAT_SECONDS = 0.04  # each repeat runs about this long


@dataclasses.dataclass
class Row:
    op: str  # the public op
    case: str  # what the pair does
    backend: str  # a pycompress backend, or "torch" (the stock op, for scale)
    what: str  # "fwd+bwd", "fwd" or "step"
    median_us: float
    min_us: float
    calls: int  # calls per repeat
    repeats: int


@dataclasses.dataclass
class Case:
    op: str  # the op name in pycompress.backends (availability)
    name: str
    what: str
    make: Callable[[str], Callable[[], object]]  # backend -> one timed call
    torch_make: Optional[Callable[[], Callable[[], object]]] = None


# ---------------------------------------------------------------------------------------------- cases


def _fq_ste(backend: str):
    from ..ops import fake_quantize

    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)

    def call():
        return torch.autograd.grad(fake_quantize(x, 0.1, 0, -8, 7, backend=backend), x, g)

    return call


def _fq_ste_torch():
    x = torch.randn(4, 8, requires_grad=True)
    g = torch.randn(4, 8)
    return lambda: torch.autograd.grad(torch.fake_quantize_per_tensor_affine(x, 0.1, 0, -8, 7), x, g)


def _fq_lsq(backend: str):
    from ..ops import fake_quantize

    x = torch.randn(4, 8, requires_grad=True)
    s = (torch.rand(4) * 0.1 + 0.05).requires_grad_()
    z = torch.zeros(4).requires_grad_()
    g = torch.randn(4, 8)

    def call():
        return torch.autograd.grad(fake_quantize(x, s, z, -8, 7, 0, backend=backend), (x, s, z), g)

    return call


def _fq_lsq_torch():
    x = torch.randn(4, 8, requires_grad=True)
    s = (torch.rand(4) * 0.1 + 0.05).requires_grad_()
    z = torch.zeros(4).requires_grad_()
    g = torch.randn(4, 8)
    return lambda: torch.autograd.grad(
        torch._fake_quantize_learnable_per_channel_affine(x, s, z, 0, -8, 7, 1.0), (x, s, z), g
    )


def _mask(n: int = 64) -> torch.Tensor:
    return torch.arange(n) % 3 != 0


def _pack(backend: str):
    from ..ops import pack_mask

    m = _mask()
    return lambda: pack_mask(m, backend=backend)


def _unpack(backend: str):
    from ..ops import pack_mask, unpack_mask

    packed = pack_mask(_mask(), backend="reference")
    return lambda: unpack_mask(packed, (8, 8), backend=backend)


def _apply(backend: str):
    from ..ops import apply_mask, pack_mask

    packed = pack_mask(_mask(), backend="reference")
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    return lambda: torch.autograd.grad(apply_mask(w, packed, backend=backend), w, g)


def _apply_torch():
    keep = _mask().view(8, 8)
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    zero = torch.zeros(())
    return lambda: torch.autograd.grad(torch.where(keep, w, zero), w, g)


def _sgd(backend: str):
    from ..ops import masked_sgd_step, pack_mask

    packed = pack_mask(_mask(), backend="reference")
    p, g = torch.randn(8, 8), torch.randn(8, 8) * 1e-3
    bufs = [None]

    def call():
        masked_sgd_step([p], [g], bufs, [packed], lr=1e-3, momentum=0.9, weight_decay=5e-4, backend=backend)

    return call


def _sgd_optimizer(backend: str):
    from ..ops import pack_mask
    from ..prune.optim import MaskedSGD

    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8) * 1e-3
    opt = MaskedSGD([p], lr=1e-3, momentum=0.9, weight_decay=5e-4, backend=backend)
    opt.set_masks({p: pack_mask(_mask(), backend="reference")})
    return opt.step


def _sgd_torch():
    p = torch.nn.Parameter(torch.randn(8, 8))
    p.grad = torch.randn(8, 8) * 1e-3
    return torch.optim.SGD([p], lr=1e-3, momentum=0.9, weight_decay=5e-4).step


def _dw_inputs(bias: bool):
    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, requires_grad=True)
    b = torch.randn(4, requires_grad=True) if bias else None
    return x, w, b, torch.randn(1, 4, 6, 6)


def _dw(backend: str):
    from ..ops import depthwise_conv2d

    x, w, b, g = _dw_inputs(True)
    return lambda: torch.autograd.grad(depthwise_conv2d(x, w, b, 1, 1, backend=backend), (x, w, b), g)


def _dw_torch():
    x, w, b, g = _dw_inputs(True)
    return lambda: torch.autograd.grad(F.conv2d(x, w, b, 1, 1, 1, 4), (x, w, b), g)


def _dw_bn(backend: str):
    from ..ops import depthwise_conv2d_bn_act

    x, w, _, g = _dw_inputs(False)
    s = (torch.rand(4) + 0.5).requires_grad_()
    t = torch.randn(4).requires_grad_()
    return lambda: torch.autograd.grad(
        depthwise_conv2d_bn_act(x, w, s, t, 1, 1, 1, "relu6", backend=backend), (x, w, s, t), g
    )


def _dw_bn_torch():
    x, w, _, g = _dw_inputs(False)
    s = (torch.rand(4) + 0.5).requires_grad_()
    t = torch.randn(4).requires_grad_()
    return lambda: torch.autograd.grad(
        F.relu6(F.conv2d(x, w, None, 1, 1, 1, 4) * s.view(1, 4, 1, 1) + t.view(1, 4, 1, 1)), (x, w, s, t), g
    )


CASES: list[Case] = [
    Case("fake_quantize", "per-tensor, straight-through, 4x8", "fwd+bwd", _fq_ste, _fq_ste_torch),
    Case("fake_quantize", "per-channel LSQ (learned scale, zero point), 4x8", "fwd+bwd", _fq_lsq, _fq_lsq_torch),
    Case("pack_mask", "64 elements", "fwd", _pack),
    Case("unpack_mask", "64 elements", "fwd", _unpack),
    Case("apply_mask", "8x8", "fwd+bwd", _apply, _apply_torch),
    Case("masked_sgd_step", "1 tensor 8x8, momentum + wd", "step", _sgd),
    Case("masked_sgd_step", "MaskedSGD.step, 1 parameter 8x8", "step", _sgd_optimizer, _sgd_torch),
    Case("depthwise_conv2d", "1x4x6x6, 3x3, bias", "fwd+bwd", _dw, _dw_torch),
    Case("depthwise_conv2d", "bn_act relu6, 1x4x6x6, 3x3", "fwd+bwd", _dw_bn, _dw_bn_torch),
]


# ---------------------------------------------------------------------------------------------- timing


def _time_us(fn: Callable[[], object], repeats: int) -> tuple[float, float, int]:
    """(median, min) microseconds per call over `repeats` repeats, and the calls per repeat."""
    for _ in range(20):  # warm-up: first-call dispatch, caches, allocator
        fn()
    calls, elapsed = 1, 0.0
    while True:  # calibrate: calls per repeat so that a repeat lasts about _REPEAT_SECONDS
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= _REPEAT_SECONDS / 4 or calls >= 1 << 16:
            break
        calls *= 2
    calls = max(1, int(calls * _REPEAT_SECONDS / max(elapsed, 1e-9)))
    per_call = []
    enabled = gc.isenabled()
    try:
        for _ in range(repeats):
            gc.collect()
            gc.disable()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            per_call.append((time.perf_counter() - t0) / calls * 1e6)
            if enabled:
                gc.enable()
    finally:
        if enabled:
            gc.enable()
    return statistics.median(per_call), min(per_call), calls


def run(
    ops: Optional[Iterable[str]] = None,
    backends: Optional[Sequence[str]] = None,
    repeats: int = 7,
    torch_rows: bool = True,
    printer: Optional[Callable[[str], None]] = None,
) -> list[Row]:
    """Time every case (or those of `ops`, public op names) on `backends` (default cpu and
    reference, those available here) and, with `torch_rows`, the stock torch equivalent."""
    from .. import backends as registry

    wanted = None if ops is None else set(ops)
    known = {c.op for c in CASES}
    if wanted is not None and not wanted <= known:
        raise ValueError(f"unknown op(s) {sorted(wanted - known)}; cases exist for {', '.join(sorted(known))}")
    names = list(backends) if backends is not None else list(DEFAULT_BACKENDS)
    bad = [b for b in names if b not in registry.BACKENDS]
    if bad:
        raise ValueError(f"unknown backend(s) {bad}; choose from {', '.join(registry.BACKENDS)}")
    rows: list[Row] = []
    for case in CASES:
        if wanted is not None and case.op not in wanted:
            continue
        available = registry.available(case.op)
        for b in names:
            if b not in available:
                if printer:
                    printer(f"skip {case.op} / {b}: {registry.status(b) or 'not available for this op'}")
                continue
            med, low, calls = _time_us(case.make(b), repeats)
            rows.append(Row(case.op, case.name, b, case.what, med, low, calls, repeats))
            if printer:
                printer(f"{case.op:17s} {case.name:48s} {b:9s} {med:9.1f} us")
        if torch_rows and case.torch_make is not None:
            med, low, calls = _time_us(case.torch_make(), repeats)
            rows.append(Row(case.op, case.name, "torch", case.what, med, low, calls, repeats))
    return rows


def machine() -> str:
    """One line naming the machine, for the table's caption."""
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: one line per op, case and backend."""
    lines = ["| op | case | backend | what | median us | min us |", "|---|---|---|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.backend} | {r.what} | {r.median_us:.1f} | {r.min_us:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pycompress.bench.overhead
    import sys

    result = run(printer=lambda s: print(s, file=sys.stderr))
    print(f"CPU per-call overhead ({machine()})\n")
    print(format_table(result))
