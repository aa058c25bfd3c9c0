"""fake_quantize: reference vs torch, every backend vs reference, gradients, opcheck, bad input."""

import os
import subprocess
import sys

import pytest
import torch

import pycompress
from pycompress import backends
from pycompress.ops import fake_quantize, fake_quantize_ref, quant_range, value_checks
from pycompress.ops.fake_quantize import KERNELS
from pycompress.ops.fake_quantize_ref import (
    fake_quantize_bwd_learnable_ref,
    pack_bits_ref,
    unpack_bits_ref,
)
from pycompress.testing import assert_close
from tests.helpers import device_for, scalar_path_tests

BACKENDS = backends.available("fake_quantize")
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Shapes: empty, one element, odd, more than one kernel block with a ragged tail.
SHAPES = [(0,), (1,), (7,), (3, 5, 7), (2, 3, 1100)]


def exact(a, b):
    """Bit for bit (NaN matching NaN): the table's fake_quantize tolerance."""
    assert_close(a, b, "fake_quantize")


def same(got, ref, what=""):
    """A backend's output or input gradient vs the reference backend's: the table's fake_quantize
    tolerance (bit for bit)."""
    assert_close(got, ref, "fake_quantize", msg=what)


def sample(shape, device, dtype=torch.float32, spread=4.0):
    return (torch.randn(shape, device=device) * spread).to(dtype)


def channel_params(c, device, bits=4, signed=True, float_zp=False):
    qmin, qmax = quant_range(bits, signed)
    scale = torch.rand(c, device=device) * 0.5 + 0.05
    zp = torch.randint(qmin, qmax + 1, (c,), device=device, dtype=torch.int32)
    return scale, (zp.float() if float_zp else zp), qmin, qmax


# ----------------------------------------------------------------------------- reference vs torch


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 12, 16])
@pytest.mark.parametrize("signed", [True, False])
def test_reference_matches_torch_per_tensor(bits, signed):
    qmin, qmax = quant_range(bits, signed)
    x = sample((4, 33, 5), "cpu", spread=3.0)
    for scale, zp in [(0.05, 0), (0.37, qmin + (qmax - qmin) // 3), (2.0**-6, qmax)]:
        ref = fake_quantize(x, scale, zp, qmin, qmax, backend="reference")
        exact(ref, torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax))
        exact(fake_quantize_ref(x, scale, zp, qmin, qmax), ref)


@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("bits,signed", [(2, True), (4, False), (8, True), (16, False)])
def test_reference_matches_torch_per_channel(axis, bits, signed):
    x = sample((5, 6, 7), "cpu")
    scale, zp, qmin, qmax = channel_params(x.shape[axis], "cpu", bits, signed)
    ref = fake_quantize(x, scale, zp, qmin, qmax, axis, backend="reference")
    exact(ref, torch.fake_quantize_per_channel_affine(x, scale, zp, axis % 3, qmin, qmax))
    exact(fake_quantize_ref(x, scale, zp, qmin, qmax, axis), ref)


def test_reference_rounds_half_to_even():
    scale = 0.25
    k = torch.arange(-20, 20, dtype=torch.float32)
    x = (k + 0.5) * scale  # exact ties
    out = fake_quantize(x, scale, 0, -128, 127, backend="reference")
    exact(out, torch.round(k + 0.5) * scale)
    exact(out, torch.fake_quantize_per_tensor_affine(x, scale, 0, -128, 127))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_half_dtypes_compute_in_fp32(dtype):
    x = sample((3, 50), "cpu", dtype)
    out = fake_quantize(x, 0.1, 2, 0, 15, backend="reference")
    assert out.dtype == dtype
    exact(out, torch.fake_quantize_per_tensor_affine(x.float(), 0.1, 2, 0, 15).to(dtype))


def test_reference_learnable_gradients_match_torch_per_tensor():
    x = sample((6, 40), "cpu", spread=2.0).requires_grad_()
    scale = torch.tensor([0.13], requires_grad=True)
    zp = torch.tensor([3.0], requires_grad=True)
    g = torch.randn(6, 40)
    for gf in (1.0, 0.25):
        ours = fake_quantize(x, scale, zp, 0, 15, grad_factor=gf, backend="reference")
        theirs = torch._fake_quantize_learnable_per_tensor_affine(x, scale, zp, 0, 15, gf)
        exact(ours, theirs)
        a = torch.autograd.grad(ours, (x, scale, zp), g)
        b = torch.autograd.grad(theirs, (x, scale, zp), g)
        exact(a[0], b[0])
        assert_close(a[1], b[1], "fake_quantize_lsq_vs_torch", equal_nan=False)
        assert_close(a[2], b[2], "fake_quantize_lsq_vs_torch", equal_nan=False)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_reference_learnable_gradients_match_torch_per_channel(axis):
    x = sample((4, 5, 6), "cpu", spread=2.0).requires_grad_()
    c = x.shape[axis]
    scale = (torch.rand(c) * 0.3 + 0.05).requires_grad_()
    zp = torch.randint(-4, 4, (c,)).float().requires_grad_()
    g = torch.randn(4, 5, 6)
    ours = fake_quantize(x, scale, zp, -8, 7, axis, grad_factor=0.5, backend="reference")
    theirs = torch._fake_quantize_learnable_per_channel_affine(x, scale, zp, axis % 3, -8, 7, 0.5)
    exact(ours, theirs)
    a = torch.autograd.grad(ours, (x, scale, zp), g)
    b = torch.autograd.grad(theirs, (x, scale, zp), g)
    exact(a[0], b[0])
    assert_close(a[1], b[1], "fake_quantize_lsq_vs_torch", equal_nan=False)
    assert_close(a[2], b[2], "fake_quantize_lsq_vs_torch", equal_nan=False)


def test_reference_straight_through_gradient_matches_torch():
    x = sample((8, 30), "cpu").requires_grad_()
    g = torch.randn(8, 30)
    a = torch.autograd.grad(fake_quantize(x, 0.2, 1, -4, 3, backend="reference"), x, g)[0]
    b = torch.autograd.grad(torch.fake_quantize_per_tensor_affine(x, 0.2, 1, -4, 3), x, g)[0]
    exact(a, b)


def test_reference_backward_is_the_derivative_of_the_rounding_free_surrogate():
    """fp64 gradcheck: the straight-through / LSQ backward is the exact derivative of the same
    function with rint replaced by the identity (what "straight-through" means)."""

    class Surrogate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, zp):
            ctx.save_for_backward(x, scale, zp)
            q = x / scale.view(1, -1, 1) + zp.view(1, -1, 1)
            return (q.clamp(-8, 7) - zp.view(1, -1, 1)) * scale.view(1, -1, 1)

        @staticmethod
        def backward(ctx, g):
            x, scale, zp = ctx.saved_tensors
            # the reference backward, evaluated where rounding is the identity
            return fake_quantize_bwd_learnable_ref(g.contiguous(), x, 1 / scale, scale, zp, -8, 7, x.shape[2], 1.0)

    scale = torch.rand(4, dtype=torch.float64) * 0.2 + 0.2
    zp = torch.tensor([-2.0, 0.0, 1.0, 3.0], dtype=torch.float64)
    # x on the quantization grid, where rint is the identity, so both functions agree in value;
    # q = k + zp never sits on the clamp kinks qmin / qmax, where no derivative exists.
    k = torch.randint(-14, 14, (3, 4, 5)).double()
    q = k + zp.view(1, -1, 1)
    k = torch.where((q == -8) | (q == 7), k + 2, k)
    x = k * scale.view(1, -1, 1)
    for t in (x, scale, zp):
        t.requires_grad_()
    assert torch.autograd.gradcheck(Surrogate.apply, (x, scale, zp), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- backends vs reference


def _run(backend, x, scale, zp, qmin, qmax, axis=None, g=None):
    """(out, grad_x) of one backend; grad_x through the packed-mask straight-through path."""
    xr = x.detach().clone().requires_grad_(g is not None)
    out = fake_quantize(xr, scale, zp, qmin, qmax, axis, backend=backend)
    if g is None:
        return out, None
    (gx,) = torch.autograd.grad(out, xr, g)
    return out.detach(), gx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fake_quantize_matches_reference(backend, dtype, shape):
    dev = device_for(backend)
    x = sample(shape, dev, dtype)
    g = torch.randn(shape, device=dev).to(dtype)
    for qmin, qmax, scale, zp in [(-128, 127, 0.03, 0), (0, 15, 0.41, 5), (-1, 0, 1.5, 0), (0, 65535, 2.0**-9, 30000)]:
        out, gx = _run(backend, x, scale, zp, qmin, qmax, g=g)
        ref, gref = _run("reference", x.cpu(), scale, zp, qmin, qmax, g=g.cpu())
        same(out, ref)
        same(gx, gref)
        assert out.dtype == dtype and out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,axis", [((6, 3, 2, 2), 0), ((2, 5, 3, 3), 1), ((3, 4, 7), -1), ((2, 3, 700), 1), ((9,), 0)]
)
@pytest.mark.parametrize("bits,signed", [(2, True), (8, False), (16, True)])
def test_fake_quantize_per_channel_matches_reference(backend, dtype, shape, axis, bits, signed):
    dev = device_for(backend)
    x = sample(shape, dev, dtype)
    g = torch.randn(shape, device=dev).to(dtype)
    scale, zp, qmin, qmax = channel_params(shape[axis], dev, bits, signed)
    out, gx = _run(backend, x, scale, zp, qmin, qmax, axis, g=g)
    ref, gref = _run("reference", x.cpu(), scale.cpu(), zp.cpu(), qmin, qmax, axis, g=g.cpu())
    same(out, ref)
    same(gx, gref)
    if dtype == torch.float32:
        exact(
            out.cpu(),
            torch.fake_quantize_per_channel_affine(x.cpu(), scale.cpu(), zp.cpu(), axis % len(shape), qmin, qmax),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "channels_last", "expanded"])
@pytest.mark.parametrize("axis", [None, 1])
def test_fake_quantize_non_contiguous(backend, layout, axis):
    dev = device_for(backend)
    base = sample((4, 6, 5, 3), dev)
    x = {
        "transposed": base.transpose(1, 3),
        "sliced": base[:, ::2, 1:],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "expanded": base[:, :1].expand(4, 3, 5, 3),
    }[layout]
    scale, zp, qmin, qmax = channel_params(x.shape[1], dev, 4, False)
    if axis is None:
        scale, zp = scale[0], zp[0]
    g = torch.randn(x.shape, device=dev)
    out, gx = _run(backend, x, scale, zp, qmin, qmax, axis, g=g)
    ref, gref = _run("reference", x.contiguous().cpu(), scale.cpu(), zp.cpu(), qmin, qmax, axis, g=g.cpu())
    same(out, ref)
    same(gx, gref)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fake_quantize_ties_round_half_to_even(backend):
    dev = device_for(backend)
    k = torch.arange(-300, 300, device=dev, dtype=torch.float32)
    for scale in (0.5, 2.0**-7):
        x = (k + 0.5) * scale
        exact(
            fake_quantize(x, scale, 0, -256, 255, backend=backend).cpu(),
            (torch.round(k + 0.5).clamp(-256, 255) * scale).cpu(),
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
def test_fake_quantize_non_finite(backend, dtype):
    """+-inf saturate with zero gradient; NaN propagates and its gradient passes (documented)."""
    dev = device_for(backend)
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 1e30, -1e30, 0.0], device=dev).to(dtype)
    g = torch.arange(1.0, 8.0, device=dev).to(dtype)
    out, gx = _run(backend, x, 0.1, 2, 0, 15, g=g)
    # the grid values (q - zero_point) * scale, computed in fp32 and rounded once to the dtype
    expect = (torch.tensor([float("nan"), 13.0, -2.0, 3.0, 13.0, -2.0, 0.0]) * torch.tensor(0.1)).to(dtype)
    exact(out.cpu(), expect)
    exact(gx.cpu(), torch.tensor([1.0, 0, 0, 4, 0, 0, 7]).to(dtype))
    ref, gref = _run("reference", x.cpu(), 0.1, 2, 0, 15, g=g.cpu())
    same(out, ref)
    same(gx, gref)
    # learnable: NaN poisons the scale gradient (a diverged input is never hidden)
    scale = torch.tensor(0.1, device=dev, requires_grad=True)
    zp = torch.tensor(2.0, device=dev, requires_grad=True)
    xr = x.clone().requires_grad_()
    gx, gs, gz = torch.autograd.grad(fake_quantize(xr, scale, zp, 0, 15, backend=backend), (xr, scale, zp), g)
    assert torch.isnan(gs).item() and torch.isfinite(gz).item()
    exact(gx.cpu(), torch.tensor([1.0, 0, 0, 4, 0, 0, 7]).to(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,axis",
    [((0,), None), ((1,), None), ((3, 1100), None), ((4, 3, 5), 0), ((2, 3, 4, 4), 1), ((5, 6), -1), ((3, 700), 0)],
)
def test_fake_quantize_learnable_gradients_match_reference(backend, dtype, shape, axis):
    dev = device_for(backend)
    x = sample(shape, dev, dtype, spread=2.0)
    g = torch.randn(shape, device=dev).to(dtype)
    c = 1 if axis is None else shape[axis]
    scale0 = torch.rand(c, device=dev) * 0.2 + 0.05
    zp0 = torch.randint(-3, 4, (c,), device=dev).float()
    if axis is None:
        scale0, zp0 = scale0.reshape(()), zp0.reshape(())

    def grads(bk, device):
        xr = x.detach().to(device).requires_grad_()
        s = scale0.detach().to(device).requires_grad_()
        z = zp0.detach().to(device).requires_grad_()
        out = fake_quantize(xr, s, z, -8, 7, axis, grad_factor=0.3, backend=bk)
        return (out,) + torch.autograd.grad(out, (xr, s, z), g.to(device))

    got = grads(backend, dev)
    ref = grads("reference", "cpu")
    same(got[0], ref[0])
    same(got[1], ref[1])
    # fp32 sums in a different order: atol relative to the sum of magnitudes
    for name, a, b in zip(("grad_scale", "grad_zero_point"), got[2:], ref[2:]):
        assert_close(a, b, "fake_quantize_lsq", msg=f"{backend} {name}", equal_nan=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_mask_layout_is_shared_by_all_backends(backend):
    dev = device_for(backend)
    x = sample((37,), dev)
    inv = torch.tensor([10.0], device=dev)
    s = torch.tensor([0.1], device=dev)
    z = torch.tensor([0.0], device=dev)
    fwd = KERNELS.table(backend).fwd
    out, mask = fwd(x, inv, s, z, -8, 7, 37, True)
    keep = (torch.round(x.cpu() * 10) >= -8) & (torch.round(x.cpu() * 10) <= 7)
    assert mask.dtype == torch.uint8 and mask.numel() == 8
    exact(mask.cpu(), pack_bits_ref(keep))
    exact(unpack_bits_ref(mask.cpu(), 37), keep)
    _, no_mask = fwd(x, inv, s, z, -8, 7, 37, False)
    assert no_mask.numel() == 0


# ----------------------------------------------------------------------------- portable CPU path

# PYCOMPRESS_CPU_SCALAR=1, read once per process, forces the CPU kernels' portable scalar path (the
# AVX2 one runs everywhere else). Per kernel, the tests that cover it rerun, their cpu cases, in a
# fresh interpreter with the variable set: the scalar path is compared with the reference exactly
# as the AVX2 path is above (bit for bit).
SCALAR_PATH = {
    "fwd": [
        "test_fake_quantize_matches_reference",
        "test_fake_quantize_per_channel_matches_reference",
        "test_fake_quantize_ties_round_half_to_even",
        "test_fake_quantize_non_contiguous",
        "test_fake_quantize_non_finite",
        "test_packed_mask_layout_is_shared_by_all_backends",
    ],
    "bwd": [
        "test_fake_quantize_matches_reference",
        "test_fake_quantize_per_channel_matches_reference",
        "test_fake_quantize_non_contiguous",
        "test_fake_quantize_non_finite",
    ],
    "bwd_learnable": ["test_fake_quantize_learnable_gradients_match_reference", "test_fake_quantize_non_finite"],
}


# Every kernel's scalar path against the reference (tests.helpers.scalar_path_tests).
test_scalar_path_covers_every_kernel, scalar_path_run, test_cpu_scalar_path_matches_reference = scalar_path_tests(
    __file__, SCALAR_PATH, KERNELS, "cpu" in BACKENDS
)


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dev = device_for(backend)
    x = sample((3, 4, 5), dev).requires_grad_()
    s = torch.tensor(0.2, device=dev)
    z = torch.tensor(1.0, device=dev)
    op = torch.ops.pycompress.fake_quantize.default
    torch.library.opcheck(op, (x, s, z, -8, 7, None, 1.0, backend, True))
    sc = (torch.rand(4, device=dev) + 0.1).requires_grad_()
    zc = torch.zeros(4, device=dev).requires_grad_()
    torch.library.opcheck(op, (x, sc, zc, -8, 7, 1, 0.5, backend, False))
    xt = sample((5, 4, 3), dev).transpose(0, 2).requires_grad_()
    torch.library.opcheck(op, (xt, s, z, 0, 15, None, 1.0, backend, True))
    g = torch.randn(3, 4, 5, device=dev)
    mask = op(x.detach(), s, z, -8, 7, None, 1.0, backend, True)[1]
    torch.library.opcheck(torch.ops.pycompress.fake_quantize_backward.default, (g, mask, backend))
    torch.library.opcheck(
        torch.ops.pycompress.fake_quantize_backward_learnable.default,
        (g, x.detach(), sc.detach(), zc.detach(), -8, 7, 1, 0.5, backend),
    )


@pytest.mark.skipif(not pycompress._ext.loaded(), reason="extension not built")
def test_opcheck_cpp_kernels():
    x = sample((4, 9), "cpu")
    inv, s, z = torch.tensor([4.0]), torch.tensor([0.25]), torch.tensor([1.0])
    torch.library.opcheck(torch.ops.pycompress._fake_quantize_fwd.default, (x, inv, s, z, -8, 7, 36, True))
    out, mask = torch.ops.pycompress._fake_quantize_fwd(x, inv, s, z, -8, 7, 36, True)
    torch.library.opcheck(torch.ops.pycompress._fake_quantize_bwd.default, (torch.randn(4, 9), mask))
    torch.library.opcheck(
        torch.ops.pycompress._fake_quantize_bwd_learnable.default, (torch.randn(4, 9), x, inv, s, z, -8, 7, 36, 1.0)
    )


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton" or device_for("triton").type == "cuda"])
def test_torch_compile_fullgraph(backend):
    dev = device_for(backend)

    def f(x, scale, zp):
        y = fake_quantize(x * 2, 0.1, 0, -8, 7, backend=backend)
        return fake_quantize(y, scale, zp, 0, 255, 1, backend=backend).sum()

    x = sample((2, 3, 8), dev).requires_grad_()
    scale = (torch.rand(3, device=dev) + 0.05).requires_grad_()
    zp = torch.zeros(3, device=dev).requires_grad_()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(x, scale, zp), (x, scale, zp))
    want = torch.autograd.grad(f(x, scale, zp), (x, scale, zp))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,err,words",
    [
        (dict(scale=0.0), ValueError, "scale"),
        (dict(scale=-1.0), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale=1e-45), ValueError, "reciprocal"),
        (dict(scale=torch.tensor([0.1, 0.0, 0.2]), zero_point=torch.zeros(3), axis=1), ValueError, "scale[1]"),
        (dict(scale=torch.tensor(float("nan"))), ValueError, "scale"),
        (dict(scale=torch.tensor([1, 2, 3]), zero_point=torch.zeros(3), axis=1), TypeError, "scale"),
        (dict(scale="0.1"), TypeError, "scale"),
        (dict(qmin=7, qmax=7), ValueError, "qmin"),
        (dict(qmin=8, qmax=7), ValueError, "qmin"),
        (dict(qmin=-(2**15) - 1), ValueError, "[-32768, 65535]"),
        (dict(qmax=2**16), ValueError, "[-32768, 65535]"),
        (dict(qmin=0.5), TypeError, "qmin"),
        (dict(qmax=True), TypeError, "qmax"),
        (dict(zero_point=99), ValueError, "zero_point"),
        (
            dict(zero_point=torch.tensor([0, 99, 0], dtype=torch.int32), scale=torch.ones(3), axis=1),
            ValueError,
            "zero_point[1]",
        ),
        (dict(zero_point=float("nan")), ValueError, "zero_point"),
        (dict(scale=torch.ones(4), zero_point=torch.zeros(4), axis=1), ValueError, "3 elements"),
        (dict(scale=torch.ones(3, 1), zero_point=torch.zeros(3), axis=1), ValueError, "1-D"),
        (dict(scale=torch.ones(3)), ValueError, "per-tensor scale"),
        (dict(scale=0.1, axis=1), TypeError, "per-channel scale"),
        (dict(axis=3), ValueError, "axis 3"),
        (dict(axis=-4), ValueError, "axis -4"),
        (dict(axis=1.0), TypeError, "axis"),
        (dict(grad_factor=float("nan")), ValueError, "grad_factor"),
        (dict(backend="fastest"), ValueError, "backend"),
        (dict(x=torch.ones(2, 3, 4, dtype=torch.int32)), TypeError, "x must be a floating-point"),
        (dict(x=[1.0, 2.0]), TypeError, "x must be a tensor"),
    ],
)
def test_bad_input_is_refused(kwargs, err, words):
    args = dict(x=torch.randn(2, 3, 4), scale=0.1, zero_point=0, qmin=-8, qmax=7, axis=None)
    args.update(kwargs)
    with pytest.raises(err) as info:
        fake_quantize(**args)
    assert words in str(info.value), str(info.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_device_mix_is_refused():
    with pytest.raises(ValueError, match="scale is on"):
        fake_quantize(torch.randn(3, 4, device="cuda"), torch.ones(4), torch.zeros(4), 0, 15, 1)


def test_device_mix_is_refused_on_meta():
    with pytest.raises(ValueError, match="zero_point is on meta"):
        fake_quantize(torch.randn(3, 4), torch.ones(4), torch.zeros(4, device="meta"), 0, 15, 1)


def test_value_checks_can_be_turned_off():
    with value_checks(False):
        fake_quantize(torch.randn(3, 4), torch.tensor([0.1, 0.1, 0.1, 0.1]), torch.zeros(4), 0, 15, 1)
    with pytest.raises(ValueError):
        fake_quantize(torch.randn(3, 4), torch.tensor([0.1, 0.0, 0.1, 0.1]), torch.zeros(4), 0, 15, 1)


def test_quant_range():
    assert quant_range(8, True) == (-128, 127)
    assert quant_range(8, False) == (0, 255)
    assert quant_range(1, True) == (-1, 0)
    assert quant_range(1, False) == (0, 1)
    assert quant_range(16, False) == (0, 65535)
    assert quant_range(16, True) == (-32768, 32767)
    for bad in (0, 17):
        with pytest.raises(ValueError, match="bits"):
            quant_range(bad, True)
    with pytest.raises(TypeError, match="bits"):
        quant_range(4.0, True)


def test_float64_runs_on_reference_only():
    x = torch.randn(10, dtype=torch.float64)
    assert fake_quantize(x, 0.1, 0, -8, 7).dtype == torch.float64  # auto falls back to reference
    if "cpu" in BACKENDS:
        with pytest.raises(backends.BackendError, match="float64"):
            fake_quantize(x, 0.1, 0, -8, 7, backend="cpu")


# ----------------------------------------------------------------------------- backend selection


def test_backend_selection_order(monkeypatch):
    x = torch.randn(4)
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "reference")
    assert backends.select("fake_quantize", x=x) == "reference"
    with backends.use("auto"):
        auto = backends.select("fake_quantize", x=x)
        assert auto == ("cpu" if "cpu" in BACKENDS else "reference")
        assert backends.select("fake_quantize", "reference", x=x) == "reference"
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PYCOMPRESS_BACKEND"):
        backends.select("fake_quantize", x=x)


def test_explicit_backend_never_falls_back():
    x = torch.randn(4)
    with pytest.raises(backends.BackendError, match="backend 'cuda' cannot run fake_quantize"):
        fake_quantize(x, 0.1, 0, -8, 7, backend="cuda")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        with pytest.raises(backends.BackendError, match="triton"):
            fake_quantize(x, 0.1, 0, -8, 7, backend="triton")


def test_auto_error_lists_every_backend(monkeypatch):
    for name in backends._SUPPORT["fake_quantize"]:
        monkeypatch.setitem(backends._SUPPORT["fake_quantize"], name, lambda x: "pretend it cannot")
    with pytest.raises(backends.BackendError) as info:
        fake_quantize(torch.randn(4), 0.1, 0, -8, 7)
    text = str(info.value)
    for name in backends.BACKENDS:
        assert f"  {name}: " in text
    assert "pretend it cannot" in text


def test_available_lists_reference_and_rejects_unknown_ops():
    assert "reference" in backends.available("fake_quantize")
    with pytest.raises(ValueError, match="unknown op"):
        backends.available("no_such_op")


def _python(code, **env):
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=os.getcwd())


_HIDE_EXT = (
    "import sys, importlib.abc\n"
    "class Hide(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path, target=None):\n"
    "        if name == 'pycompress._C': raise ImportError('hidden for the test')\n"
    "sys.meta_path.insert(0, Hide())\n"
)


def test_import_without_extension_warns_and_reports():
    code = _HIDE_EXT + (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import pycompress, torch\n"
        "assert any('not built' in str(x.message) for x in w), [str(x.message) for x in w]\n"
        "from pycompress import backends\n"
        "assert 'cpu' not in backends.available('fake_quantize')\n"
        "try:\n"
        "    pycompress.ops.fake_quantize(torch.randn(3), 0.1, 0, 0, 7, backend='cpu')\n"
        "except backends.BackendError as e:\n"
        "    assert 'not built' in str(e), e\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
        "print(pycompress.ops.fake_quantize(torch.randn(3), 0.1, 0, 0, 7).shape)\n"
    )
    r = _python(code, PYCOMPRESS_REQUIRE_EXT="0")
    assert r.returncode == 0, r.stderr
    r = _python(_HIDE_EXT + "import pycompress", PYCOMPRESS_REQUIRE_EXT="1")
    assert r.returncode != 0 and "PYCOMPRESS_REQUIRE_EXT=1" in r.stderr


# ----------------------------------------------------------------------------- GPU (large shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in BACKENDS])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,axis", [((1 << 22) + 3, None), ((256, 64, 3, 3), 0), ((32, 96, 28, 28), 1), ((4096, 1000), -1)]
)
def test_gpu_large_matches_reference(backend, dtype, shape, axis):
    shape = shape if isinstance(shape, tuple) else (shape,)
    x = sample(shape, "cuda", dtype)
    g = torch.randn(shape, device="cuda").to(dtype)
    c = 1 if axis is None else shape[axis]
    scale, zp, qmin, qmax = channel_params(c, "cuda", 8, False)
    if axis is None:
        scale, zp = scale[0], zp[0]
    out, gx = _run(backend, x, scale, zp, qmin, qmax, axis, g=g)
    ref, gref = _run("reference", x, scale, zp, qmin, qmax, axis, g=g)
    same(out, ref)
    same(gx, gref)
    s = scale.detach().clone().requires_grad_()
    z = zp.float().detach().clone().requires_grad_()
    a = torch.autograd.grad(fake_quantize(x, s, z, qmin, qmax, axis, backend=backend), (s, z), g)
    b = torch.autograd.grad(fake_quantize(x, s, z, qmin, qmax, axis, backend="reference"), (s, z), g)
    for name, u, v in zip(("grad_scale", "grad_zero_point"), a, b):
        assert_close(u, v, "fake_quantize_lsq_large", msg=f"{backend} {name}", equal_nan=False)
