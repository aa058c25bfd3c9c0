"""One declaration per op: its kernels in every backend, which backend supports which inputs, and its
registered torch ops with their fakes, autograd and one shared cheap eager entry.

An op module (``fake_quantize.py``, ``sparse_mask.py``, ``depthwise.py``; ``docs/adding_an_op.md``
walks through one) declares, once:

- a :class:`KernelSet`: the kernel-level functions the backends implement, by name, each with its
  plain-torch reference (``*_ref.py``), the name of its C++ / CUDA op (``csrc/ops.cpp``, plus the
  fake kernel that op needs under torch.compile) and the name of its Triton launcher (a function of
  ``pycompress.kernels.<module>``). ``KERNELS.table(backend)`` is a frozen dataclass of those
  functions, looked up by field name (``table.fwd``), never by position;
- :func:`declare`: the op's name (what ``pycompress.backends`` selects by), its op-level reference
  (the specification) and ONE supports rule built from common predicates (:func:`on_device`,
  :func:`dtype_in`; "the extension has these kernels" is added from the kernel set). That
  registers the op with ``pycompress.backends``, so ``select()``, the "no backend" error (every
  backend and its reason) and ``available(op)`` work from it;
- :meth:`Declaration.define` per registered torch op (``pycompress::<name>``): its implementation
  (whose annotations are the op's schema, written once), its fake, and optionally its autograd
  (``setup_context`` + ``backward``). It returns an :class:`Entry`: calling it is the op's one
  eager path, shared by every op.

The eager path (:meth:`Entry.__call__`): under torch.compile, TorchScript tracing, functorch
transforms, tensor subclasses and torch-function or dispatch modes the registered op runs (one
node in a graph, fake tensors, opcheck); in plain eager calls the same implementation runs without
the custom-op dispatch, which costs tens of microseconds per call on the CPU: directly when no
input needs a gradient (mutated arguments get their version counters bumped, as the registered
op does), otherwise through a ``torch.autograd.Function`` built from the same ``setup_context``
and ``backward``. Inside ``backward`` call the helper ops with :func:`call` so each path stays on
its own side (the registered backward op under the registered op). Both paths run the same
functions, so they give the same bits.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch.overrides import has_torch_function

from .. import _ext, backends

__all__ = [
    "FLOAT_DTYPES",
    "Kernel",
    "KernelSet",
    "Declaration",
    "Entry",
    "declare",
    "declarations",
    "on_device",
    "dtype_in",
    "call",
    "eager_ok",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Reason = Optional[str]
Predicate = Callable[[str, Dict[str, Any]], Reason]  # (backend, inputs) -> None, or why not


# ---------------------------------------------------------------------------------------------- kernels


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One kernel-level function in every backend (all take the same normalised arguments)."""

    reference: Callable  # the plain-torch specification (pycompress/ops/*_ref.py)
    cpp: Optional[str] = None  # its op in csrc/ops.cpp (torch.ops.pycompress.<cpp>), CPU and CUDA
    triton: Optional[str] = None  # its launcher in pycompress.kernels.<KernelSet.triton_module>
    fake: Optional[Callable] = None  # the fake (meta) kernel of the C++ op, same signature


@torch.compiler.assume_constant_result
def _cpp_missing(names: Tuple[str, ...]) -> Reason:
    # A fact about the build: torch.compile takes it as a constant instead of tracing into C.
    if not _ext.loaded():
        return _ext.missing_reason()
    missing = [n for n in names if not hasattr(torch.ops.pycompress, n)]
    if missing:
        return (
            f"the compiled extension pycompress._C lacks {', '.join(missing)} (an old build: rebuild it with "
            "`pip install --no-build-isolation -e .`)"
        )
    return None


_UNKNOWN = object()


class KernelSet:
    """The named kernel-level functions of one op family, in every backend."""

    def __init__(self, name: str, *, triton_module: str, **kernels: Kernel):
        self.name = name
        self.triton_module = triton_module
        self.kernels: Dict[str, Kernel] = kernels
        self.cpp_ops: Tuple[str, ...] = tuple(k.cpp for k in kernels.values() if k.cpp)
        camel = "".join(p.capitalize() for p in name.split("_"))
        self.Table = dataclasses.make_dataclass(f"{camel}Kernels", list(kernels), frozen=True)
        self._tables: Dict[str, Any] = {}
        self._cpp_missing: Any = _UNKNOWN
        register_cpp_fakes(self)

    def table(self, backend: str):
        """The backend's kernels as a frozen dataclass with one field per kernel name."""
        t = self._tables.get(backend)
        if t is None:
            t = self._tables[backend] = self.Table(**self._resolve(backend))
        return t

    def _resolve(self, backend: str) -> Dict[str, Callable]:
        if backend == "reference":
            return {k: v.reference for k, v in self.kernels.items()}
        if backend in ("cpu", "cuda"):
            # .default: the overload itself (no per-call overload resolution of the packet)
            return {k: getattr(torch.ops.pycompress, v.cpp).default for k, v in self.kernels.items()}
        if backend == "triton":
            module = importlib.import_module(f"pycompress.kernels.{self.triton_module}")
            return {k: getattr(module, v.triton) for k, v in self.kernels.items()}
        raise ValueError(f"unknown backend {backend!r}")

    def cpp_missing(self) -> Reason:
        """None when the compiled extension has every C++ kernel of this set, else why not (a fact
        of the build, computed once)."""
        if self._cpp_missing is _UNKNOWN:
            self._cpp_missing = _cpp_missing(self.cpp_ops)
        return self._cpp_missing


def register_cpp_fakes(kernels: KernelSet) -> None:
    """Register the fake kernels of a set's C++ ops (torch.compile, opcheck), where the extension
    defines them."""
    for k in kernels.kernels.values():
        if k.cpp and k.fake is not None and _cpp_missing((k.cpp,)) is None:
            torch.library.register_fake(f"pycompress::{k.cpp}")(k.fake)


# ---------------------------------------------------------------------------------------------- supports


def on_device(arg: str) -> Predicate:
    """The tensor input ``arg`` is on a device the backend runs: cpu CPU, cuda CUDA, triton CUDA (or
    CPU under the Triton interpreter), reference any."""

    def check(backend: str, inputs: Dict[str, Any]) -> Reason:
        t = inputs[arg]
        dev = t.device.type
        if backend == "cpu" and dev != "cpu":
            return f"{arg} is on {t.device}, the cpu backend runs CPU tensors"
        if backend == "cuda" and dev != "cuda":
            return f"{arg} is on {t.device}, the cuda backend runs CUDA tensors"
        if backend == "triton" and dev != "cuda" and not (dev == "cpu" and backends.triton_interpreting()):
            return f"{arg} is on {t.device}; triton runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
        return None

    return check


def dtype_in(arg: str, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> Predicate:
    """The tensor input ``arg`` has one of the kernels' dtypes (the reference runs any float dtype)."""
    names = ", ".join(str(d).replace("torch.", "") for d in dtypes)

    def check(backend: str, inputs: Dict[str, Any]) -> Reason:
        if backend == "reference" or inputs[arg].dtype in dtypes:
            return None
        return f"{arg} has dtype {inputs[arg].dtype}; this backend supports {names} (float64 runs on reference)"

    return check


class _Rule:
    """The supports() of one backend for pycompress.backends: the first predicate's reason, or None."""

    def __init__(self, backend: str, predicates: Tuple[Predicate, ...]):
        self.backend, self.predicates = backend, predicates

    def __call__(self, **inputs) -> Reason:
        for p in self.predicates:
            reason = p(self.backend, inputs)
            if reason is not None:
                return reason
        return None


# ---------------------------------------------------------------------------------------------- eager path

_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


def eager_ok(tensors: Iterable) -> bool:
    """True in plain eager mode: the op may skip the custom-op dispatch. False under torch.compile,
    TorchScript tracing, functorch transforms (vmap, grad, ...), torch-function or dispatch modes
    (FakeTensorMode, make_fx, opcheck's checks, ...) and for tensor subclasses: there the registered
    op must run. (torch.compiler.is_compiling, torch.jit.is_tracing and
    torch.overrides.has_torch_function are public; functorch and dispatch modes have no public test.)"""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack() > 0
        or has_torch_function(tensors)
    ):
        return False
    for t in tensors:  # a loop, not any(generator): this runs on every op call
        if type(t) is not _TENSOR and type(t) is not _PARAMETER:
            return False
    return True


class Entry:
    """A registered op ``pycompress::<name>`` and its eager path. Call it like the op."""

    def __init__(
        self,
        name: str,
        impl: Callable,
        *,
        fake: Callable,
        mutates_args: Sequence[str] = (),
        setup_context: Optional[Callable] = None,
        backward: Optional[Callable] = None,
        differentiable_backward: bool = False,
        eager_name: Optional[str] = None,
    ):
        self.name = name
        self.impl = impl
        self.custom_op = torch.library.custom_op(f"pycompress::{name}", mutates_args=tuple(mutates_args))(impl)
        self.custom_op.register_fake(fake)
        self.registered = getattr(torch.ops.pycompress, name).default
        args = self.registered._schema.arguments
        self._tensor_args = tuple(i for i, a in enumerate(args) if isinstance(a.type, torch.TensorType))
        self._mutated = tuple(i for i, a in enumerate(args) if a.name in mutates_args)
        self.function = None
        if backward is not None:
            self.custom_op.register_autograd(backward, setup_context=setup_context)
            self.function = _eager_function(
                eager_name or f"_{_camel(name)}Eager", impl, setup_context, backward, differentiable_backward
            )

    def __call__(self, *args):
        tensors = [args[i] for i in self._tensor_args]
        if not eager_ok(tensors):
            return self.registered(*args)
        if self.function is not None and torch.is_grad_enabled():
            for t in tensors:
                if t.requires_grad:
                    return self.function.apply(*args)
        out = self.impl(*args)
        for i in self._mutated:
            torch.autograd.graph.increment_version(args[i])
        return out


def _camel(name: str) -> str:
    return "".join(p.capitalize() for p in name.split("_"))


def _eager_function(name: str, impl: Callable, setup_context: Callable, backward: Callable, differentiable: bool):
    """A torch.autograd.Function running impl with the registered op's setup_context and backward.
    Unless the backward is itself differentiable (it calls Entries only), it is once_differentiable,
    like the registered op whose backward ops have no autograd."""

    # forward(ctx, ...) rather than a separate setup_context: Function.apply then skips binding the
    # arguments to a signature (inspect), which costs ~15 us per call.
    def forward(ctx, *args):
        out = impl(*args)
        ctx.pycompress_eager = True
        setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    if not differentiable:
        bwd = torch.autograd.function.once_differentiable(bwd)
    return type(
        name,
        (torch.autograd.Function,),
        {
            "forward": staticmethod(forward),
            "backward": staticmethod(bwd),
            "__doc__": f"The eager path of pycompress::{name}: the registered op's implementation, setup_context and "
            "backward without the custom-op dispatch.",
        },
    )


def call(ctx, entry: Entry, *args):
    """Call a helper op from a backward: the eager path under the eager autograd.Function, the
    registered op under the registered op's autograd (so AOTAutograd traces it as one node)."""
    if getattr(ctx, "pycompress_eager", False):
        # A helper op with an autograd formula of its own (a differentiable backward) goes through
        # its entry; otherwise its implementation runs directly, as the forward chose the eager side.
        return entry(*args) if entry.function is not None else entry.impl(*args)
    return entry.registered(*args)


# ---------------------------------------------------------------------------------------------- declarations


@dataclasses.dataclass(frozen=True)
class Declaration:
    """What pycompress knows about one op: see the module docstring."""

    name: str
    reference: Callable  # the op-level specification
    kernels: KernelSet
    predicates: Tuple[Predicate, ...]
    implemented_by: Tuple[str, ...]

    def table(self, backend: str):
        return self.kernels.table(backend)

    def supports(self, backend: str, **inputs) -> Reason:
        """None when `backend` can run the op on these inputs (the machine aside), else why not."""
        return _Rule(backend, self.predicates)(**inputs)

    def select(self, backend: Optional[str] = None, **inputs) -> str:
        return backends.select(self.name, backend, **inputs)

    def define(self, name: str, impl: Callable, **kwargs) -> Entry:
        """Register ``pycompress::<name>`` (see Entry) under this declaration."""
        return Entry(name, impl, **kwargs)


_DECLARED: Dict[str, Declaration] = {}


def _extension_predicate(kernels: KernelSet) -> Predicate:
    def check(backend: str, inputs: Dict[str, Any]) -> Reason:
        if backend in ("cpu", "cuda"):
            return kernels.cpp_missing()
        return None

    return check


def declare(
    name: str,
    *,
    reference: Callable,
    kernels: KernelSet,
    supports: Sequence[Predicate],
    implemented_by: Sequence[str] = backends.BACKENDS,
) -> Declaration:
    """Declare op `name` and register it with pycompress.backends. `supports` lists the predicates
    every backend's inputs must pass (each predicate knows which backends it constrains); the check
    that the compiled extension has the kernel set's C++ ops comes first, for cpu and cuda."""
    predicates = (_extension_predicate(kernels),) + tuple(supports)
    decl = Declaration(name, reference, kernels, predicates, tuple(implemented_by))
    backends.register_op(name, {b: _Rule(b, predicates) for b in decl.implemented_by})
    _DECLARED[name] = decl
    return decl


def declarations() -> Dict[str, Declaration]:
    """Every declared op by name (what pycompress.backends.ops() lists)."""
    return dict(_DECLARED)
