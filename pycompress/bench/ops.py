"""`pycompress bench ops`: microbenchmarks of every op in every available backend.

For each case the table gives the backend, shape, dtype, median time, achieved GB/s (counted
bytes / time), that bandwidth as a fraction of a device copy of the same tensor measured in the
same run, and the speedup over the stock torch op timed in the same run. Before a backend is timed
its output (and gradients) are checked against the reference backend on the same inputs, within
the tolerances of pycompress.testing.TOLERANCES (the table the op tests use); a mismatch marks the
row FAILED and the command exits non-zero.

Bytes counted per element (PERF.md): forward = read x + write out; forward + backward =
16 B/elem in fp32 (x, out, grad_out, grad_x), whatever extra the implementation moves. Sparse
masks: apply = read w + read 1/8 B of mask + write out; pack = read 1 B + write 1/8 B; masked SGD
step = read p, g, buf and the mask + write p, buf. Depthwise convolution: forward = read x + write
out per output element (the weights, C x k x k, are not counted); forward + backward = 4 tensors of
the output's size (x, out, grad_out, grad_x: 16 B/elem in fp32, as PERF.md), although the weight
gradient re-reads x and grad_out. The depthwise cases have fixed layer shapes (PERF.md's: N128 C256
56x56 on the GPU, N32 C128 28x28 on the CPU, and two MobileNet-student layers); --size does not
change them.

Cases whose op mutates its inputs (in-place apply, the SGD step) are timed on one set of inputs
whose state evolves from call to call the same way for every backend (idempotent masking; SGD
steps with a small learning rate), and checked on fresh copies: the reference and each backend
run once from identical state and their outputs are compared.

On the CPU, glibc's heap is kept warm (see _warm_heap; --cold-heap turns it off) so that the
numbers compare kernels rather than page faults on freshly mapped outputs.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
import time
from typing import Callable, Optional

import torch

from .. import backends
from ..ops import apply_mask, fake_quantize, masked_sgd_step, pack_mask
from ..ops.depthwise import depthwise_conv2d, depthwise_conv2d_bn_act
from ..ops.fake_quantize import value_checks
from ..ops.sparse_mask_ref import pack_mask_ref
from ..testing import mismatch

DEFAULT_CPU_SIZE = 16 * 2**20  # PERF.md's CPU table
DEFAULT_GPU_SIZE = 2**28  # 268M elements: a few GB, well past every cache
GPU_CHANNELS = 4096
CPU_CHANNELS = 4096


@dataclasses.dataclass
class Row:
    op: str
    case: str
    backend: str
    shape: str
    dtype: str
    median_ms: float
    gbps: float
    frac_copy: float
    speedup_vs_torch: Optional[float]
    check: str


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, min_reps: int = 5, budget_s: float = 1.0) -> float:
    """Median wall time in ms: CUDA events via triton.testing.do_bench on GPU, perf_counter on CPU."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=200, return_mode="median"))
        except ImportError:
            pass
    fn()  # warm-up (allocations, first-call dispatch)
    _sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@dataclasses.dataclass
class Case:
    """One benchmark case: how to run it with a backend, with torch, and how many bytes it moves."""

    op: str
    name: str
    shape: tuple
    dtype: torch.dtype
    bytes_per_elem: float
    make: Callable[[], dict]  # inputs
    run: Callable[[dict, str], object]  # (inputs, backend) -> output (tensor or tuple)
    torch_run: Optional[Callable[[dict], object]]
    copy_key: str = "x"  # the input whose device copy is the bandwidth yardstick
    # For ops that mutate their inputs: a copy of the inputs in the same state, used to check the
    # reference and each backend from identical state (the timed calls share `make()`'s inputs).
    fresh: Optional[Callable[[dict], dict]] = None
    # The tolerance families (pycompress.testing.TOLERANCES) its outputs are checked with against
    # the reference, in output order; outputs past the end use the last family. The default is
    # fake_quantize's: output and grad_x bit for bit, scale / zero-point gradients (sums over
    # millions of elements) within fake_quantize_lsq_large.
    families: tuple = ("fake_quantize", "fake_quantize", "fake_quantize_lsq_large")


def _fq_cases(device: torch.device, n: int, dtype: torch.dtype) -> list[Case]:
    es = torch.empty((), dtype=dtype).element_size()
    channels = GPU_CHANNELS if device.type == "cuda" else CPU_CHANNELS
    rows = max(1, n // channels)
    qmin, qmax = 0, 255

    fb_n = n // 4 if device.type == "cuda" else n  # PERF.md: fwd+bwd rows at 67M on the GPU
    rows_fb = max(1, fb_n // channels)

    def inputs(shape, per_channel: bool, learnable: bool = False, grad: bool = False) -> Callable[[], dict]:
        """A maker of one case's inputs: x of `shape` (never zeros: a realistic spread with a few
        percent clamped), a per-tensor or per-channel (axis 0) scale and zero point, and for
        backward cases x requiring grad plus an upstream gradient g."""

        def make():
            x = (torch.randn(shape, device=device) * 2.5).to(dtype)
            c = (channels,) if per_channel else (1,)
            if learnable:
                scale = (torch.rand(c, device=device) * 0.02 + 0.01).requires_grad_()
                zp = torch.randint(100, 156, c, device=device).float().requires_grad_()
            elif per_channel:
                scale = torch.rand(c, device=device) * 0.02 + 0.01
                zp = torch.randint(100, 156, c, device=device, dtype=torch.int32)
            else:
                scale, zp = 0.02, 128
            inp = {"x": x, "scale": scale, "zp": zp}
            if grad:
                inp["x"].requires_grad_()
                inp["g"] = torch.randn_like(x)
            return inp

        return make

    def fwd(inp, backend):
        axis = None if isinstance(inp["scale"], float) else 0
        return fake_quantize(inp["x"], inp["scale"], inp["zp"], qmin, qmax, axis, backend=backend)

    def torch_fwd(inp):
        if isinstance(inp["scale"], float):
            return torch.fake_quantize_per_tensor_affine(inp["x"], inp["scale"], inp["zp"], qmin, qmax)
        return torch.fake_quantize_per_channel_affine(inp["x"], inp["scale"], inp["zp"], 0, qmin, qmax)

    def fwd_bwd(inp, backend):
        out = fwd(inp, backend)
        return (out.detach(),) + torch.autograd.grad(out, inp["x"], inp["g"])

    def torch_fwd_bwd(inp):
        return torch.autograd.grad(torch_fwd(inp), inp["x"], inp["g"])

    def lsq(inp, backend):
        axis = 0 if inp["scale"].numel() > 1 else None
        s = inp["scale"] if axis is not None else inp["scale"].reshape(())
        z = inp["zp"] if axis is not None else inp["zp"].reshape(())
        out = fake_quantize(inp["x"], s, z, qmin, qmax, axis, backend=backend)
        return (out.detach(),) + torch.autograd.grad(out, (inp["x"], inp["scale"], inp["zp"]), inp["g"])

    def torch_lsq(inp):
        if inp["scale"].numel() > 1:
            out = torch._fake_quantize_learnable_per_channel_affine(
                inp["x"], inp["scale"], inp["zp"], 0, qmin, qmax, 1.0
            )
        else:
            out = torch._fake_quantize_learnable_per_tensor_affine(inp["x"], inp["scale"], inp["zp"], qmin, qmax, 1.0)
        return torch.autograd.grad(out, (inp["x"], inp["scale"], inp["zp"]), inp["g"])

    # torch's CPU kernels lack fp16/bf16; its fwd+bwd baselines are timed in fp32 only
    torch_fwd_ok = torch_fwd if dtype == torch.float32 or device.type == "cuda" else None
    fp32_only = dtype == torch.float32
    ch = f"({channels} ch)"
    pt, pc, pt_fb, pc_fb = (n,), (channels, rows), (fb_n,), (channels, rows_fb)
    return [
        Case("fake_quantize", "fwd per-tensor", pt, dtype, 2 * es, inputs(pt, False), fwd, torch_fwd_ok),
        Case("fake_quantize", f"fwd per-channel {ch}", pc, dtype, 2 * es, inputs(pc, True), fwd, torch_fwd_ok),
        Case(
            "fake_quantize",
            "fwd+bwd per-tensor",
            pt_fb,
            dtype,
            4 * es,
            inputs(pt_fb, False, grad=True),
            fwd_bwd,
            torch_fwd_bwd if fp32_only else None,
        ),
        Case(
            "fake_quantize",
            f"fwd+bwd per-channel {ch}",
            pc_fb,
            dtype,
            4 * es,
            inputs(pc_fb, True, grad=True),
            fwd_bwd,
            torch_fwd_bwd if fp32_only else None,
        ),
        Case(
            "fake_quantize",
            "fwd+bwd learnable per-tensor",
            pt_fb,
            dtype,
            4 * es,
            inputs(pt_fb, False, True, True),
            lsq,
            torch_lsq if fp32_only else None,
        ),
        Case(
            "fake_quantize",
            f"fwd+bwd learnable per-channel {ch}",
            pc_fb,
            dtype,
            4 * es,
            inputs(pc_fb, True, True, True),
            lsq,
            torch_lsq if fp32_only else None,
        ),
    ]


# Conv / linear weight shapes of realistic layers for the fused SGD step: many small tensors
# (launch and per-tensor overhead) as well as a few large ones.
_RESNET18 = (
    [(64, 3, 7, 7)]
    + [(64, 64, 3, 3)] * 4
    + [(128, 64, 3, 3), (128, 128, 3, 3), (128, 64, 1, 1), (128, 128, 3, 3), (128, 128, 3, 3)]
    + [(256, 128, 3, 3), (256, 256, 3, 3), (256, 128, 1, 1), (256, 256, 3, 3), (256, 256, 3, 3)]
    + [(512, 256, 3, 3), (512, 512, 3, 3), (512, 256, 1, 1), (512, 512, 3, 3), (512, 512, 3, 3)]
    + [(1000, 512)]
)
_RESNET20 = (
    [(16, 3, 3, 3)]
    + [(16, 16, 3, 3)] * 6
    + [(32, 16, 3, 3)]
    + [(32, 32, 3, 3)] * 5
    + [(64, 32, 3, 3)]
    + [(64, 64, 3, 3)] * 5
    + [(10, 64)]
)

SGD_LR, SGD_MOMENTUM, SGD_WD = 1e-3, 0.9, 5e-4  # small lr: the timed steps keep the values in range


def _sm_cases(device: torch.device, n: int, dtype: torch.dtype) -> list[Case]:
    """Bit-packed sparse masks: apply (out of place, in place), pack, and the fused masked SGD step
    (one roofline tensor and realistic lists of layers) against the stock torch equivalents:
    ``w * float_mask`` (out of place), ``w.mul_(float_mask)`` (in place) and
    ``torch.optim.SGD(foreach=True).step()`` + ``p.mul_(float_mask)``."""
    es = torch.empty((), dtype=dtype).element_size()
    keep_frac = 0.5  # unstructured pruning at 50%: no all-kept or all-pruned words to shortcut

    def masks(shape):
        keep = torch.rand(shape, device=device) < keep_frac
        return keep, pack_mask_ref(keep), keep.to(dtype)

    def apply_inputs(shape):
        def make():
            w = torch.randn(shape, device=device).to(dtype)
            keep, packed, fmask = masks(shape)
            # the torch baseline masks its own copy in place (w must stay unmasked for the check)
            return {"w": w, "w_inplace": w.clone(), "w_torch": w.clone(), "packed": packed, "fmask": fmask}

        return make

    def apply_fresh(inp):
        return {**inp, "w_inplace": inp["w"].clone()}

    def sgd_inputs(shapes):
        """params with momentum buffers already in their steady state (not the first step), their
        grads and masks, and the torch copies: Parameters with .grad and a foreach SGD optimizer
        that has taken one step."""

        def make():
            ps, gs, bs, pks, fms = [], [], [], [], []
            for s in shapes:
                _, packed, fmask = masks(s)
                ps.append(torch.randn(s, device=device).to(dtype).mul_(fmask))
                gs.append(torch.randn(s, device=device).to(dtype))
                bs.append(torch.randn(s, device=device).to(dtype).mul_(fmask))
                pks.append(packed)
                fms.append(fmask)
            tp = [torch.nn.Parameter(p.clone()) for p in ps]
            for p, g in zip(tp, gs):
                p.grad = g.clone()
            opt = torch.optim.SGD(tp, lr=SGD_LR, momentum=SGD_MOMENTUM, weight_decay=SGD_WD, foreach=True)
            opt.step()  # creates the buffers: the timed steps are steady-state ones
            # the copy yardstick: one tensor of all the elements (for a list, not its first tensor)
            flat = ps[0] if len(ps) == 1 else torch.randn(sum(p.numel() for p in ps), device=device).to(dtype)
            return {
                "flat": flat,
                "params": ps,
                "grads": gs,
                "bufs": bs,
                "packed": pks,
                "fmasks": fms,
                "torch_params": tp,
                "opt": opt,
            }

        return make

    def sgd_fresh(inp):
        return {**inp, "params": [p.clone() for p in inp["params"]], "bufs": [b.clone() for b in inp["bufs"]]}

    def apply(inp, backend):
        return apply_mask(inp["w"], inp["packed"], backend=backend)

    def apply_inplace(inp, backend):
        return apply_mask(inp["w_inplace"], inp["packed"], inplace=True, backend=backend)

    def torch_apply(inp):
        return inp["w_torch"].mul_(inp["fmask"])

    def torch_apply_out(inp):
        return inp["w"] * inp["fmask"]

    def pack(inp, backend):
        return pack_mask(inp["mask"], backend=backend)

    def pack_make(shape):
        def make():
            keep = torch.rand(shape, device=device) < keep_frac
            return {"mask": keep}

        return make

    def sgd(inp, backend):
        masked_sgd_step(
            inp["params"],
            inp["grads"],
            inp["bufs"],
            inp["packed"],
            lr=SGD_LR,
            momentum=SGD_MOMENTUM,
            weight_decay=SGD_WD,
            backend=backend,
        )
        return tuple(inp["params"]) + tuple(inp["bufs"])

    def torch_sgd(inp):
        inp["opt"].step()
        with torch.no_grad():
            torch._foreach_mul_(inp["torch_params"], inp["fmasks"])

    exact = ("sparse_mask",)  # bit for bit (the packed mask: equal bytes)
    sgd_tol = ("masked_sgd_step",)
    flat = (n,)
    cases = [
        Case(
            "apply_mask",
            "apply_mask",
            flat,
            dtype,
            2 * es + 1 / 8,
            apply_inputs(flat),
            apply,
            torch_apply_out,
            copy_key="w",
            families=exact,
        ),
        Case(
            "apply_mask",
            "apply_mask inplace",
            flat,
            dtype,
            2 * es + 1 / 8,
            apply_inputs(flat),
            apply_inplace,
            torch_apply,
            copy_key="w",
            fresh=apply_fresh,
            families=exact,
        ),
        Case(
            "masked_sgd_step",
            "masked_sgd_step momentum 0.9 + wd",
            flat,
            dtype,
            5 * es + 1 / 8,
            sgd_inputs([flat]),
            sgd,
            torch_sgd,
            copy_key="flat",
            fresh=sgd_fresh,
            families=sgd_tol,
        ),
    ]
    if dtype == torch.float32:  # dtype-free: listed once, with the fp32 cases
        cases.append(
            Case(
                "pack_mask",
                "pack_mask",
                flat,
                torch.bool,
                1 + 1 / 8,
                pack_make(flat),
                pack,
                lambda inp: pack_mask_ref(inp["mask"]),
                copy_key="mask",
                families=exact,
            )
        )
    for name, shapes in (("ResNet-18", _RESNET18), ("CIFAR ResNet-20", _RESNET20)):
        total = sum(math.prod(s) for s in shapes)
        cases.append(
            Case(
                "masked_sgd_step",
                f"masked_sgd_step {name} weights ({len(shapes)} tensors)",
                (total,),
                dtype,
                5 * es + 1 / 8,
                sgd_inputs(shapes),
                sgd,
                torch_sgd,
                copy_key="flat",
                fresh=sgd_fresh,
                families=sgd_tol,
            )
        )
    return cases


# Depthwise backend vs reference: both accumulate in fp32 in different orders and round once to the
# dtype; the depthwise family's atol grows with the largest |expected| of each output (the weight
# gradient's sums over N * H * W terms), as in tests/ops/test_depthwise.py.
_DW_TOL = ("depthwise",)


def _dw_cases(device: torch.device, n: int, dtype: torch.dtype) -> list[Case]:
    """Depthwise convolution (``n`` is ignored: fixed layer shapes). Torch baseline:
    ``F.conv2d(groups=C)`` (cuDNN / oneDNN / native), with autograd for forward + backward; the fused
    conv + BN(eval, folded into scale / shift) + ReLU6 against the eager chain
    ``relu6(batch_norm(conv(x)))`` and, on the GPU, against ``torch.compile`` of that chain."""
    import torch.nn.functional as F

    es = torch.empty((), dtype=dtype).element_size()
    gpu = device.type == "cuda"
    N, C, H = (128, 256, 56) if gpu else (32, 128, 28)

    def inputs(shape, k=3, channels_last=False, grad=False, bn=False):
        def make():
            c = shape[1]
            x = torch.randn(shape, device=device).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            w = (torch.randn(c, 1, k, k, device=device) / k).to(dtype)
            inp = {"x": x, "w": w}
            if grad:
                inp["xg"] = x.detach().clone().requires_grad_()
                inp["wg"] = w.detach().clone().requires_grad_()
                inp["g"] = torch.randn(shape, device=device).to(dtype)
            if bn:
                mean, var = torch.randn(c, device=device) * 0.1, torch.rand(c, device=device) + 0.5
                gamma, beta, eps = torch.rand(c, device=device) + 0.5, torch.randn(c, device=device) * 0.1, 1e-5
                scale = gamma / torch.sqrt(var + eps)
                inp.update(
                    mean=mean.to(dtype),
                    var=var.to(dtype),
                    gamma=gamma.to(dtype),
                    beta=beta.to(dtype),
                    eps=eps,
                    scale=scale,
                    shift=beta - mean * scale,
                )
            return inp

        return make

    def fwd(inp, backend):
        k = inp["w"].shape[-1]
        return depthwise_conv2d(inp["x"], inp["w"], None, 1, k // 2, backend=backend)

    def torch_fwd(inp):
        k = inp["w"].shape[-1]
        return F.conv2d(inp["x"], inp["w"], None, 1, k // 2, 1, inp["x"].shape[1])

    def fwd_bwd(inp, backend):
        y = depthwise_conv2d(inp["xg"], inp["wg"], None, 1, 1, backend=backend)
        return (y.detach(),) + torch.autograd.grad(y, (inp["xg"], inp["wg"]), inp["g"])

    def torch_fwd_bwd(inp):
        y = F.conv2d(inp["xg"], inp["wg"], None, 1, 1, 1, inp["xg"].shape[1])
        return torch.autograd.grad(y, (inp["xg"], inp["wg"]), inp["g"])

    def fused(inp, backend):
        return depthwise_conv2d_bn_act(
            inp["x"], inp["w"], inp["scale"], inp["shift"], 1, 1, 1, "relu6", backend=backend
        )

    def eager_chain(x, w, mean, var, gamma, beta, eps):
        z = F.conv2d(x, w, None, 1, 1, 1, x.shape[1])
        return F.relu6(F.batch_norm(z, mean, var, gamma, beta, False, 0.0, eps))

    def torch_fused(inp):
        return eager_chain(inp["x"], inp["w"], inp["mean"], inp["var"], inp["gamma"], inp["beta"], inp["eps"])

    compiled = {}

    def torch_fused_compiled(inp):
        # compiled once, lazily; any failure makes the baseline "unavailable" (a RuntimeError)
        if "fn" not in compiled:
            try:
                fn = torch.compile(eager_chain)
                torch_fused(inp)  # eager warm-up
                fn(inp["x"], inp["w"], inp["mean"], inp["var"], inp["gamma"], inp["beta"], inp["eps"])
                compiled["fn"] = fn
            except Exception as exc:  # noqa: BLE001 - reported as an unavailable baseline
                compiled["fn"] = None
                compiled["error"] = f"torch.compile of the eager chain failed: {type(exc).__name__}: {exc}"
        if compiled["fn"] is None:
            raise RuntimeError(compiled["error"])
        return compiled["fn"](inp["x"], inp["w"], inp["mean"], inp["var"], inp["gamma"], inp["beta"], inp["eps"])

    big = (N, C, H, H)
    student = [(128, 128, 8, 8), (128, 256, 4, 4)]
    op = "depthwise_conv2d"  # the registered op: backends.available() is asked about it
    chain = "3x3 + BN(eval) + ReLU6 fused fwd vs"
    cases = [
        Case(op, "3x3 fwd NCHW", big, dtype, 2 * es, inputs(big), fwd, torch_fwd, families=_DW_TOL),
        Case(
            op,
            "3x3 fwd channels_last",
            big,
            dtype,
            2 * es,
            inputs(big, channels_last=True),
            fwd,
            torch_fwd,
            families=_DW_TOL,
        ),
        Case(
            op, "3x3 fwd+bwd NCHW", big, dtype, 4 * es, inputs(big, grad=True), fwd_bwd, torch_fwd_bwd, families=_DW_TOL
        ),
        Case(
            op,
            "3x3 fwd+bwd channels_last",
            big,
            dtype,
            4 * es,
            inputs(big, channels_last=True, grad=True),
            fwd_bwd,
            torch_fwd_bwd,
            families=_DW_TOL,
        ),
        Case(
            op, f"{chain} eager chain", big, dtype, 2 * es, inputs(big, bn=True), fused, torch_fused, families=_DW_TOL
        ),
    ]
    if gpu:
        cases.append(
            Case(
                op,
                f"{chain} torch.compile chain",
                big,
                dtype,
                2 * es,
                inputs(big, bn=True),
                fused,
                torch_fused_compiled,
                families=_DW_TOL,
            )
        )
    cases.append(Case(op, "5x5 fwd NCHW", big, dtype, 2 * es, inputs(big, k=5), fwd, torch_fwd, families=_DW_TOL))
    cases.append(
        Case(
            op,
            "5x5 fwd channels_last",
            big,
            dtype,
            2 * es,
            inputs(big, k=5, channels_last=True),
            fwd,
            torch_fwd,
            families=_DW_TOL,
        )
    )
    for shape in student:
        cases.append(
            Case(
                op,
                f"3x3 fwd+bwd NCHW MobileNet-student layer {shape[2]}x{shape[3]}",
                shape,
                dtype,
                4 * es,
                inputs(shape, grad=True),
                fwd_bwd,
                torch_fwd_bwd,
                families=_DW_TOL,
            )
        )
    return cases


OPS = {"fake_quantize": _fq_cases, "sparse_mask": _sm_cases, "depthwise": _dw_cases}


def _as_tuple(v):
    return v if isinstance(v, tuple) else (v,)


def _check(got, want, families: tuple) -> str:
    """ "ok", or "FAILED: ..." naming the first output that differs from the reference beyond its
    tolerance family (pycompress.testing)."""
    got, want = _as_tuple(got), _as_tuple(want)
    if len(got) != len(want):
        return f"FAILED: {len(got)} outputs, reference has {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"FAILED: output {i} is {tuple(a.shape)} {a.dtype}, reference {tuple(b.shape)} {b.dtype}"
        problem = mismatch(a, b, families[min(i, len(families) - 1)])
        if problem is not None:
            return f"FAILED: output {i}: {problem}"
    return "ok"


def _copy_ms(x: torch.Tensor, device: torch.device) -> float:
    x = x.detach()
    dst = torch.empty_like(x)
    return time_ms(lambda: dst.copy_(x), device)


def run(
    op: Optional[str] = None,
    backend: Optional[str] = None,
    size: Optional[int] = None,
    device: Optional[str] = None,
    dtypes: tuple = (torch.float32,),
    case_filter: Optional[str] = None,
    printer: Callable[[str], None] = print,
    warm_heap: bool = True,
) -> tuple[list[Row], dict]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n = size or (DEFAULT_GPU_SIZE if dev.type == "cuda" else DEFAULT_CPU_SIZE)
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; benchmarked ops: {', '.join(OPS)}")
    meta = _machine(dev)
    meta["allocator"] = _warm_heap() if warm_heap and dev.type == "cpu" else "default"
    printer(
        f"# pycompress bench ops on {meta['device']} (torch {meta['torch']}, triton {meta['triton']}), {n} elements"
    )
    if dev.type == "cpu":
        printer(f"# CPU allocator: {meta['allocator']}")
    rows: list[Row] = []
    for op_name in [op] if op else list(OPS):
        for dtype in dtypes:
            for case in OPS[op_name](dev, n, dtype):
                if case_filter and case_filter not in case.name:
                    continue
                rows += _bench_case(case, _backends_for(case.op, backend, dev), dev, printer)
    return rows, meta


def _backends_for(op: str, backend: Optional[str], dev: torch.device) -> list[str]:
    avail = backends.available(op)
    if backend:
        # The explicit check happens per case through the op's own selection, so the error names why.
        return [backend]
    names = []
    for b in avail:
        if b == "cuda" and dev.type != "cuda":
            continue
        if b == "cpu" and dev.type != "cpu":
            continue
        if b == "triton" and dev.type != "cuda":
            continue  # the interpreter is for tests, not timing
        names.append(b)
    return names


def _bench_case(case: Case, names: list[str], dev: torch.device, printer) -> list[Row]:
    inputs = case.make()
    numel = math.prod(case.shape)
    nbytes = case.bytes_per_elem * numel
    yardstick = inputs[case.copy_key]
    copy_ms = _copy_ms(yardstick, dev)
    copy_gbps = 2 * yardstick.element_size() * yardstick.numel() / copy_ms / 1e6
    torch_ms = None
    if case.torch_run:
        try:
            torch_ms = time_ms(lambda: case.torch_run(inputs), dev)
        except (RuntimeError, NotImplementedError) as exc:  # e.g. a dtype the stock op lacks
            printer(f"  torch baseline unavailable: {exc}")
    out = []
    fresh = case.fresh or (lambda inp: inp)
    start = fresh(inputs)  # the state every check starts from (timed calls move `inputs` on)
    with value_checks(False):  # time the kernels, not the (optional) scale validation sync
        reference = case.run(fresh(start), "reference")
        for b in names:
            try:
                status = _check(case.run(fresh(start), b), reference, case.families)
            except backends.BackendError as exc:
                printer(f"  skip {b}: {exc}")
                continue
            ms = time_ms(lambda: case.run(inputs, b), dev)
            gbps = nbytes / ms / 1e6
            out.append(
                Row(
                    case.op,
                    case.name,
                    b,
                    "x".join(map(str, case.shape)),
                    str(case.dtype).replace("torch.", ""),
                    ms,
                    gbps,
                    gbps / copy_gbps,
                    (torch_ms / ms) if torch_ms else None,
                    status,
                )
            )
    del reference, start
    out.append(
        Row(
            case.op,
            case.name,
            "torch",
            "x".join(map(str, case.shape)),
            str(case.dtype).replace("torch.", ""),
            torch_ms or float("nan"),
            nbytes / torch_ms / 1e6 if torch_ms else float("nan"),
            (nbytes / torch_ms / 1e6) / copy_gbps if torch_ms else float("nan"),
            1.0 if torch_ms else None,
            "-",
        )
    )
    out.append(
        Row(
            case.op,
            case.name,
            "copy",
            "x".join(map(str, case.shape)),
            str(case.dtype).replace("torch.", ""),
            copy_ms,
            copy_gbps,
            1.0,
            None,
            "-",
        )
    )
    printer(format_rows(out))
    return out


def format_rows(rows: list[Row]) -> str:
    """One case's rows as a markdown table under a heading naming the op and case."""
    lines = [
        f"\n## {rows[0].op}: {rows[0].case}",
        "| backend | shape | dtype | median ms | GB/s | % of copy | vs torch | check |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        sp = f"{r.speedup_vs_torch:.2f}x" if r.speedup_vs_torch else "-"
        lines.append(
            f"| {r.backend} | {r.shape} | {r.dtype} | {r.median_ms:.3f} | {r.gbps:.1f} | "
            f"{100 * r.frac_copy:.1f}% | {sp} | {r.check} |"
        )
    return "\n".join(lines)


def _warm_heap() -> str:
    """Keep freed memory in glibc's heap (process-wide, from here on) so that every timed call,
    torch's and pycompress's alike, gets an already-mapped output buffer, as in the steady state of
    a training loop. With glibc's defaults a freed multi-MB tensor goes back to the kernel, and on a
    virtual machine faulting the next one in 4 KiB pages can cost several times the kernel itself
    (torch's NCHW depthwise forward at N32 C128 28x28: 25 ms against 5 ms warm on the 2-core CI
    machine), which measures the allocator, not the op."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        ok = False
    return (
        "glibc heap kept warm (mallopt M_MMAP_THRESHOLD = 1 GiB, M_TRIM_THRESHOLD = 2 GiB)"
        if ok
        else "default (not glibc: heap not pinned)"
    )


def _machine(dev: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    name = (
        torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    )
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def write_json(path: str, rows: list[Row], meta: dict) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(path, json.dumps({"machine": meta, "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
