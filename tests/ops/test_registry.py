"""The op registry (pycompress.ops.registry): one declaration per op, named kernel tables, supports
rules from common predicates, and the shared eager path, which must give the same bits as the
registered op."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

import pycompress.ops  # noqa: F401  (declares every op)
from pycompress import backends
from pycompress.ops import registry
from pycompress.ops.registry import Entry, eager_ok

fq = sys.modules["pycompress.ops.fake_quantize"]
sm = sys.modules["pycompress.ops.sparse_mask"]
dw = sys.modules["pycompress.ops.depthwise"]

BACKENDS = [b for b in ("cpu", "reference") if backends.status(b) is None]


def test_every_op_is_declared_once_and_registered_with_backends():
    decls = registry.declarations()
    assert set(decls) >= {  # (a new op adds itself by its declaration alone)
        "fake_quantize",
        "pack_mask",
        "unpack_mask",
        "apply_mask",
        "masked_sgd_step",
        "depthwise_conv2d",
    }
    assert set(decls) == set(backends.ops())  # every op of pycompress.backends comes from a declaration
    for name, d in decls.items():
        assert d.name == name and callable(d.reference)
        assert set(d.implemented_by) == set(backends.BACKENDS)


@pytest.mark.parametrize(
    "kernels, fields",
    [
        (fq.KERNELS, ("fwd", "bwd", "bwd_learnable")),
        (sm.KERNELS, ("pack", "unpack", "apply", "apply_inplace", "sgd_step")),
        (dw.KERNELS, ("fwd", "bwd_input", "bwd_weight")),
    ],
)
def test_kernel_tables_are_named_and_complete(kernels, fields):
    ref = kernels.table("reference")
    assert tuple(f.name for f in dataclasses.fields(ref)) == fields
    for f in fields:  # the reference table is the *_ref functions
        assert getattr(ref, f) is kernels.kernels[f].reference
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(ref, fields[0], None)
    with pytest.raises(TypeError):
        ref[0]  # no positional access
    if backends.status("cpu") is None:
        cpu = kernels.table("cpu")
        for f in fields:
            assert getattr(cpu, f)._schema.name == "pycompress::" + kernels.kernels[f].cpp
    with pytest.raises(ValueError, match="unknown backend"):
        kernels.table("gpu")


def test_supports_rules_name_the_problem():
    x64 = torch.zeros(3, dtype=torch.float64)
    assert fq.OP.supports("reference", x=x64) is None
    assert "float64 runs on reference" in fq.OP.supports("cpu", x=x64)
    assert "cpu" in fq.OP.supports("cuda", x=torch.zeros(3)) and "CUDA tensors" in fq.OP.supports(
        "cuda", x=torch.zeros(3)
    )
    # pack_mask takes bool masks: no dtype rule
    assert sm.PACK_MASK.supports("reference", mask=torch.zeros(3, dtype=torch.bool)) is None
    with pytest.raises(backends.BackendError, match="float64"):
        sm.APPLY_MASK.select("cpu", w=torch.zeros(3, dtype=torch.float64))


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _same(u, v)
        return
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
    assert torch.equal(
        a.view(-1).view(torch.uint8) if a.is_floating_point() else a,
        b.view(-1).view(torch.uint8) if b.is_floating_point() else b,
    )


def _both_paths(entry: Entry, make_args, grad_inputs=()):
    """(outputs, grads) of the eager path and of the registered op, for fresh copies of the args."""
    results = []
    for path in ("eager", "registered"):
        args = make_args()
        fn = entry if path == "eager" else entry.registered
        out = fn(*args)
        grads = None
        if grad_inputs:
            first = out[0] if isinstance(out, tuple) else out
            name = type(first.grad_fn).__name__
            assert ("Eager" in name) == (path == "eager"), name
            g = torch.linspace(-1, 1, first.numel()).view(first.shape).to(first.dtype)
            grads = torch.autograd.grad(first, [args[i] for i in grad_inputs], g)
        results.append((out, grads, args))
    return results


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_gives_the_registered_ops_bits(backend, dtype):
    torch.manual_seed(0)
    x0 = (torch.randn(3, 5, 4) * 2).to(dtype)
    # fake_quantize, straight-through
    (e, r) = _both_paths(
        fq.FAKE_QUANTIZE,
        lambda: (x0.clone().requires_grad_(), torch.tensor(0.25), torch.tensor(1.0), -8, 7, None, 1.0, backend, True),
        (0,),
    )
    _same(e[0], r[0]), _same(e[1], r[1])
    # fake_quantize, learnable per-channel scale and zero point
    s0 = torch.rand(5) * 0.2 + 0.1

    def lsq():
        return (
            x0.clone().requires_grad_(),
            s0.clone().requires_grad_(),
            torch.zeros(5).requires_grad_(),
            -8,
            7,
            1,
            0.5,
            backend,
            False,
        )

    (e, r) = _both_paths(fq.FAKE_QUANTIZE, lsq, (0, 1, 2))
    _same(e[0], r[0]), _same(e[1], r[1])
    # apply_mask, its gradient, and the in-place version (which bumps w's version like the registered op)
    keep = torch.rand(3, 5, 4) > 0.4
    packed = sm.pack_mask(keep, backend="reference")
    (e, r) = _both_paths(sm._APPLY, lambda: (x0.clone().requires_grad_(), packed, backend), (0,))
    _same(e[0], r[0]), _same(e[1], r[1])
    (e, r) = _both_paths(sm._PACK, lambda: (keep, backend))
    _same(e[0], r[0])
    (e, r) = _both_paths(sm._UNPACK, lambda: (packed, [3, 5, 4], backend))
    _same(e[0], r[0])
    (e, r) = _both_paths(sm._APPLY_INPLACE, lambda: (x0.clone(), packed, backend))
    _same(e[2][0], r[2][0])
    # a mutated argument's version moves on both paths (autograd then refuses stale saved tensors)
    assert e[2][0]._version >= 1 and r[2][0]._version >= 1
    # the masked SGD step (param and momentum buffer mutated)
    g0, b0 = torch.randn(3, 5, 4).to(dtype), torch.randn(3, 5, 4).to(dtype)
    (e, r) = _both_paths(
        sm._SGD_STEP, lambda: (x0.clone(), g0, b0.clone(), packed, 0.1, 0.9, 1e-3, 0.0, True, False, backend)
    )
    _same(e[2][0], r[2][0]), _same(e[2][2], r[2][2])
    assert min(e[2][0]._version, e[2][2]._version, r[2][0]._version, r[2][2]._version) >= 1
    # depthwise conv + BN affine + relu6, all four gradients
    xd0, wd0 = torch.randn(2, 4, 7, 7).to(dtype), torch.randn(4, 1, 3, 3).to(dtype)
    sc0, sh0 = torch.rand(4) + 0.5, torch.randn(4)

    def depthwise():
        return (
            xd0.clone().requires_grad_(),
            wd0.clone().requires_grad_(),
            sc0.clone().requires_grad_(),
            sh0.clone().requires_grad_(),
            [1, 1, 1, 1, 1, 1],
            2,
            backend,
        )

    (e, r) = _both_paths(dw.DEPTHWISE, depthwise, (0, 1, 2, 3))
    _same(e[0], r[0]), _same(e[1], r[1])


def test_eager_ok_is_false_wherever_the_registered_op_must_run():
    t = torch.zeros(2)
    assert eager_ok([t, torch.nn.Parameter(torch.zeros(1))])

    class Sub(torch.Tensor):
        pass

    assert not eager_ok([t.as_subclass(Sub)])
    with TorchFunctionMode():
        assert not eager_ok([t])
    seen = []
    torch.vmap(lambda v: seen.append(eager_ok([v])) or v)(torch.zeros(3, 2))
    assert seen == [False]
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        assert not eager_ok([torch.empty(2)])


def test_under_a_mode_the_registered_op_runs():
    """A torch-function mode sees the registered op (one node), not its pieces."""
    called = []

    class Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            called.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    x = torch.randn(4)
    with Spy():
        sm.apply_mask(x, sm.pack_mask(x > 0, backend="reference"), backend="reference")
    assert any("apply_mask" in c for c in called), called


def test_compile_sees_one_node_per_op():
    x = torch.randn(6, 4)
    packed = sm.pack_mask(x > 0, backend="reference")
    graphs = []

    def backend_fn(gm, inputs):
        graphs.append(gm)
        return gm

    f = torch.compile(
        lambda x: sm.apply_mask(fq.fake_quantize(x, 0.1, 0, -8, 7, backend="reference"), packed, backend="reference"),
        backend=backend_fn,
        fullgraph=True,
    )
    out = f(x)
    assert torch.equal(
        out, sm.apply_mask(fq.fake_quantize(x, 0.1, 0, -8, 7, backend="reference"), packed, backend="reference")
    )
    targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any("pycompress.fake_quantize" in t for t in targets), targets
    assert any("pycompress.apply_mask" in t for t in targets), targets


@pytest.mark.parametrize("traces_contextvar", [True, False], ids=["torch>=2.14", "older torch"])
def test_compile_takes_the_backend_use_asks_for(monkeypatch, traces_contextvar):
    """Under torch.compile the backend comes from use() as in eager. torch >= 2.14 traces the
    ContextVar and recompiles when use() changes it; older torch cannot trace it, so the value read
    when dynamo traces stays a constant of the graph until torch._dynamo.reset()."""
    if traces_contextvar and not backends._DYNAMO_TRACES_CONTEXTVAR:
        pytest.skip(f"torch {torch.__version__} does not trace ContextVar.get")
    if not {"cpu", "reference"} <= set(backends.available("fake_quantize")):
        pytest.skip("needs the cpu backend")
    monkeypatch.setattr(backends, "_DYNAMO_TRACES_CONTEXTVAR", traces_contextvar)
    torch._dynamo.reset()
    graphs = []

    def backend_fn(gm, inputs):
        graphs.append([a for n in gm.graph.nodes if "fake_quantize" in str(n.target) for a in n.args])
        return gm

    f = torch.compile(lambda x: fq.fake_quantize(x, 0.1, 0, -8, 7), backend=backend_fn, fullgraph=True)
    x = torch.randn(64)
    with backends.use("reference"):
        assert torch.equal(f(x), fq.fake_quantize(x, 0.1, 0, -8, 7, backend="reference"))
    assert len(graphs) == 1 and "reference" in graphs[0]
    with backends.use("cpu"):
        f(x)
    if traces_contextvar:
        assert len(graphs) == 2 and "cpu" in graphs[1]  # recompiled for the new backend
    else:
        assert len(graphs) == 1  # the traced constant
        torch._dynamo.reset()
        with backends.use("cpu"):
            f(x)
        assert len(graphs) == 2 and "cpu" in graphs[1]
    torch._dynamo.reset()
