"""Backend registry and selection for pycompress ops.

Backends, in auto priority: ``cuda`` (C++/CUDA extension), ``triton``, ``cpu`` (C++/OpenMP
extension), ``reference`` (plain torch, the specification of every op).

Selection for one call, first match wins:
    1. the op's ``backend=`` argument,
    2. ``with pycompress.backends.use("triton"):``,
    3. the ``PYCOMPRESS_BACKEND`` environment variable,
    4. auto: the first backend, in the order above, that supports the inputs.

An explicit choice never falls back silently: if it cannot run the inputs, ``BackendError`` says
why. When auto finds nothing, the error lists every backend tried and its reason. The Triton
interpreter (``TRITON_INTERPRET=1``, CPU tensors) runs only when ``triton`` is asked for
explicitly: it is a testing tool, far too slow to be chosen automatically.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator, Optional

import torch

from . import _ext

__all__ = ["BACKENDS", "BackendError", "available", "use", "current", "select", "status", "register_op", "ops"]

BACKENDS: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
_CHOICES = BACKENDS + ("auto",)

_current: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pycompress_backend", default=None)

# torch.compile traces ContextVar.get, guarding on its value (a graph compiled under use("cpu") is
# recompiled under use("reference")), from torch 2.14 on; torch 2.11 refuses it ("Unsupported
# method call"), 2.12 and 2.13 are untested. Before 2.14 the backend that use() asks for is read
# once, when dynamo traces, and stays a constant of that graph (torch._dynamo.reset() forgets it).
_DYNAMO_TRACES_CONTEXTVAR = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)

# op name -> backend name -> supports(**inputs) -> None if it can run them, else the reason.
_SUPPORT: dict[str, dict[str, Callable[..., Optional[str]]]] = {}


class BackendError(RuntimeError):
    """A requested backend cannot run an op, or no backend can."""


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name.strip().lower() not in _CHOICES:
        raise ValueError(f"{what} must be one of {', '.join(_CHOICES)}; got {name!r}")
    return name.strip().lower()


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    return None


def status(name: str) -> Optional[str]:
    """None when backend `name` can run on this machine at all, else the reason it cannot."""
    name = _check_name(name, "backend")
    if name == "auto":
        raise ValueError("status() takes a backend name (cuda, triton, cpu or reference), not 'auto'")
    return _machine_status(name)


# A fact about the machine and the build that cannot change while tracing: torch.compile takes the
# result as a constant instead of tracing into the extension's C functions (which it cannot).
# Computed once per backend: torch.cuda.is_available() and the import checks cost microseconds, and
# every op call selects a backend. Only triton on a machine without CUDA depends on TRITON_INTERPRET,
# which is read at each call (tests and users set it at run time).
@torch.compiler.assume_constant_result
def _machine_status(name: str) -> Optional[str]:
    reason = _MACHINE.get(name, _UNSET)
    if reason is _UNSET:
        reason = _MACHINE[name] = _machine_status_uncached(name)
    if reason is _NEEDS_INTERPRETER:
        if triton_interpreting():
            return None
        return "no CUDA device is available (set TRITON_INTERPRET=1 to run the Triton interpreter on CPU)"
    return reason


_UNSET, _NEEDS_INTERPRETER = object(), object()
_MACHINE: dict = {}


def _machine_status_uncached(name: str) -> Optional[str]:
    if name == "reference":
        return None
    if name == "cpu":
        return _ext.missing_reason()
    if name == "cuda":
        reason = _ext.missing_reason()
        if reason:
            return reason
        if not _ext.cuda_built():
            return "extension pycompress._C was built without CUDA (no nvcc or PYCOMPRESS_CUDA=0 at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    if name == "triton":
        reason = _triton_import_error()
        if reason:
            return reason
        if not torch.cuda.is_available():
            return _NEEDS_INTERPRETER
        return None
    raise AssertionError(name)


def register_op(op: str, supports: dict[str, Callable[..., Optional[str]]]) -> None:
    """Declare which backends implement `op` and how each decides whether it supports given inputs."""
    unknown = set(supports) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends for op {op!r}: {sorted(unknown)}")
    _SUPPORT[op] = dict(supports)


def ops() -> list[str]:
    """Names of the registered ops."""
    return sorted(_SUPPORT)


def available(op: str) -> list[str]:
    """Backends that implement `op` and can run on this machine, in auto priority order."""
    if op not in _SUPPORT:
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(ops())}")
    return [b for b in BACKENDS if b in _SUPPORT[op] and status(b) is None]


@contextlib.contextmanager
def use(name: str) -> Iterator[str]:
    """Run the ops inside the block on backend `name` (or "auto")."""
    name = _check_name(name, "pycompress.backends.use(name)")
    token = _current.set(name)
    try:
        yield name
    finally:
        _current.reset(token)


@torch.compiler.assume_constant_result
def _requested_when_traced() -> Optional[str]:
    return _current.get()


def current() -> str:
    """The backend requested by use() or PYCOMPRESS_BACKEND, or "auto"."""
    if not _DYNAMO_TRACES_CONTEXTVAR and torch.compiler.is_compiling():
        ctx = _requested_when_traced()
    else:
        ctx = _current.get()
    if ctx is not None:
        return ctx
    env = os.environ.get("PYCOMPRESS_BACKEND", "").strip()
    if env:
        return _check_name(env, "PYCOMPRESS_BACKEND")
    return "auto"


def _why_not(op: str, name: str, inputs: dict) -> Optional[str]:
    impls = _SUPPORT[op]
    if name not in impls:
        return f"{name} does not implement {op}"
    reason = _machine_status(name)  # name is already validated
    if reason:
        return reason
    return impls[name](**inputs)


def select(op: str, backend: Optional[str] = None, **inputs) -> str:
    """The backend that will run `op` on `inputs` (keyword arguments passed to each supports())."""
    if op not in _SUPPORT:
        raise ValueError(f"unknown op {op!r}; registered ops: {', '.join(ops())}")
    name = _check_name(backend, "backend") if backend is not None else current()
    if name != "auto":
        reason = _why_not(op, name, inputs)
        if reason:
            raise BackendError(f"backend {name!r} cannot run {op}: {reason}")
        return name
    reasons = []
    for candidate in BACKENDS:
        reason = _why_not(op, candidate, inputs)
        if reason is None and candidate == "triton" and triton_interpreting() and not _on_cuda(inputs):
            reason = "the Triton interpreter runs only when triton is asked for explicitly"
        if reason is None:
            return candidate
        reasons.append(f"  {candidate}: {reason}")
    raise BackendError(f"no backend can run {op} for these inputs:\n" + "\n".join(reasons))


def _on_cuda(inputs: dict) -> bool:
    return any(isinstance(v, torch.Tensor) and v.is_cuda for v in inputs.values())
