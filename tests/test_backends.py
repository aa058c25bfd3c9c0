"""pycompress.backends on its own: the selection order (argument > use() > PYCOMPRESS_BACKEND >
auto), an explicit choice that never falls back, the auto error listing every backend and its
reason, the Triton interpreter only when asked for, use() nesting and reset, bad names,
available(), status() on this machine, register_op.

Most tests register a toy op on a private copy of the registry and fake which backends the
machine can run (``machine``), so they do not depend on the machine or on the real ops."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pycompress import backends
from pycompress.backends import BACKENDS, BackendError

OP = "toy_op"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """A private registry (the real ops stay registered in it) and no backend environment."""
    monkeypatch.setattr(backends, "_SUPPORT", dict(backends._SUPPORT))
    monkeypatch.delenv("PYCOMPRESS_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def machine(monkeypatch):
    """machine(cuda=..., ...): which backends this (fake) machine can run, with a reason for those
    it cannot (default: every backend runs)."""

    def set_machine(**missing):
        def fake_status(name):
            return missing.get(name)

        monkeypatch.setattr(backends, "_machine_status", fake_status)

    set_machine()
    return set_machine


def register(**reasons):
    """The toy op in every backend; backend b refuses inputs with reasons[b] (a string) or with
    reasons[b](**inputs); reasons[b] = False: b does not implement the op at all."""
    supports = {}
    for b in BACKENDS:
        rule = reasons.get(b)
        if rule is False:
            continue
        supports[b] = rule if callable(rule) else (lambda r: lambda **inputs: r)(rule)
    backends.register_op(OP, supports)


# ----------------------------------------------------------------------------- selection order


def test_auto_takes_the_first_backend_in_priority_order(machine):
    assert BACKENDS == ("cuda", "triton", "cpu", "reference")
    register()
    assert backends.current() == "auto"
    assert backends.select(OP) == "cuda"
    register(cuda="needs CUDA tensors")
    assert backends.select(OP) == "triton"
    register(cuda="needs CUDA tensors", triton=False)
    assert backends.select(OP) == "cpu"
    register(cuda="no", triton="no", cpu="no")
    assert backends.select(OP) == "reference"


def test_auto_skips_backends_the_machine_cannot_run(machine):
    register()
    machine(cuda="no CUDA device is available", triton="triton is not importable")
    assert backends.select(OP) == "cpu"


def test_supports_sees_the_inputs(machine):
    def cpu_rule(x, scale=None):
        return None if x.dtype == torch.float32 and scale is None else f"cpu: {x.dtype}, scale {scale}"

    register(cuda=False, triton=False, cpu=cpu_rule)
    assert backends.select(OP, x=torch.ones(2)) == "cpu"
    assert backends.select(OP, x=torch.ones(2, dtype=torch.float64)) == "reference"
    assert backends.select(OP, x=torch.ones(2), scale=0.5) == "reference"


def test_selection_order_argument_then_use_then_environment_then_auto(machine, monkeypatch):
    register()
    assert backends.select(OP) == "cuda"
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "cpu")
    assert backends.current() == "cpu" and backends.select(OP) == "cpu"
    with backends.use("triton"):
        assert backends.current() == "triton" and backends.select(OP) == "triton"
        assert backends.select(OP, backend="reference") == "reference"
        # an explicit "auto" argument means auto, whatever use() or the environment say
        assert backends.select(OP, backend="auto") == "cuda"
    with backends.use("auto"):  # use("auto") overrides the environment too
        assert backends.current() == "auto" and backends.select(OP) == "cuda"
    assert backends.select(OP) == "cpu"


def test_names_are_normalised(machine, monkeypatch):
    register()
    assert backends.select(OP, backend=" CPU ") == "cpu"
    with backends.use("Reference") as name:
        assert name == "reference" and backends.current() == "reference"
    monkeypatch.setenv("PYCOMPRESS_BACKEND", " Triton\n")
    assert backends.current() == "triton"
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "   ")  # blank: not set
    assert backends.current() == "auto"


# ----------------------------------------------------------------------------- explicit choices never fall back


@pytest.mark.parametrize("how", ["argument", "use", "environment"])
def test_explicit_choice_never_falls_back(machine, monkeypatch, how):
    register(cpu="x is on meta, the cpu backend runs CPU tensors")

    def select():
        if how == "argument":
            return backends.select(OP, backend="cpu")
        if how == "use":
            with backends.use("cpu"):
                return backends.select(OP)
        monkeypatch.setenv("PYCOMPRESS_BACKEND", "cpu")
        return backends.select(OP)

    with pytest.raises(BackendError) as info:
        select()
    assert str(info.value) == f"backend 'cpu' cannot run {OP}: x is on meta, the cpu backend runs CPU tensors"


def test_explicit_choice_names_why_the_machine_cannot_run_it(machine):
    register()
    machine(cuda="no CUDA device is available")
    with pytest.raises(BackendError, match=f"backend 'cuda' cannot run {OP}: no CUDA device is available"):
        backends.select(OP, backend="cuda")


def test_explicit_choice_of_a_backend_without_the_op(machine):
    register(triton=False)
    with pytest.raises(BackendError, match=f"backend 'triton' cannot run {OP}: triton does not implement {OP}"):
        backends.select(OP, backend="triton")


def test_backend_error_is_a_runtime_error():
    assert issubclass(BackendError, RuntimeError)


# ----------------------------------------------------------------------------- the auto error


def test_auto_error_lists_every_backend_and_its_reason(machine):
    register(cuda="x is on cpu", triton=False, cpu="x has dtype torch.int8", reference="x is empty")
    machine(cuda="no CUDA device is available")
    with pytest.raises(BackendError) as info:
        backends.select(OP)
    lines = str(info.value).splitlines()
    assert lines == [
        f"no backend can run {OP} for these inputs:",
        "  cuda: no CUDA device is available",  # the machine's reason comes before the inputs'
        f"  triton: triton does not implement {OP}",
        "  cpu: x has dtype torch.int8",
        "  reference: x is empty",
    ]


# ----------------------------------------------------------------------------- the Triton interpreter


def test_triton_interpreter_runs_only_when_asked_for(machine, monkeypatch):
    register(cuda="no")
    x = torch.ones(3)  # a CPU tensor
    assert backends.select(OP, x=x) == "triton"  # not interpreting: triton is a real GPU backend here
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.triton_interpreting()
    assert backends.select(OP, x=x) == "cpu"  # auto never picks the interpreter
    assert backends.select(OP, backend="triton", x=x) == "triton"
    with backends.use("triton"):
        assert backends.select(OP, x=x) == "triton"
    register(cuda="no", cpu="no", reference="no")
    with pytest.raises(BackendError) as info:
        backends.select(OP, x=x)
    assert "  triton: the Triton interpreter runs only when triton is asked for explicitly" in str(info.value)


@pytest.mark.parametrize("value", ["0", "", "true"])
def test_triton_interpreting_means_exactly_1(monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert not backends.triton_interpreting()


# ----------------------------------------------------------------------------- use()


def test_use_nests_and_resets():
    assert backends.current() == "auto"
    with backends.use("cpu"):
        assert backends.current() == "cpu"
        with backends.use("reference"):
            assert backends.current() == "reference"
        assert backends.current() == "cpu"
        with pytest.raises(KeyError):
            with backends.use("cuda"):
                assert backends.current() == "cuda"
                raise KeyError("boom")
        assert backends.current() == "cpu"  # reset by the exception too
    assert backends.current() == "auto"


def test_use_does_not_leak_into_other_threads():
    import threading

    seen = []
    with backends.use("reference"):
        t = threading.Thread(target=lambda: seen.append(backends.current()))
        t.start()
        t.join()
    assert seen == ["auto"]


# ----------------------------------------------------------------------------- bad names


@pytest.mark.parametrize("name", ["fastest", "tpu", "", None, 3])
def test_bad_backend_names_are_refused(machine, monkeypatch, name):
    register()
    choices = "cuda, triton, cpu, reference, auto"
    with pytest.raises(ValueError, match=f"pycompress.backends.use\\(name\\) must be one of {choices}; got"):
        with backends.use(name):
            pass
    assert backends.current() == "auto"
    if name is not None:  # None is "not given" for select()
        with pytest.raises(ValueError, match=f"backend must be one of {choices}; got {name!r}"):
            backends.select(OP, backend=name)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.status(name)


def test_bad_environment_value_is_refused(machine, monkeypatch):
    register()
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="PYCOMPRESS_BACKEND must be one of .*; got 'fastest'"):
        backends.current()
    with pytest.raises(ValueError, match="PYCOMPRESS_BACKEND"):
        backends.select(OP)
    assert backends.select(OP, backend="cpu") == "cpu"  # an argument never reads the environment
    with backends.use("reference"):
        assert backends.select(OP) == "reference"


def test_unknown_op_is_refused():
    register()
    for call in (lambda: backends.select("no_such_op"), lambda: backends.available("no_such_op")):
        with pytest.raises(ValueError) as info:
            call()
        assert "unknown op 'no_such_op'; registered ops: " in str(info.value)
        assert OP in str(info.value) and "fake_quantize" in str(info.value)


# ----------------------------------------------------------------------------- available(), ops()


def test_available_is_implemented_and_runnable_in_priority_order(machine):
    register(triton=False)
    assert backends.available(OP) == ["cuda", "cpu", "reference"]
    machine(cuda="no CUDA device is available")
    assert backends.available(OP) == ["cpu", "reference"]
    # whether a backend supports given inputs is not a question available() asks
    register(cpu="never these inputs")
    assert "cpu" in backends.available(OP)


def test_ops_lists_the_registered_ops_sorted():
    before = backends.ops()
    assert before == sorted(before) and {"fake_quantize", "apply_mask", "depthwise_conv2d"} <= set(before)
    register()
    assert backends.ops() == sorted(before + [OP])


def test_every_real_op_runs_on_the_reference_here():
    for op in backends.ops():
        assert "reference" in backends.available(op), op


# ----------------------------------------------------------------------------- register_op


def test_register_op_refuses_unknown_backends():
    with pytest.raises(ValueError) as info:
        backends.register_op(OP, {"cpu": lambda **kw: None, "gpu": lambda **kw: None, "tpu": lambda **kw: None})
    assert str(info.value) == f"unknown backends for op {OP!r}: ['gpu', 'tpu']"
    assert OP not in backends.ops()  # nothing registered


def test_register_op_keeps_its_own_copy_and_replaces(machine):
    supports = {"cpu": lambda **kw: None, "reference": lambda **kw: None}
    backends.register_op(OP, supports)
    supports["cuda"] = lambda **kw: None
    assert backends.available(OP) == ["cpu", "reference"]
    backends.register_op(OP, {"reference": lambda **kw: None})
    assert backends.available(OP) == ["reference"]


# ----------------------------------------------------------------------------- status() on this machine


def test_status_of_each_backend_on_this_machine(monkeypatch):
    """The real machine: the reference always runs; cpu runs iff the extension was built (it is
    importable); without a GPU, cuda and triton say why (triton: unless interpreting)."""
    assert backends.status("reference") is None
    built = importlib.util.find_spec("pycompress._C") is not None
    cpu = backends.status("cpu")
    if built:
        assert cpu is None, cpu
    else:
        assert cpu and "pycompress._C" in cpu
    assert backends.status(" CPU ") == cpu
    if torch.cuda.is_available():
        pytest.skip("the GPU half of this test is for machines without one")
    cuda = backends.status("cuda")
    assert cuda is not None
    assert any(w in cuda for w in ("no CUDA device is available", "built without CUDA", "pycompress._C")), cuda
    triton = backends.status("triton")
    has_triton = importlib.util.find_spec("triton") is not None
    for op in backends.ops():
        avail = backends.available(op)
        assert "cuda" not in avail and "triton" not in avail, (op, avail)
    if has_triton:
        assert triton == ("no CUDA device is available (set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backends.status("triton") is None
    else:
        assert triton and "triton is not importable" in triton


def test_status_takes_a_backend_name_not_auto():
    with pytest.raises(ValueError, match="not 'auto'"):
        backends.status("auto")
    with pytest.raises(ValueError, match="must be one of"):
        backends.status("gpu")
