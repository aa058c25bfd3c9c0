"""Depthwise convolution: every backend vs the reference (forward, gradients, the fused BN +
activation variant) over kernel sizes, strides, paddings, dilations, memory formats and dtypes;
the reference vs torch; gradcheck, opcheck, non-contiguous and zero-size inputs, NaN poison
around the input, bad input."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from pycompress import backends
from pycompress.ops import depthwise_ref as ref
from pycompress.ops.depthwise import KERNELS, _format, depthwise_conv2d, depthwise_conv2d_bn_act
from pycompress.testing import assert_close
from tests.helpers import device_for, scalar_path_tests

BACKENDS = backends.available("depthwise_conv2d")
KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_MISSING = importlib.util.find_spec("pycompress.kernels.depthwise") is None


def close(got, want, dtype, what=""):
    """A backend's result vs the reference's within the table's depthwise tolerance for `dtype`
    (pycompress.testing: both accumulate in fp32 in different orders and round once to the dtype;
    atol relative to the largest |want|). Compared as fp32 (fp64 as is)."""
    if dtype != torch.float64:
        got, want = got.detach().float(), want.detach().float()
    assert_close(got, want, "depthwise", dtype, msg=what)


def needs_triton_module(backend):
    if backend == "triton" and TRITON_MISSING:
        pytest.skip("kernels/depthwise.py (the Triton backend) is not in this tree yet")


# (k, stride, padding, dilation): every kernel size x stride x dilation, paddings 0, k // 2 and one
# larger. The interpreted Triton backend runs a covering subset (it is slow).
CONFIGS = [(k, s, p, d) for k in (1, 3, 5, 7) for s in (1, 2) for d in (1, 2) for p in sorted({0, k // 2, k // 2 + 1})]
SMALL_CONFIGS = [(1, 2, 1, 1), (3, 1, 1, 1), (3, 2, 0, 1), (3, 1, 2, 2), (5, 2, 3, 1), (7, 1, 3, 1)]


def cfg_id(c):
    return "k{}s{}p{}d{}".format(*c)


def interpreted(backend):
    return backend == "triton" and device_for(backend).type == "cpu"


def configs_for(backend):
    return SMALL_CONFIGS if interpreted(backend) else CONFIGS


def spatial(k, d, small):
    """Odd (H, W) that give a non-empty output even with no padding."""
    eff = d * (k - 1) + 1
    h = max(7 if small else 11, eff + 2) | 1
    w = max(5 if small else 9, eff) | 1
    return h, w


def backend_configs():
    return [pytest.param(b, c, id=f"{b}-{cfg_id(c)}") for b in BACKENDS for c in configs_for(b)]


def make_inputs(backend, cfg, dtype, idx=0, layout="nchw", bias=True):
    k, s, p, d = cfg
    dev = device_for(backend)
    small = backend == "triton" and dev.type == "cpu"
    H, W = spatial(k, d, small)
    N, C = (1 + idx % 2, 3) if small else (1 + idx % 2, 5)
    x = torch.randn(N, C, H, W, device=dev).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 1, k, k, device=dev) / k).to(dtype)
    b = torch.randn(C, device=dev).to(dtype) if bias else None
    return x, w, b


def fmt_of(t):
    return (
        torch.channels_last
        if (not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last))
        else torch.contiguous_format
    )


# ----------------------------------------------------------------------------- reference vs torch


@pytest.mark.parametrize("cfg", [(1, 1, 0, 1), (3, 1, 1, 1), (3, 2, 2, 2), (5, 2, 2, 1), (7, 1, 4, 1)], ids=cfg_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_reference_matches_torch_conv2d(cfg, dtype):
    k, s, p, d = cfg
    x = torch.randn(2, 6, 13, 11, dtype=dtype)
    w = torch.randn(6, 1, k, k, dtype=dtype)
    b = torch.randn(6, dtype=dtype)
    want = F.conv2d(x, w, b, s, p, d, groups=6)
    torch.testing.assert_close(ref.depthwise_conv2d_ref(x, w, b, s, p, d), want)
    torch.testing.assert_close(depthwise_conv2d(x, w, b, s, p, d, backend="reference"), want)
    # kernel-level forward and backward against autograd of F.conv2d
    z = ref.depthwise_fwd_ref(x, w, x.new_empty(0), b, s, s, p, p, d, d, 0)
    torch.testing.assert_close(z, want)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    g = torch.randn_like(want)
    gx, gw, gb = torch.autograd.grad(F.conv2d(xr, wr, br, s, p, d, groups=6), (xr, wr, br), g)
    torch.testing.assert_close(ref.depthwise_bwd_input_ref(g, w, 13, 11, s, s, p, p, d, d), gx)
    kgw, kgb = ref.depthwise_bwd_weight_ref(g, x, k, k, s, s, p, p, d, d, True)
    torch.testing.assert_close(kgw.to(dtype), gw)
    torch.testing.assert_close(kgb.to(dtype), gb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_fused_reference_matches_conv_bn_relu6(dtype):
    """conv -> BatchNorm2d (eval) -> ReLU6 in torch == the fused reference with the folded BN."""
    C = 8
    conv = torch.nn.Conv2d(C, C, 3, 1, 1, groups=C, bias=True).to(dtype)
    bn = torch.nn.BatchNorm2d(C).to(dtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.eval()
    x = torch.randn(2, C, 9, 7, dtype=dtype) * 6
    want = F.relu6(bn(conv(x)))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale + conv.bias * scale
    got = ref.depthwise_conv2d_bn_act_ref(x, conv.weight, scale, shift, 1, 1, 1, "relu6")
    assert_close(got, want, "depthwise_bn_act_vs_torch", equal_nan=False)
    assert bool((got == 0).any()) and bool((got == 6).any())  # both clamps exercised
    got2 = depthwise_conv2d_bn_act(x, conv.weight, scale, shift, 1, 1, 1, "relu6", backend="reference")
    assert_close(got2, want, "depthwise_bn_act_vs_torch", equal_nan=False)


def test_gradcheck_reference_fp64():
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
    t = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: depthwise_conv2d(x, w, b, 2, 1, 1, backend="reference"), (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: depthwise_conv2d(x, w, b, 1, 2, 2, backend="reference"), (x, w, b), fast_mode=True
    )
    for act in ("none", "relu", "relu6"):
        # values away from the activation kinks (finite differences would straddle them)
        assert torch.autograd.gradcheck(
            lambda x, w, s, t: depthwise_conv2d_bn_act(x, w, s, t, 1, 1, 1, act, backend="reference"),
            (x, w, s, t),
            atol=1e-5,
            fast_mode=act != "relu6",
        )


# ----------------------------------------------------------------------------- backends vs reference


@pytest.mark.parametrize("backend,cfg", backend_configs())
def test_depthwise_conv2d_matches_reference(backend, cfg):
    """Forward (with bias) in both memory formats and every dtype: output values, dtype, format."""
    needs_triton_module(backend)
    k, s, p, d = cfg
    dtypes = KERNEL_DTYPES + ([torch.float64] if backend == "reference" else [])
    for i, layout in enumerate(("nchw", "channels_last")):
        for dtype in dtypes:
            if interpreted(backend) and layout == "channels_last" and dtype != torch.float32:
                continue  # the interpreter is slow: fp16 / bf16 in one layout
            x, w, b = make_inputs(backend, cfg, dtype, idx=i, layout=layout)
            out = depthwise_conv2d(x, w, b, s, p, d, backend=backend)
            want = ref.depthwise_conv2d_ref(x.cpu(), w.cpu(), b.cpu(), s, p, d)
            assert out.shape == want.shape and out.dtype == dtype and out.device == x.device
            assert fmt_of(out) == fmt_of(x) or out.is_contiguous(memory_format=fmt_of(x)), (layout, out.stride())
            close(out, want, dtype, f"{backend} {cfg_id(cfg)} {layout} {dtype}")


@pytest.mark.parametrize("backend,cfg", backend_configs())
def test_depthwise_conv2d_gradients_match_reference(backend, cfg):
    """grad x, weight and bias through autograd, vs the reference backend on the same inputs."""
    needs_triton_module(backend)
    k, s, p, d = cfg
    cases = [("nchw", torch.float32), ("channels_last", torch.float32)]
    cases += [("nchw", torch.bfloat16)] if k == 3 else [("channels_last", torch.float16)] if k == 5 else []
    if interpreted(backend):  # one or two cases under the (slow) interpreter
        cases = cases[1:] if cfg == (3, 1, 1, 1) else cases[1:2] if k == 1 else cases[:1]
    for i, (layout, dtype) in enumerate(cases):
        x, w, b = make_inputs(backend, cfg, dtype, idx=i, layout=layout)
        outs = {}
        for bk in (backend, "reference"):
            xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
            y = depthwise_conv2d(xr, wr, br, s, p, d, backend=bk)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(x.device)
            g = g.contiguous(memory_format=fmt_of(x))
            outs[bk] = torch.autograd.grad(y, (xr, wr, br), g)
        (gx, gw, gb), (rx, rw, rb) = outs[backend], outs["reference"]
        what = f"{backend} {cfg_id(cfg)} {layout} {dtype}"
        assert gx.shape == x.shape and gx.dtype == dtype and gw.dtype == dtype and gb.dtype == dtype
        close(gx, rx, dtype, what + " grad_x")
        close(gw, rw, dtype, what + " grad_w")
        close(gb, rb, dtype, what + " grad_b")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ["none", "relu", "relu6"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bn_act_matches_reference(backend, act, layout):
    """The fused conv + affine + activation: forward in every dtype, gradients (x, weight, scale,
    shift) in fp32 and bf16."""
    needs_triton_module(backend)
    dev = device_for(backend)
    small = interpreted(backend)
    N, C, H, W = (1, 3, 7, 5) if small else (2, 6, 11, 9)
    for dtype in KERNEL_DTYPES:
        if small and (dtype == torch.float16 or (layout == "channels_last" and dtype != torch.float32)):
            continue
        x = (torch.randn(N, C, H, W, device=dev) * 3).to(dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        w = (torch.randn(C, 1, 3, 3, device=dev) / 3).to(dtype)
        scale = torch.rand(C, device=dev) + 0.5
        shift = torch.randn(C, device=dev)
        out = depthwise_conv2d_bn_act(
            x, w, scale, shift, 2 if dtype == torch.float16 else 1, 1, 1, act, backend=backend
        )
        want = ref.depthwise_conv2d_bn_act_ref(
            x.cpu(), w.cpu(), scale.cpu(), shift.cpu(), 2 if dtype == torch.float16 else 1, 1, 1, act
        )
        assert out.dtype == dtype and out.is_contiguous(memory_format=fmt_of(x))
        close(out, want, dtype, f"{backend} {act} {layout} {dtype}")
        if act == "relu6":
            assert float(out.float().max()) == 6.0 and float(out.float().min()) == 0.0
        if dtype == torch.float16 or (small and dtype != torch.float32):
            continue
        grads = {}
        for bk in (backend, "reference"):
            ins = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
            y = depthwise_conv2d_bn_act(*ins, 1, 1, 1, act, backend=bk)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype).to(dev)
            grads[bk] = torch.autograd.grad(y, ins, g.contiguous(memory_format=fmt_of(x)))
        for name, a, r in zip(("x", "weight", "scale", "shift"), grads[backend], grads["reference"]):
            # scale / shift gradients are fp32 sums over the batch; compared at fp32-sum tolerance
            # for fp32 inputs and at the input dtype's tolerance otherwise
            close(a, r, dtype, f"{backend} {act} {layout} {dtype} grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_only_gradient(backend):
    """Only the bias requires grad: the kernel computes grad_b without grad_w."""
    needs_triton_module(backend)
    x, w, b = make_inputs(backend, (3, 1, 1, 1), torch.float32)
    b.requires_grad_()
    (gb,) = torch.autograd.grad(depthwise_conv2d(x, w, b, 1, 1, backend=backend).sum(), b)
    close(gb, torch.full_like(b, x.shape[0] * x.shape[2] * x.shape[3]).detach(), torch.float32, "grad_b")


# ----------------------------------------------------------------------------- layouts, sizes, poison


# (N, C, H, W, k, stride, padding, dilation): tiny maps (C not a multiple of 8: the CPU kernels' lanes
# mode packs 8 channels per vector), tall / wide planes (the CPU kernels' row bands) and rows wide
# enough for the channels_last kernel's blocks of four interior pixels.
PLANE_SHAPES = [
    (3, 10, 4, 4, 3, 1, 1, 1),
    (2, 10, 5, 3, 3, 2, 1, 1),
    (2, 9, 2, 2, 3, 1, 1, 1),
    (2, 10, 6, 7, 5, 1, 2, 1),
    (2, 10, 8, 8, 3, 2, 1, 1),
    (1, 2, 301, 45, 3, 1, 1, 1),
    (1, 2, 150, 260, 5, 2, 2, 1),
    (1, 1, 200, 70, 7, 1, 3, 2),
    (2, 20, 9, 13, 3, 1, 1, 1),
    (1, 19, 6, 14, 5, 2, 2, 1),  # channels_last: 4-pixel blocks, 2 vectors + a tail
    (2, 20, 7, 16, 5, 1, 2, 1),
    (1, 12, 5, 11, 5, 1, 1, 1),
    (1, 9, 4, 12, 3, 1, 0, 1),  # ... and sliding windows
    # NCHW stride 1 (blocks of 4 rows x 2 vectors, right to left, whole-vector stores that spill into
    # the next row): an odd number of vectors and 2 leftover rows; 3 leftover rows; wide rows in
    # several bands; planes too tall for lanes mode with rows narrower than a vector (a spill that
    # crosses rows), 10 planes so that two threads share them.
    (2, 3, 14, 19, 3, 1, 1, 1),
    (1, 4, 11, 33, 5, 1, 2, 1),
    (1, 3, 37, 203, 5, 1, 2, 1),
    (2, 5, 900, 3, 3, 1, 1, 1),
    (1, 2, 900, 2, 5, 1, 2, 1),
    # lanes mode at stride 1 (blocks of four outputs, the last one overlapping): 8 and 6 wide
    (2, 10, 8, 8, 3, 1, 1, 1),
    (1, 9, 8, 8, 5, 1, 2, 1),
    (2, 11, 6, 6, 3, 1, 1, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", PLANE_SHAPES, ids=lambda t: "N{}C{}_{}x{}_k{}s{}p{}d{}".format(*t))
def test_small_and_large_planes(backend, shape):
    needs_triton_module(backend)
    N, C, H, W, k, s, p, d = shape
    if interpreted(backend) and (H, W) != (2, 2):
        pytest.skip("one shape under the (slow) Triton interpreter")
    dev = device_for(backend)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(N, C, H, W, device=dev).contiguous(memory_format=layout)
        w = torch.randn(C, 1, k, k, device=dev) / k
        b = torch.randn(C, device=dev)
        outs = {}
        for bk in (backend, "reference"):
            ins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            y = depthwise_conv2d(*ins, s, p, d, backend=bk)
            g = (
                torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
                .to(dev)
                .contiguous(memory_format=layout)
            )
            outs[bk] = (y,) + torch.autograd.grad(y, ins, g)
        for name, a, r in zip(("y", "grad_x", "grad_w", "grad_b"), outs[backend], outs["reference"]):
            close(a, r, torch.float32, f"{backend} {shape} {layout} {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_path_is_the_registered_op(backend):
    """Plain eager calls skip the custom-op dispatch (the registry's eager path); they must give the registered
    op's outputs and gradients bit for bit, refuse double backward like it, and step aside under
    tracing modes (here: a dispatch mode), where the registered op runs."""
    needs_triton_module(backend)
    x, w, _ = make_inputs(backend, (3, 1, 1, 1), torch.float32)
    C, dev = x.shape[1], x.device
    scale, shift = torch.rand(C, device=dev) + 0.5, torch.randn(C, device=dev)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(7)).to(dev)
    results = []
    for path in ("public", "op"):
        ins = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift)]
        if path == "public":
            y = depthwise_conv2d_bn_act(*ins, 1, 1, 1, "relu6", backend=backend)
            assert "Eager" in type(y.grad_fn).__name__
        else:
            y = torch.ops.pycompress.depthwise_conv2d(*ins, [1, 1, 1, 1, 1, 1], 2, backend)
            assert "DepthwiseEager" not in type(y.grad_fn).__name__
        grads = torch.autograd.grad(y, ins, g, create_graph=path == "public")
        if path == "public":
            with pytest.raises(RuntimeError):
                torch.autograd.grad(grads[0].sum(), ins[0])
        results.append((y,) + tuple(t.detach() for t in grads))
    for name, a, b in zip(("y", "grad_x", "grad_w", "grad_scale", "grad_shift"), *results):
        assert torch.equal(a, b), name
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        y = depthwise_conv2d(x.detach().clone().requires_grad_(), w, None, 1, 1, backend=backend)
    assert "DepthwiseEager" not in type(y.grad_fn).__name__
    assert torch.equal(y.detach(), depthwise_conv2d(x, w, None, 1, 1, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bn_act_with_batch_statistics_is_training_batchnorm(backend):
    """Batch-statistics BN through the fused op: scale / shift computed from the batch's mean and
    biased variance of the convolution are differentiable inputs, so autograd reproduces training-
    mode BatchNorm exactly (outputs and x / weight / gamma / beta gradients) against
    relu6(batch_norm(conv(x), training=True))."""
    needs_triton_module(backend)
    dev = device_for(backend)
    N, C, H, W = (2, 3, 5, 6) if interpreted(backend) else (4, 10, 9, 11)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(N, C, H, W, generator=gen)
    w0 = torch.randn(C, 1, 3, 3, generator=gen) / 3
    g0, b0 = torch.rand(C, generator=gen) + 0.5, torch.randn(C, generator=gen) * 0.5 + 1.0
    go = torch.randn(N, C, H, W, generator=gen).to(dev)
    eps = 1e-5

    def fused(x, w, gamma, beta):
        z = depthwise_conv2d(x, w, None, 1, 1, backend=backend)
        var, mean = torch.var_mean(z, dim=(0, 2, 3), correction=0)
        scale = gamma * torch.rsqrt(var + eps)
        return depthwise_conv2d_bn_act(x, w, scale, beta - mean * scale, 1, 1, 1, "relu6", backend=backend)

    def eager(x, w, gamma, beta):
        z = F.conv2d(x, w, None, 1, 1, 1, C)
        return F.relu6(F.batch_norm(z, None, None, gamma, beta, training=True, eps=eps))

    results = []
    for fn in (fused, eager):
        ins = [t.to(dev).requires_grad_() for t in (x0, w0, g0, b0)]
        y = fn(*ins)
        results.append((y,) + torch.autograd.grad(y, ins, go))
    for name, a, r in zip(("y", "grad_x", "grad_w", "grad_gamma", "grad_beta"), *results):
        close(a, r, torch.float32, f"{backend} batch-statistics BN {name}")


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the cpu backend is not built")
@pytest.mark.parametrize("C,dtype", [(64, torch.float32), (60, torch.float32), (72, torch.bfloat16)])
def test_cpu_channels_last_large_outputs_stream(C, dtype):
    """Outputs over 8 MiB take the channels_last kernel's streaming stores (aligned rows when C is a
    multiple of 8, plain stores otherwise), forward and backward to the input."""
    H = W = 112 if dtype == torch.float32 else 144
    x = torch.randn(3, C, H, W).to(dtype).contiguous(memory_format=torch.channels_last)
    assert x.numel() * x.element_size() > 8 << 20
    w = (torch.randn(C, 1, 3, 3) / 3).to(dtype)
    b = torch.randn(C)
    out = depthwise_conv2d(x, w, b, 1, 1, backend="cpu")
    close(out, ref.depthwise_conv2d_ref(x, w, b, 1, 1), dtype, f"forward C={C} {dtype}")
    g = torch.randn(out.shape).to(dtype).contiguous(memory_format=torch.channels_last)
    gx = KERNELS.table("cpu").bwd_input(g, w, H, W, 1, 1, 1, 1, 1, 1)
    close(gx, ref.depthwise_bwd_input_ref(g, w, H, W, 1, 1, 1, 1, 1, 1), dtype, f"grad_x C={C} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["sliced", "transposed", "channels_last_sliced"])
def test_non_contiguous_inputs(backend, view):
    needs_triton_module(backend)
    dev = device_for(backend)
    base = torch.randn(*((1, 6, 9, 8) if interpreted(backend) else (2, 6, 13, 12)), device=dev)
    x = {
        "sliced": lambda t: t[:, 1:5, 1:-1, ::2],
        "transposed": lambda t: t.transpose(2, 3),
        "channels_last_sliced": lambda t: t.contiguous(memory_format=torch.channels_last)[:, :, 2:, 1:-1],
    }[view](base).requires_grad_()
    C = x.shape[1]
    w = torch.randn(C, 1, 3, 3, device=dev, requires_grad=True)
    y = depthwise_conv2d(x, w, None, 1, 1, backend=backend)
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    yr = ref.depthwise_conv2d_ref(xr, wr, None, 1, 1)
    close(y, yr, torch.float32, view)
    g = torch.randn_like(yr)
    for a, r in zip(torch.autograd.grad(y, (x, w), g.to(dev)), torch.autograd.grad(yr, (xr, wr), g.to(dev))):
        close(a, r, torch.float32, view + " grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_batch(backend):
    needs_triton_module(backend)
    dev = device_for(backend)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(0, 4, 7, 7, device=dev).contiguous(memory_format=layout).requires_grad_()
        w = torch.randn(4, 1, 3, 3, device=dev, requires_grad=True)
        b = torch.randn(4, device=dev, requires_grad=True)
        y = depthwise_conv2d(x, w, b, 2, 1, backend=backend)
        assert y.shape == (0, 4, 4, 4)
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
        assert gx.shape == x.shape and int(gw.count_nonzero()) == 0 and int(gb.count_nonzero()) == 0
        y2 = depthwise_conv2d_bn_act(x, w, torch.ones(4, device=dev), torch.zeros(4, device=dev), 1, 1, backend=backend)
        assert y2.shape == (0, 4, 7, 7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_poisoned_surroundings_are_never_read(backend, layout):
    """The input is a view into a NaN-filled buffer (a slice made contiguous by the op, and a batch
    slice that is itself contiguous with NaN batches around it), and NaN/inf sit in input columns
    that no output reads (stride 2, even width): outputs and gradients stay finite."""
    needs_triton_module(backend)
    dev = device_for(backend)
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    big = torch.full((4, 4, 14, 13), float("nan"), device=dev)
    big[1:3, :, 2:-2, 2:-2] = torch.randn(2, 4, 10, 9, device=dev)
    big = big.contiguous(memory_format=mf)
    w = torch.randn(4, 1, 3, 3, device=dev)
    for x in (
        big[1:3, :, 2:-2, 2:-2],
        big[1:3].clone().contiguous(memory_format=mf)[:, :, 2:-2, 2:-2].clone().contiguous(memory_format=mf),
    ):
        for s in (1, 2):
            out = depthwise_conv2d(x, w, None, s, 1, backend=backend)
            assert bool(torch.isfinite(out).all()), (layout, s)
    # batch slice: contiguous (no copy), NaN batches before and after in memory
    full = torch.full((4, 4, 10, 9), float("nan"), device=dev)
    full[1:3] = torch.randn(2, 4, 10, 9, device=dev)
    full = full.contiguous(memory_format=mf)
    xs = full[1:3]
    assert xs.is_contiguous(memory_format=mf) and xs.storage_offset() > 0
    out = depthwise_conv2d(xs, w, None, 1, 1, backend=backend)
    assert bool(torch.isfinite(out).all())
    close(out, ref.depthwise_conv2d_ref(xs.cpu(), w.cpu(), None, 1, 1), torch.float32, "batch slice")
    # k3 s2 p0 on width 10: Wo = 4 reads columns 0..8; column 9 holds inf / NaN
    x = torch.randn(2, 4, 9, 10, device=dev)
    x[..., 9] = float("inf")
    x[0, :, :, 9] = float("nan")
    x = x.contiguous(memory_format=mf).requires_grad_()
    wr = w.clone().requires_grad_()
    y = depthwise_conv2d(x, wr, None, 2, 0, backend=backend)
    gx, gw = torch.autograd.grad(y, (x, wr), torch.ones_like(y))
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(gw).all()) and bool(torch.isfinite(gx).all())
    clean = x.detach().clone()
    clean[..., 9] = 0
    yc = ref.depthwise_conv2d_ref(clean.cpu(), w.cpu(), None, 2, 0)
    close(y, yc, torch.float32, "unused column")


# ----------------------------------------------------------------------------- portable CPU path, determinism


KERNEL_CONFIGS = [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 3, 2), (1, 1, 0, 1), (7, 1, 2, 1)]


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("cfg", KERNEL_CONFIGS, ids=cfg_id)
def test_cpu_kernels_match_reference(cfg, layout, dtype):
    """The CPU kernels called directly (the fused scale / shift + ReLU6 forward, the input gradient,
    the fp32 weight and bias gradients) vs their references, on whichever path runs: AVX2 here, the
    portable one in test_cpu_scalar_path_matches_reference. Output strides are the reference's."""
    k, s, p, d = cfg
    kernels = KERNELS.table("cpu")
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 5, 13, 11).to(dtype).contiguous(memory_format=mf)
    w = torch.randn(5, 1, k, k).to(dtype)
    sc, sh = torch.rand(5) + 0.5, torch.randn(5)
    y = kernels.fwd(x, w, sc, sh, s, s, p, p, d, d, 2)
    yr = ref.depthwise_fwd_ref(x, w, sc, sh, s, s, p, p, d, d, 2)
    assert y.stride() == yr.stride(), (y.stride(), yr.stride())
    g = torch.randn(yr.shape).to(dtype).contiguous(memory_format=mf)
    gx = kernels.bwd_input(g, w, 13, 11, s, s, p, p, d, d)
    gxr = ref.depthwise_bwd_input_ref(g, w, 13, 11, s, s, p, p, d, d)
    gw, gb = kernels.bwd_weight(g, x, k, k, s, s, p, p, d, d, True)
    rw, rb = ref.depthwise_bwd_weight_ref(g, x, k, k, s, s, p, p, d, d, True)
    # the weight / bias gradients are fp32 sums whatever the input dtype
    assert gw.dtype == rw.dtype == torch.float32 and gb.dtype == rb.dtype == torch.float32
    # the backend contract (as every op-level test) and the kernel-level bounds (absolute atol)
    for name, a, r, dt in (
        ("fwd", y, yr, dtype),
        ("bwd_input", gx, gxr, dtype),
        ("bwd_weight grad_w", gw, rw, torch.float32),
        ("bwd_weight grad_b", gb, rb, torch.float32),
    ):
        close(a, r, dt, name)
        family = "depthwise_kernel_grad_weight" if name.startswith("bwd_weight") else "depthwise_kernel"
        assert_close(a.float(), r.float(), family, dt, msg=name)


# PYCOMPRESS_CPU_SCALAR=1, read once per process, forces the CPU kernels' portable scalar path (the
# AVX2 one runs everywhere else). Per kernel, the tests that cover it rerun, their cpu cases, in a
# fresh interpreter with the variable set: the scalar path is held to the same tolerances as the
# AVX2 path.
SCALAR_PATH = {
    "fwd": [
        "test_cpu_kernels_match_reference",
        "test_depthwise_conv2d_matches_reference",
        "test_bn_act_matches_reference",
        "test_small_and_large_planes",
        "test_non_contiguous_inputs",
        "test_poisoned_surroundings_are_never_read",
        "test_cpu_channels_last_large_outputs_stream",
    ],
    "bwd_input": [
        "test_cpu_kernels_match_reference",
        "test_depthwise_conv2d_gradients_match_reference",
        "test_bn_act_matches_reference",
        "test_small_and_large_planes",
        "test_cpu_channels_last_large_outputs_stream",
    ],
    "bwd_weight": [
        "test_cpu_kernels_match_reference",
        "test_depthwise_conv2d_gradients_match_reference",
        "test_bn_act_matches_reference",
        "test_small_and_large_planes",
        "test_bias_only_gradient",
        "test_cpu_weight_gradient_is_deterministic",
    ],
}


# Every kernel's scalar path against the reference (tests.helpers.scalar_path_tests).
test_scalar_path_covers_every_kernel, scalar_path_run, test_cpu_scalar_path_matches_reference = scalar_path_tests(
    __file__, SCALAR_PATH, KERNELS, "cpu" in BACKENDS
)


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_weight_gradient_is_deterministic(layout):
    """The weight / bias sums do not depend on the thread count."""
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, 20, 15, 13).contiguous(memory_format=mf)
    g = torch.randn(3, 20, 15, 13).contiguous(memory_format=mf)
    bw = KERNELS.table("cpu").bwd_weight
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(bw(g, x, 3, 3, 1, 1, 1, 1, 1, 1, True))
    finally:
        torch.set_num_threads(threads)
    for gw, gb in results[1:]:
        assert torch.equal(gw, results[0][0]) and torch.equal(gb, results[0][1])


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    needs_triton_module(backend)
    dev = device_for(backend)
    op = torch.ops.pycompress.depthwise_conv2d.default
    x = torch.randn(1, 2, 5, 4, device=dev, requires_grad=True)
    w = torch.randn(2, 1, 3, 3, device=dev, requires_grad=True)
    s = torch.rand(2, device=dev, requires_grad=True)
    t = torch.randn(2, device=dev, requires_grad=True)
    e = torch.empty(0, device=dev)
    torch.library.opcheck(op, (x, w, s, t, [2, 1, 1, 1, 1, 2], 2, backend))
    if interpreted(backend):
        return  # one call under the (slow) interpreter
    torch.library.opcheck(op, (x, w, e, t, [1, 1, 1, 1, 1, 1], 0, backend))
    xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(op, (xc, w, s, e, [1, 2, 2, 1, 2, 1], 1, backend))
    # The backward op on inputs whose grad_x format is not grad_out's: a channels_last x with a 1x1
    # output (grad_out is then contiguous in both formats) and a permuted (dense, neither format) x.
    bwd = torch.ops.pycompress.depthwise_conv2d_backward.default
    x3 = torch.randn(2, 4, 3, 3, device=dev).contiguous(memory_format=torch.channels_last)
    w3 = torch.randn(4, 1, 3, 3, device=dev)
    g1 = torch.randn(2, 4, 1, 1, device=dev)
    xp = torch.randn(2, 6, 5, 4, device=dev).permute(0, 3, 2, 1)  # [2, 4, 5, 6], dense, permuted
    wp = torch.randn(4, 1, 3, 3, device=dev)
    gp = torch.randn(2, 4, 5, 6, device=dev)
    for xx, ww, gg in ((x3, w3, g1), (xp, wp, gp)):
        for act, sc in ((0, e), (2, torch.rand(4, device=dev))):
            args = (
                gg,
                xx,
                ww,
                sc,
                e,
                [1, 1, 1 if xx is xp else 0, 1 if xx is xp else 0, 1, 1],
                act,
                backend,
                [True, True, False, False],
            )
            torch.library.opcheck(bwd, args)
            gx = bwd(*args)[0]
            assert gx.stride() == torch.empty_like(xx, memory_format=_format(xx)).stride()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
def test_opcheck_cpp_kernels():
    ops = torch.ops.pycompress
    x = torch.randn(2, 3, 7, 6)
    w = torch.randn(3, 1, 3, 3)
    s, t, e = torch.rand(3), torch.randn(3), torch.empty(0)
    for xx in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops._depthwise_fwd.default, (xx, w, s, t, 1, 1, 1, 1, 1, 1, 2))
        torch.library.opcheck(ops._depthwise_fwd.default, (xx, w, e, e, 2, 2, 0, 1, 1, 1, 0))
        g = ops._depthwise_fwd(xx, w, e, e, 2, 1, 1, 1, 1, 1, 0)
        torch.library.opcheck(ops._depthwise_bwd_input.default, (g, w, 7, 6, 2, 1, 1, 1, 1, 1))
        torch.library.opcheck(ops._depthwise_bwd_weight.default, (g, xx, 3, 3, 2, 1, 1, 1, 1, 1, True))
        torch.library.opcheck(ops._depthwise_bwd_weight.default, (g, xx, 3, 3, 2, 1, 1, 1, 1, 1, False))


@pytest.mark.skipif("cpu" not in BACKENDS, reason="extension not built")
def test_cpp_kernels_check_memory_safety():
    ops = torch.ops.pycompress
    x, w, e = torch.randn(2, 3, 7, 6), torch.randn(3, 1, 3, 3), torch.empty(0)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops._depthwise_fwd(x, torch.randn(4, 1, 3, 3), e, e, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="odd sizes in 1..7"):
        ops._depthwise_fwd(x, torch.randn(3, 1, 9, 9), e, e, 1, 1, 4, 4, 1, 1, 0)
    with pytest.raises(RuntimeError, match="scale must have 0 or C"):
        ops._depthwise_fwd(x, w, torch.ones(2), e, 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="shift must be float32"):
        ops._depthwise_fwd(x, w, e, torch.ones(3, dtype=torch.float64), 1, 1, 1, 1, 1, 1, 0)
    with pytest.raises(RuntimeError, match="act must be"):
        ops._depthwise_fwd(x, w, e, e, 1, 1, 1, 1, 1, 1, 3)
    with pytest.raises(RuntimeError, match="output would be empty"):
        ops._depthwise_fwd(x, w, e, e, 1, 1, 0, 0, 4, 4, 0)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        ops._depthwise_bwd_input(torch.randn(2, 3, 7, 5), w, 7, 6, 1, 1, 1, 1, 1, 1)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        ops._depthwise_bwd_weight(torch.randn(2, 3, 6, 6), x, 3, 3, 1, 1, 1, 1, 1, 1, True)
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops._depthwise_fwd(x.double(), w.double(), e, e, 1, 1, 1, 1, 1, 1, 0)


# ----------------------------------------------------------------------------- bad input


def _x(*shape, **kw):
    return torch.randn(*(shape or (2, 4, 8, 8)), **kw)


@pytest.mark.parametrize(
    "call,err,words",
    [
        (lambda: depthwise_conv2d(_x(), torch.randn(8, 1, 3, 3)), ValueError, "weight must be [C, 1, k, k]"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 2, 3, 3)), ValueError, "channel multiplier 1"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 4, 4)), ValueError, "kernel must be square with an odd"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 5)), ValueError, "kernel must be square"),
        (lambda: depthwise_conv2d(_x(2, 4, 12, 12), torch.randn(4, 1, 9, 9)), ValueError, "got 9x9"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), stride=3), ValueError, "stride must be one of"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), stride=(1, 3)), ValueError, "stride"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), padding=-1), ValueError, "padding must be >= 0"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), dilation=0), ValueError, "dilation must be >= 1"),
        (
            lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), padding=(1, 1 << 25)),
            ValueError,
            "padding and dilation must be at most 2**24",
        ),
        (
            lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), padding=1 << 30, dilation=1 << 29),
            ValueError,
            "padding and dilation must be at most",
        ),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), padding=1.5), TypeError, "padding must be an int"),
        (
            lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3, dtype=torch.float16)),
            TypeError,
            "weight has dtype torch.float16",
        ),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3, device="meta")), ValueError, "weight is on meta"),
        (lambda: depthwise_conv2d(_x(4, 8, 8), torch.randn(4, 1, 3, 3)), ValueError, "x must be 4-D"),
        (lambda: depthwise_conv2d(_x(2, 4, 2, 2), torch.randn(4, 1, 5, 5)), ValueError, "output would be empty"),
        (
            lambda: depthwise_conv2d(
                torch.ones(2, 4, 8, 8, dtype=torch.int32), torch.ones(4, 1, 3, 3, dtype=torch.int32)
            ),
            TypeError,
            "x must be a floating-point",
        ),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), torch.randn(5)), ValueError, "bias must be 1-D"),
        (lambda: depthwise_conv2d(_x(), torch.randn(4, 1, 3, 3), backend="fastest"), ValueError, "backend"),
        (
            lambda: depthwise_conv2d_bn_act(_x(), torch.randn(4, 1, 3, 3), torch.ones(4), torch.zeros(4), act="gelu"),
            ValueError,
            "act must be one of",
        ),
        (
            lambda: depthwise_conv2d_bn_act(_x(), torch.randn(4, 1, 3, 3), torch.ones(3), torch.zeros(4)),
            ValueError,
            "scale must be 1-D with C = 4",
        ),
        (
            lambda: depthwise_conv2d_bn_act(_x(), torch.randn(4, 1, 3, 3), torch.ones(4), torch.zeros(4, 1)),
            ValueError,
            "shift must be 1-D",
        ),
        (
            lambda: depthwise_conv2d_bn_act(
                _x(), torch.randn(4, 1, 3, 3), torch.ones(4), torch.zeros(4, device="meta")
            ),
            ValueError,
            "shift is on meta",
        ),
    ],
)
def test_bad_input_is_refused(call, err, words):
    with pytest.raises(err) as info:
        call()
    assert words in str(info.value), str(info.value)


def test_explicit_backend_never_falls_back():
    x, w = _x(), torch.randn(4, 1, 3, 3)
    with pytest.raises(backends.BackendError, match="cuda"):
        depthwise_conv2d(x, w, backend="cuda")
    if "cpu" in BACKENDS:
        with pytest.raises(backends.BackendError, match="float64"):
            depthwise_conv2d(x.double(), w.double(), backend="cpu")
        with pytest.raises(backends.BackendError, match="float64"):
            depthwise_conv2d_bn_act(x.double(), w.double(), torch.ones(4), torch.zeros(4), backend="cpu")
    if not INTERPRETED and not torch.cuda.is_available():
        with pytest.raises(backends.BackendError, match="triton"):
            depthwise_conv2d(x, w, backend="triton")
    # auto picks a backend that runs, fp64 goes to the reference
    torch.testing.assert_close(
        depthwise_conv2d(x.double(), w.double(), None, 1, 1), F.conv2d(x.double(), w.double(), None, 1, 1, 1, 4)
    )


# ----------------------------------------------------------------------------- GPU (larger shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in BACKENDS])
class TestLargeOnGPU:
    @pytest.mark.parametrize("layout", ["nchw", "channels_last"])
    @pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=str)
    @pytest.mark.parametrize("cfg", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 1, 2, 1), (7, 2, 3, 2)], ids=cfg_id)
    def test_large_fwd_bwd(self, backend, layout, dtype, cfg):
        needs_triton_module(backend)
        k, s, p, d = cfg
        mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(8, 64, 56, 56, device="cuda").to(dtype).contiguous(memory_format=mf)
        w = (torch.randn(64, 1, k, k, device="cuda") / k).to(dtype)
        b = torch.randn(64, device="cuda").to(dtype)
        outs = {}
        for bk in (backend, "reference"):
            ins = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            y = depthwise_conv2d(*ins, s, p, d, backend=bk)
            g = torch.randn(y.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).to(dtype)
            outs[bk] = (y,) + torch.autograd.grad(y, ins, g.contiguous(memory_format=mf))
        for name, a, r in zip(("y", "grad_x", "grad_w", "grad_b"), outs[backend], outs["reference"]):
            close(a, r, dtype, f"{backend} {cfg_id(cfg)} {layout} {dtype} {name}")
        assert outs[backend][0].is_contiguous(memory_format=mf)

    def test_perf_shape_and_fused(self, backend):
        """PERF.md's shape (N128 C256 56x56) forward, and the fused BN + ReLU6."""
        needs_triton_module(backend)
        x = torch.randn(128, 256, 56, 56, device="cuda")
        w = torch.randn(256, 1, 3, 3, device="cuda") / 3
        scale, shift = torch.rand(256, device="cuda") + 0.5, torch.randn(256, device="cuda")
        close(
            depthwise_conv2d(x, w, None, 1, 1, backend=backend),
            F.conv2d(x, w, None, 1, 1, 1, 256),
            torch.float32,
            "perf shape",
        )
        close(
            depthwise_conv2d_bn_act(x, w, scale, shift, 1, 1, 1, "relu6", backend=backend),
            ref.depthwise_conv2d_bn_act_ref(x, w, scale, shift, 1, 1, 1, "relu6"),
            torch.float32,
            "fused",
        )
        xc = x[:16].contiguous(memory_format=torch.channels_last)
        close(
            depthwise_conv2d(xc, w, None, 2, 1, backend=backend),
            F.conv2d(xc, w, None, 2, 1, 1, 256),
            torch.float32,
            "channels_last stride 2",
        )

    @pytest.mark.parametrize("shape", [(128, 256, 2, 2), (128, 256, 4, 4), (128, 128, 8, 8), (3, 5, 1, 1)], ids=str)
    def test_small_maps(self, backend, shape):
        needs_triton_module(backend)
        x = torch.randn(*shape, device="cuda", requires_grad=True)
        w = torch.randn(shape[1], 1, 3, 3, device="cuda", requires_grad=True)
        y = depthwise_conv2d(x, w, None, 1, 1, backend=backend)
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        yr = ref.depthwise_conv2d_ref(xr, wr, None, 1, 1)
        close(y, yr, torch.float32, "small map")
        g = torch.randn_like(yr)
        for a, r in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(yr, (xr, wr), g)):
            close(a, r, torch.float32, "small map grad")

    def test_weight_gradient_is_deterministic(self, backend):
        if backend != "cuda":
            pytest.skip("determinism is promised by the cuda kernels")
        x = torch.randn(16, 32, 28, 28, device="cuda")
        g = torch.randn(16, 32, 28, 28, device="cuda")
        bw = KERNELS.table("cuda").bwd_weight
        first = bw(g, x, 3, 3, 1, 1, 1, 1, 1, 1, True)
        for _ in range(3):
            again = bw(g, x, 3, 3, 1, 1, 1, 1, 1, 1, True)
            assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
