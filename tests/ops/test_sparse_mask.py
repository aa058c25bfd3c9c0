"""Bit-packed sparse masks: pack/unpack/apply and the fused masked SGD step; every backend vs the
reference (bit for bit where the spec says so), the reference vs torch.optim.SGD, gradients,
opcheck, bad input."""

import os

import pytest
import torch

from pycompress import backends
from pycompress.ops import apply_mask, masked_sgd_step, pack_mask, packed_mask_bytes, unpack_mask
from pycompress.ops import sparse_mask_ref as ref
from pycompress.ops.sparse_mask import KERNELS
from pycompress.testing import assert_close
from tests.helpers import device_for, scalar_path_tests

BACKENDS = backends.available("apply_mask")
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [0, 1, 7, 31, 32, 33, 1000, 4099]
SHAPES = [(0,), (1,), (7,), (33,), (3, 5, 7), (2, 3, 4, 5), (4099,)]
_INT_VIEW = {4: torch.int32, 2: torch.int16, 8: torch.int64}

# momentum, weight_decay, nesterov, dampening: every combination torch.optim.SGD accepts
SGD_CONFIGS = [
    (m, wd, nest, damp)
    for m in (0.0, 0.9)
    for wd in (0.0, 5e-4)
    for nest, damp in ((False, 0.0), (False, 0.1), (True, 0.0))
    if m != 0 or (not nest and damp == 0.0)
]


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bit patterns (so -0.0 != +0.0 and NaN payloads compare)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    assert torch.equal(bits(a.cpu()), bits(b.cpu())), "differs in bits"


def random_mask(shape, device, keep=0.5):
    return torch.rand(shape, device=device) < keep


def special_values(shape, device, dtype):
    """Random values with -0.0, +-inf and NaN sprinkled everywhere (pruned and kept positions)."""
    x = torch.randn(shape, device=device).to(dtype).reshape(-1)
    specials = torch.tensor([-0.0, float("inf"), -float("inf"), float("nan"), 0.0], device=device, dtype=dtype)
    x[::3] = specials.repeat(x[::3].numel() // 5 + 1)[: x[::3].numel()]
    return x.view(shape)


# ----------------------------------------------------------------------------- pack / unpack


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", SIZES)
def test_pack_mask_matches_reference(backend, n):
    dev = device_for(backend)
    mask = random_mask((n,), dev)
    packed = pack_mask(mask, backend=backend)
    assert packed.dtype == torch.uint8 and packed.shape == (packed_mask_bytes(n),) and packed.device == mask.device
    assert torch.equal(packed.cpu(), ref.pack_mask_ref(mask.cpu()))
    back = unpack_mask(packed, (n,), backend=backend)
    assert back.dtype == torch.bool and torch.equal(back, mask)
    # padding bits past n are 0: all-true masks set exactly n bits
    full = pack_mask(torch.ones(n, dtype=torch.bool, device=dev), backend=backend).cpu()
    assert int(ref.unpack_mask_ref(full, (full.numel() * 8,)).sum()) == n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 4, 5), (1, 1, 33)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_pack_unpack_round_trip_shapes(backend, shape, layout):
    dev = device_for(backend)
    base = random_mask(shape, dev, keep=0.3)
    mask = {"contiguous": base, "transposed": base.transpose(0, -1), "sliced": base[..., ::2]}[layout]
    packed = pack_mask(mask, backend=backend)
    assert torch.equal(packed.cpu(), ref.pack_mask_ref(mask.cpu()))  # row-major order of mask's shape
    back = unpack_mask(packed, mask.shape, backend=backend)
    assert back.shape == mask.shape and back.is_contiguous() and torch.equal(back, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pack_unpack_misaligned_views(backend):
    """A mask or packed view that does not start on a word / 16-byte boundary (scalar kernel paths)."""
    dev = device_for(backend)
    n = 1000
    big = random_mask((n + 3,), dev)
    for off in (1, 3):
        mask = big[off : off + n - off]
        want = ref.pack_mask_ref(mask.cpu())
        assert torch.equal(pack_mask(mask, backend=backend).cpu(), want)
        holder = torch.zeros(want.numel() + off, dtype=torch.uint8, device=dev)
        holder[off:] = want.to(dev)
        packed_view = holder[off:]
        assert torch.equal(unpack_mask(packed_view, (mask.numel(),), backend=backend).cpu(), mask.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_unpack_ignores_nothing_but_padding(backend):
    """unpack reads exactly bits [0, n): random bytes in, the reference's bits out."""
    dev = device_for(backend)
    for n in (5, 64, 100):
        packed = torch.randint(0, 256, (packed_mask_bytes(n),), dtype=torch.uint8, device=dev)
        assert torch.equal(unpack_mask(packed, (n,), backend=backend).cpu(), ref.unpack_mask_ref(packed.cpu(), (n,)))


# ----------------------------------------------------------------------------- apply


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_apply_mask_matches_reference(backend, dtype, shape):
    dev = device_for(backend)
    w = torch.randn(shape, device=dev).to(dtype)
    packed = pack_mask(random_mask(shape, dev), backend="reference")
    want = ref.apply_mask_ref(w.cpu(), packed.cpu())
    out = apply_mask(w, packed, backend=backend)
    assert out.shape == w.shape and out.dtype == dtype and (w.numel() == 0 or out.data_ptr() != w.data_ptr())
    same_bits(out, want)
    w2 = w.clone()
    assert apply_mask(w2, packed, inplace=True, backend=backend) is w2
    same_bits(w2, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_apply_mask_non_finite(backend, dtype):
    """-0.0, inf and NaN in pruned and kept positions: pruned -> +0.0, kept bit for bit."""
    dev = device_for(backend)
    shape = (7, 37)
    w = special_values(shape, dev, dtype)
    keep = random_mask(shape, dev)
    packed = pack_mask(keep, backend="reference")
    want = torch.where(keep.cpu(), w.cpu(), torch.zeros((), dtype=dtype))
    same_bits(want, ref.apply_mask_ref(w.cpu(), packed.cpu()))
    same_bits(apply_mask(w, packed, backend=backend), want)
    w2 = w.clone()
    apply_mask(w2, packed, inplace=True, backend=backend)
    same_bits(w2, want)
    assert int((bits(w2.cpu())[~keep.cpu()] != 0).sum()) == 0  # +0.0, not -0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("pattern", ["all_kept", "all_pruned", "blocks"])
def test_apply_mask_structured_masks(backend, dtype, pattern):
    """Whole words kept or pruned (the in-place kernels' shortcuts), with a ragged tail."""
    dev = device_for(backend)
    n = 4099
    w = special_values((n,), dev, dtype)
    idx = torch.arange(n, device=dev)
    keep = {
        "all_kept": idx >= 0,
        "all_pruned": idx < 0,
        "blocks": ((idx // 96) % 3 == 0) | ((idx % 7 == 0) & (idx > 2000)),
    }[pattern]
    packed = pack_mask(keep, backend=backend)
    want = torch.where(keep, w, torch.zeros((), dtype=dtype, device=dev))
    same_bits(apply_mask(w, packed, backend=backend), want)
    w2 = w.clone()
    apply_mask(w2, packed, inplace=True, backend=backend)
    same_bits(w2, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "misaligned", "channels_last"])
def test_apply_mask_non_contiguous(backend, layout):
    dev = device_for(backend)
    base = special_values((4, 6, 5, 3), dev, torch.float32)
    view = {
        "transposed": lambda t: t.transpose(1, 3),
        "sliced": lambda t: t[:, ::2, 1:],
        "misaligned": lambda t: t.reshape(-1)[1:],  # contiguous, not 16-byte aligned: scalar kernel paths
        "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
    }[layout]
    w = view(base)
    keep = random_mask(w.shape, dev)
    packed = pack_mask(keep, backend=backend)
    want = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=dev)).cpu()
    same_bits(apply_mask(w, packed, backend=backend), want)
    w2 = view(base.clone())
    apply_mask(w2, packed, inplace=True, backend=backend)
    assert w2.stride() == w.stride()
    same_bits(w2, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_apply_mask_zero_size(backend):
    dev = device_for(backend)
    for shape in [(0,), (3, 0, 2)]:
        w = torch.randn(shape, device=dev)
        packed = pack_mask(torch.ones(shape, dtype=torch.bool, device=dev), backend=backend)
        assert packed.numel() == 0
        assert apply_mask(w, packed, backend=backend).shape == shape
        assert apply_mask(w, packed, inplace=True, backend=backend) is w
        assert unpack_mask(packed, shape, backend=backend).shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_apply_mask_gradient_is_the_masked_upstream_gradient(backend, dtype):
    dev = device_for(backend)
    w = torch.randn(5, 13, device=dev).to(dtype).requires_grad_()
    keep = random_mask(w.shape, dev)
    packed = pack_mask(keep, backend=backend)
    g = special_values(w.shape, dev, dtype)
    (gw,) = torch.autograd.grad(apply_mask(w, packed, backend=backend), w, g)
    same_bits(gw, torch.where(keep, g, torch.zeros((), dtype=dtype, device=dev)))


def test_apply_mask_float64_on_reference_and_gradcheck():
    w = special_values((6, 7), "cpu", torch.float64)
    keep = random_mask(w.shape, "cpu")
    packed = pack_mask(keep)
    same_bits(apply_mask(w, packed), torch.where(keep, w, torch.zeros((), dtype=torch.float64)))  # auto -> reference
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    pk = pack_mask(random_mask(x.shape, "cpu"))
    assert torch.autograd.gradcheck(lambda t: apply_mask(t, pk, backend="reference"), (x,))
    assert torch.autograd.gradgradcheck(lambda t: apply_mask(t, pk, backend="reference"), (x,))


# ----------------------------------------------------------------------------- masked SGD step


def _sgd_inputs(dev, dtype, keep=0.6):
    """Two masked tensors (one with a ragged last word, one multi-word) and a dense one; pruned
    weights are not zero to begin with, pruned gradients hold inf / NaN (they must not leak)."""
    shapes = [(33,), (4, 3, 67), (5,)]
    params, grads, masks = [], [], []
    for i, s in enumerate(shapes):
        params.append(torch.randn(s, device=dev).to(dtype))
        g = torch.randn(s, device=dev).to(dtype)
        if i < 2:
            k = random_mask(s, dev, keep)
            g = torch.where(k, g, torch.tensor(float("nan") if i == 0 else float("inf"), device=dev).to(dtype))
            masks.append(pack_mask(k, backend="reference"))
        else:
            masks.append(None)
        grads.append(g)
    return params, grads, masks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("momentum,weight_decay,nesterov,dampening", SGD_CONFIGS)
def test_masked_sgd_step_matches_reference(backend, dtype, momentum, weight_decay, nesterov, dampening):
    """Two steps (the first creates the buffers: first=True; the second updates them). Masked
    entries vs the reference within the masked_sgd_step tolerance, pruned weights and buffers exactly +0.0; the dense
    entry (mask None) bit for bit torch.optim.SGD in the parameter's dtype."""
    dev = device_for(backend)
    params, grads, masks = _sgd_inputs(dev, dtype)
    ref_params = [p.cpu().clone() for p in params[:2]]
    dense = torch.nn.Parameter(params[2].clone())
    opt = torch.optim.SGD(
        [dense],
        foreach=False,
        lr=0.1,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
    )
    bufs, ref_bufs = [None] * 3, [None] * 2
    hp = dict(lr=0.1, momentum=momentum, weight_decay=weight_decay, dampening=dampening, nesterov=nesterov)
    for step in range(2):
        gs = [g if step == 0 else g.flip(0) for g in grads]  # a different gradient on step 2
        out = masked_sgd_step(params, gs, bufs, masks, backend=backend, **hp)
        assert out is bufs
        ref_bufs = ref.masked_sgd_step_ref(
            ref_params, [g.cpu() for g in gs[:2]], ref_bufs, [m.cpu() for m in masks[:2]], **hp
        )
        for p, rp in zip(params, ref_params):
            assert_close(p, rp, "masked_sgd_step", msg=f"{backend} param")
        for b, rb in zip(bufs, ref_bufs):
            assert (b is None) == (rb is None) == (momentum == 0)
            if b is not None:
                assert_close(b, rb, "masked_sgd_step", msg=f"{backend} momentum buffer")
        for p, b, m in zip(params, bufs, masks):
            if m is not None:
                pruned = ~unpack_mask(m.cpu(), p.shape)
                assert int((bits(p.cpu())[pruned] != 0).sum()) == 0
                if b is not None:
                    assert int((bits(b.cpu())[pruned] != 0).sum()) == 0
        dense.grad = gs[2].clone()
        opt.step()
        same_bits(params[2], dense.detach())
        if momentum != 0:
            same_bits(bufs[2], opt.state[dense]["momentum_buffer"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy inf - inf
def test_masked_sgd_step_kernel_non_finite_and_misaligned(backend):
    """The kernel-level step on misaligned tensors (scalar kernel paths) with inf / NaN in kept
    positions: matches the reference, NaN where the reference has NaN."""
    dev = device_for(backend)
    n = 301
    base = [special_values((n + 1,), dev, torch.float32) for _ in range(3)]
    p, g, b = (t[1:] for t in base)
    packed = pack_mask(random_mask((n,), dev), backend="reference")
    rp, rg, rb = p.cpu().clone(), g.cpu().clone(), b.cpu().clone()
    KERNELS.table(backend).sgd_step(p, g, b, packed, 0.05, 0.9, 1e-3, 0.0, True, False)
    ref.sgd_step_kernel_ref(rp, rg, rb, packed.cpu(), 0.05, 0.9, 1e-3, 0.0, True, False)
    assert_close(p, rp, "masked_sgd_step", msg=f"{backend} param")
    assert_close(b, rb, "masked_sgd_step", msg=f"{backend} momentum buffer")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [37, 1000, 4099])
def test_in_place_kernels_stay_in_bounds(backend, dtype, n):
    """In-place apply and the SGD step on views inside NaN-poisoned buffers write nothing outside
    the view (the interpreter does not catch out-of-bounds accesses; this does, for writes)."""
    dev = device_for(backend)
    guard = 64
    keep = random_mask((n,), dev)
    packed = pack_mask(keep, backend=backend)
    bufs = [torch.full((n + 2 * guard,), float("nan"), device=dev, dtype=dtype) for _ in range(3)]
    p, g, b = (t[guard : guard + n] for t in bufs)
    for t in (p, g, b):
        t.copy_(torch.randn(n, device=dev).to(dtype))
    rp, rb = p.cpu().clone(), b.cpu().clone()
    apply_mask(p, packed, inplace=True, backend=backend)
    ref.apply_inplace_kernel_ref(rp, packed.cpu())
    KERNELS.table(backend).sgd_step(p, g, b, packed, 0.1, 0.9, 5e-4, 0.0, False, False)
    ref.sgd_step_kernel_ref(rp, g.cpu(), rb, packed.cpu(), 0.1, 0.9, 5e-4, 0.0, False, False)
    assert_close(p, rp, "masked_sgd_step", msg=f"{backend} param", equal_nan=False)
    assert_close(b, rb, "masked_sgd_step", msg=f"{backend} momentum buffer", equal_nan=False)
    for t in bufs:
        assert bool(torch.isnan(t[:guard]).all()) and bool(torch.isnan(t[guard + n :]).all())


@pytest.mark.parametrize(
    "momentum,weight_decay,nesterov,dampening",
    [(0.0, 0.0, False, 0.0), (0.9, 5e-4, False, 0.0), (0.9, 5e-4, True, 0.0), (0.8, 1e-3, False, 0.3)],
)
@pytest.mark.parametrize("foreach", [False, True])
def test_reference_matches_torch_sgd_and_remask(momentum, weight_decay, nesterov, dampening, foreach):
    """20 steps of the reference == torch.optim.SGD with the gradient masked and the weight and
    momentum buffer re-masked after each step (fp32); dense entries == plain torch.optim.SGD."""
    hp = dict(lr=0.05, momentum=momentum, weight_decay=weight_decay, dampening=dampening, nesterov=nesterov)
    shapes = [(8, 3, 3, 3), (50,), (7,)]
    keeps = [random_mask(shapes[0], "cpu"), random_mask(shapes[1], "cpu", 0.2), None]
    init = [torch.randn(s) for s in shapes]
    ours = [t.clone() for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    opt = torch.optim.SGD(theirs, foreach=foreach, **hp)
    packed = [None if k is None else pack_mask(k) for k in keeps]
    bufs = [None] * 3
    for _ in range(20):
        grads = [torch.randn(s) for s in shapes]
        masked_sgd_step(ours, grads, bufs, packed, backend="reference", **hp)
        with torch.no_grad():
            for p, g, k in zip(theirs, grads, keeps):
                p.grad = g if k is None else torch.where(k, g, torch.zeros(()))
        opt.step()
        with torch.no_grad():
            for p, k in zip(theirs, keeps):
                if k is not None:
                    p.masked_fill_(~k, 0.0)
                    buf = opt.state[p].get("momentum_buffer")
                    if buf is not None:
                        buf.masked_fill_(~k, 0.0)
    for a, b, k in zip(ours, theirs, keeps):
        assert_close(a, b.detach(), "masked_sgd_step_vs_torch", equal_nan=False)
        if k is not None:
            assert int((bits(a)[~k] != 0).sum()) == 0
    for a, b in zip(bufs, theirs):
        if momentum != 0:
            assert_close(a, opt.state[b]["momentum_buffer"], "masked_sgd_step_vs_torch", equal_nan=False)
        else:
            assert a is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_pruned_stays_exactly_zero_after_50_steps(backend, dtype):
    dev = device_for(backend)
    shape = (3, 101)
    keep = random_mask(shape, dev, 0.3)
    packed = pack_mask(keep, backend=backend)
    p = torch.randn(shape, device=dev).to(dtype)  # pruned weights start non-zero
    bufs = [None]
    for step in range(50):
        g = torch.randn(shape, device=dev).to(dtype) * (1 + step % 3)
        masked_sgd_step([p], [g], bufs, [packed], lr=0.1, momentum=0.9, weight_decay=5e-4, backend=backend)
    pruned = ~keep.cpu()
    assert int((bits(p.cpu())[pruned] != 0).sum()) == 0
    assert int((bits(bufs[0].cpu())[pruned] != 0).sum()) == 0
    assert bool(torch.isfinite(p).all()) and int((p.cpu()[keep.cpu()] != 0).sum()) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_sgd_step_non_contiguous_param(backend):
    dev = device_for(backend)
    base = torch.randn(6, 9, device=dev)
    p = base.t()  # non-contiguous parameter: updated in place through its strides
    g = torch.randn(9, 6, device=dev).t().contiguous().t()
    keep = random_mask(p.shape, dev)
    packed = pack_mask(keep, backend=backend)
    rp = p.cpu().contiguous().clone()
    bufs, rbufs = [None], [None]
    for _ in range(2):
        masked_sgd_step([p], [g], bufs, [packed], lr=0.1, momentum=0.9, weight_decay=1e-4, backend=backend)
        rbufs = ref.masked_sgd_step_ref([rp], [g.cpu()], rbufs, [packed.cpu()], lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert p.data_ptr() == base.data_ptr()
    assert_close(p, rp, "masked_sgd_step", msg=f"{backend} param", equal_nan=False)
    assert_close(bufs[0], rbufs[0], "masked_sgd_step", msg=f"{backend} momentum buffer", equal_nan=False)


def test_masked_sgd_step_float64_runs_on_reference():
    p = torch.randn(40, dtype=torch.float64)
    keep = random_mask((40,), "cpu")
    rp = p.clone()
    masked_sgd_step([p], [torch.ones(40, dtype=torch.float64)], [None], [pack_mask(keep)], lr=0.5)
    ref.sgd_step_kernel_ref(
        rp, torch.ones(40, dtype=torch.float64), rp.new_empty(0), pack_mask(keep), 0.5, 0, 0, 0, False, True
    )
    same_bits(p, rp)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
def test_cpu_kernels_match_reference_bit_for_bit():
    """The CPU kernels equal the kernel references bit for bit, the SGD step included (fp32, one
    rounding per operation, no contraction on the CPU), on whichever path runs (AVX2 here, the
    portable one in test_cpu_scalar_path_matches_reference)."""
    k = KERNELS.table("cpu")
    pack, unpack, app, app_, sgd = k.pack, k.unpack, k.apply, k.apply_inplace, k.sgd_step
    configs = [
        (0.1, 0.9, 1e-3, 0.1, False, False),
        (0.1, 0.9, 5e-4, 0.0, True, True),
        (0.05, 0.0, 1e-4, 0.0, False, True),
    ]
    for n in (1, 31, 33, 1000, 4099):
        m = torch.rand(n) < 0.5
        pk = pack(m)
        assert torch.equal(pk, ref.pack_kernel_ref(m)) and torch.equal(unpack(pk, n), m), n
        for dt in KERNEL_DTYPES:
            w = special_values((n,), "cpu", dt)
            same_bits(app(w, pk), ref.apply_kernel_ref(w, pk))
            w2, w3 = w.clone(), w.clone()
            app_(w2, pk)
            ref.apply_inplace_kernel_ref(w3, pk)
            same_bits(w2, w3)
            for lr, momentum, wd, damp, nesterov, first in configs:
                p, g, b = (torch.randn(n).to(dt) for _ in range(3))
                if momentum == 0:
                    b = p.new_empty(0)
                p2, b2 = p.clone(), b.clone()
                sgd(p, g, b, pk, lr, momentum, wd, damp, nesterov, first)
                ref.sgd_step_kernel_ref(p2, g, b2, pk, lr, momentum, wd, damp, nesterov, first)
                same_bits(p, p2)
                same_bits(b, b2)


# PYCOMPRESS_CPU_SCALAR=1, read once per process, forces the CPU kernels' portable scalar path (the
# AVX2 one runs everywhere else). Per kernel, the tests that cover it rerun, their cpu cases, in a
# fresh interpreter with the variable set: the scalar path is compared with the reference exactly
# as the AVX2 path is above.
SCALAR_PATH = {
    "pack": [
        "test_pack_mask_matches_reference",
        "test_pack_unpack_round_trip_shapes",
        "test_pack_unpack_misaligned_views",
        "test_cpu_kernels_match_reference_bit_for_bit",
    ],
    "unpack": [
        "test_pack_mask_matches_reference",
        "test_pack_unpack_round_trip_shapes",
        "test_pack_unpack_misaligned_views",
        "test_unpack_ignores_nothing_but_padding",
        "test_cpu_kernels_match_reference_bit_for_bit",
    ],
    "apply": [
        "test_apply_mask_matches_reference",
        "test_apply_mask_non_finite",
        "test_apply_mask_structured_masks",
        "test_apply_mask_non_contiguous",
        "test_apply_mask_zero_size",
        "test_apply_mask_gradient_is_the_masked_upstream_gradient",
        "test_cpu_kernels_match_reference_bit_for_bit",
    ],
    "apply_inplace": [
        "test_apply_mask_matches_reference",
        "test_apply_mask_non_finite",
        "test_apply_mask_structured_masks",
        "test_apply_mask_non_contiguous",
        "test_in_place_kernels_stay_in_bounds",
        "test_cpu_kernels_match_reference_bit_for_bit",
    ],
    "sgd_step": [
        "test_masked_sgd_step_matches_reference",
        "test_masked_sgd_step_kernel_non_finite_and_misaligned",
        "test_in_place_kernels_stay_in_bounds",
        "test_pruned_stays_exactly_zero_after_50_steps",
        "test_masked_sgd_step_non_contiguous_param",
        "test_cpu_kernels_match_reference_bit_for_bit",
    ],
}


# Every kernel's scalar path against the reference (tests.helpers.scalar_path_tests).
test_scalar_path_covers_every_kernel, scalar_path_run, test_cpu_scalar_path_matches_reference = scalar_path_tests(
    __file__, SCALAR_PATH, KERNELS, "cpu" in BACKENDS
)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_for(backend)
    mask = random_mask((3, 11), dev)
    packed = pack_mask(mask, backend="reference")
    w = torch.randn(3, 11, device=dev)
    ops = torch.ops.pycompress
    torch.library.opcheck(ops.pack_mask.default, (mask, backend))
    torch.library.opcheck(ops.pack_mask.default, (mask.t(), backend))
    torch.library.opcheck(ops.unpack_mask.default, (packed, [3, 11], backend))
    torch.library.opcheck(ops.apply_mask.default, (w.clone().requires_grad_(), packed, backend))
    torch.library.opcheck(ops.apply_mask_.default, (w.clone(), packed, backend))
    torch.library.opcheck(ops.apply_mask_.default, (w.clone().t(), pack_mask(mask.t()), backend))
    g = torch.randn(3, 11, device=dev)
    for momentum, first in ((0.9, False), (0.9, True), (0.0, True)):
        buf = torch.randn(3, 11, device=dev) if momentum else w.new_empty(0)
        torch.library.opcheck(
            ops.masked_sgd_step_.default,
            (w.clone(), g, buf, packed, 0.1, momentum, 1e-4, 0.0, momentum != 0, first, backend),
        )


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
def test_opcheck_cpp_kernels():
    mask = random_mask((4, 9), "cpu")
    w, g, b = (torch.randn(4, 9) for _ in range(3))
    ops = torch.ops.pycompress
    torch.library.opcheck(ops._pack_mask.default, (mask,))
    packed = ops._pack_mask(mask)
    torch.library.opcheck(ops._unpack_mask.default, (packed, 36))
    torch.library.opcheck(ops._apply_mask.default, (w, packed))
    torch.library.opcheck(ops._apply_mask_.default, (w.clone(), packed))
    step = ops._masked_sgd_step.default
    torch.library.opcheck(step, (w.clone(), g, b.clone(), packed, 0.1, 0.9, 1e-4, 0.0, True, False))
    torch.library.opcheck(step, (w.clone(), g, w.new_empty(0), packed, 0.1, 0.0, 0.0, 0.0, False, True))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or device_for("triton").type == "cuda"])
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)
    keep = random_mask((4, 10), dev)
    packed = pack_mask(keep, backend=backend)

    def f(w):
        return (apply_mask(w * 2, packed, backend=backend) ** 2).sum()

    w = torch.randn(4, 10, device=dev, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(torch.autograd.grad(compiled(w), w)[0], torch.autograd.grad(f(w), w)[0])


# ----------------------------------------------------------------------------- bad input


def _sgd_args(**over):
    p = torch.randn(40)
    args = dict(
        params=[p], grads=[torch.randn(40)], momentum_buffers=[None], masks=[pack_mask(p > 0)], lr=0.1, momentum=0.9
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "call,err,words",
    [
        (lambda: pack_mask(torch.ones(8)), TypeError, "mask must be a bool"),
        (lambda: pack_mask(torch.ones(8, dtype=torch.uint8)), TypeError, "mask must be a bool"),
        (lambda: pack_mask([True, False]), TypeError, "mask must be a tensor"),
        (lambda: unpack_mask(torch.zeros(4, dtype=torch.uint8), (33,)), ValueError, "packed must be 1-D with 8 bytes"),
        (lambda: unpack_mask(torch.zeros(4, dtype=torch.uint8), (2.5,)), TypeError, "shape"),
        (lambda: unpack_mask(torch.zeros(4, dtype=torch.int32), (3,)), TypeError, "packed must be a uint8"),
        (
            lambda: apply_mask(torch.randn(40), torch.zeros(4, dtype=torch.uint8)),
            ValueError,
            "packed must be 1-D with 8",
        ),
        (lambda: apply_mask(torch.randn(40), torch.zeros(2, dtype=torch.int32)), TypeError, "packed must be a uint8"),
        (
            lambda: apply_mask(torch.randn(40), torch.zeros(8, dtype=torch.uint8, device="meta")),
            ValueError,
            "packed is on meta",
        ),
        (
            lambda: apply_mask(torch.ones(40, dtype=torch.int32), torch.zeros(8, dtype=torch.uint8)),
            TypeError,
            "w must be a floating-point",
        ),
        (
            lambda: apply_mask(torch.randn(40), torch.zeros(8, dtype=torch.uint8), backend="fastest"),
            ValueError,
            "backend",
        ),
        (lambda: masked_sgd_step(**_sgd_args(grads=[torch.randn(41)])), ValueError, "grads[0] must match params[0]"),
        (lambda: masked_sgd_step(**_sgd_args(grads=[torch.randn(40, dtype=torch.float64)])), ValueError, "grads[0]"),
        (lambda: masked_sgd_step(**_sgd_args(grads=[])), ValueError, "grads has 0 entries"),
        (lambda: masked_sgd_step(**_sgd_args(masks=[torch.zeros(4, dtype=torch.uint8)])), ValueError, "params[0]"),
        (lambda: masked_sgd_step(**_sgd_args(momentum_buffers=[torch.zeros(41)])), ValueError, "momentum_buffers[0]"),
        (lambda: masked_sgd_step(**_sgd_args(nesterov=True, momentum=0.0)), ValueError, "nesterov"),
        (lambda: masked_sgd_step(**_sgd_args(nesterov=True, dampening=0.1)), ValueError, "nesterov"),
        (lambda: masked_sgd_step(**_sgd_args(lr=-0.1)), ValueError, "lr must be >= 0"),
        (lambda: masked_sgd_step(**_sgd_args(lr=float("nan"))), ValueError, "lr must be a finite"),
        (lambda: masked_sgd_step(**_sgd_args(momentum=-0.5)), ValueError, "momentum"),
        (lambda: masked_sgd_step(**_sgd_args(weight_decay=-1.0)), ValueError, "weight_decay"),
        (
            lambda: masked_sgd_step(**_sgd_args(params=[torch.ones(40, dtype=torch.int64)])),
            TypeError,
            "params[0] must be floating point",
        ),
        (lambda: masked_sgd_step(**_sgd_args(backend="bogus")), ValueError, "backend"),
    ],
)
def test_bad_input_is_refused(call, err, words):
    with pytest.raises(err) as info:
        call()
    assert words in str(info.value), str(info.value)


def test_inplace_apply_on_leaf_requiring_grad_is_refused():
    w = torch.randn(8, requires_grad=True)
    with pytest.raises(RuntimeError, match="inplace=True on a leaf"):
        apply_mask(w, pack_mask(w > 0), inplace=True)


def test_explicit_backend_never_falls_back():
    w = torch.randn(40)
    packed = pack_mask(w > 0)
    with pytest.raises(backends.BackendError, match="backend 'cuda' cannot run apply_mask"):
        apply_mask(w, packed, backend="cuda")
    with pytest.raises(backends.BackendError, match="cuda"):
        masked_sgd_step([w], [w.clone()], [None], [packed], lr=0.1, backend="cuda")
    if "cpu" in BACKENDS:
        with pytest.raises(backends.BackendError, match="float64"):
            apply_mask(w.double(), packed, backend="cpu")
        with pytest.raises(backends.BackendError, match="float64"):
            masked_sgd_step([w.double()], [w.double()], [None], [packed], lr=0.1, backend="cpu")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(backends.BackendError, match="triton"):
            pack_mask(w > 0, backend="triton")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
def test_cpp_kernels_check_memory_safety():
    ops = torch.ops.pycompress
    w = torch.randn(40)
    with pytest.raises(RuntimeError, match="packed must have 8 bytes"):
        ops._apply_mask(w, torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="contiguous"):
        ops._apply_mask_(w.view(8, 5).t(), torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops._apply_mask(w.double(), torch.zeros(8, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="buf must match param"):
        ops._masked_sgd_step(w, w, torch.empty(0), torch.zeros(8, dtype=torch.uint8), 0.1, 0.9, 0.0, 0.0, False, True)
    with pytest.raises(RuntimeError, match="grad must match param"):
        ops._masked_sgd_step(
            w, w[:39], torch.empty(0), torch.zeros(8, dtype=torch.uint8), 0.1, 0.0, 0.0, 0.0, False, True
        )
    with pytest.raises(RuntimeError, match="mask must be bool"):
        ops._pack_mask(torch.ones(4))


# ----------------------------------------------------------------------------- GPU (large shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in BACKENDS])
class TestLargeOnGPU:
    N = (1 << 22) + 5

    @pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
    def test_large_apply_and_pack(self, backend, dtype):
        keep = random_mask((self.N,), "cuda")
        packed = pack_mask(keep, backend=backend)
        assert torch.equal(packed, ref.pack_mask_ref(keep))
        assert torch.equal(unpack_mask(packed, (self.N,), backend=backend), keep)
        w = special_values((self.N,), "cuda", dtype)
        want = ref.apply_mask_ref(w, packed)
        same_bits(apply_mask(w, packed, backend=backend), want)
        w2 = w.clone()
        apply_mask(w2, packed, inplace=True, backend=backend)
        same_bits(w2, want)
        # misaligned views (scalar paths) at scale
        same_bits(
            apply_mask(w[3:], pack_mask(keep[3:], backend=backend), backend=backend),
            ref.apply_mask_ref(w[3:], ref.pack_mask_ref(keep[3:])),
        )

    @pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
    @pytest.mark.parametrize("nesterov", [False, True])
    def test_large_sgd_step(self, backend, dtype, nesterov):
        keep = random_mask((self.N,), "cuda", 0.3)
        packed = pack_mask(keep, backend=backend)
        p = torch.randn(self.N, device="cuda").to(dtype)
        rp = p.clone()
        bufs, rbufs = [None], [None]
        hp = dict(lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
        for step in range(3):
            g = torch.randn(self.N, device="cuda").to(dtype)
            masked_sgd_step([p], [g], bufs, [packed], backend=backend, **hp)
            rbufs = ref.masked_sgd_step_ref([rp], [g], rbufs, [packed], **hp)
        assert_close(p, rp, "masked_sgd_step", msg=f"{backend} param", equal_nan=False)
        assert_close(bufs[0], rbufs[0], "masked_sgd_step", msg=f"{backend} momentum buffer", equal_nan=False)
        assert int((bits(p)[~keep] != 0).sum()) == 0 and int((bits(bufs[0])[~keep] != 0).sum()) == 0
