"""Loads the compiled extension pycompress._C, or records why it could not be loaded.

`import pycompress` never fails because the extension is missing: it warns, and the cpu / cuda
backends report the reason when asked. PYCOMPRESS_REQUIRE_EXT=1 makes a missing extension an
ImportError (CI sets it, so a silently missing build cannot pass).
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import torch  # noqa: F401  (the extension links against libtorch; load it first)

_C = None
_error: str | None = None

try:
    if importlib.util.find_spec(f"{__package__}._C") is None:
        raise ImportError("no compiled module pycompress/_C*.so was found")
    from . import _C as _C  # type: ignore[attr-defined,no-redef]
except ImportError as exc:  # pragma: no cover - exercised by the no-extension test in a subprocess
    _error = f"{type(exc).__name__}: {exc}"
    if os.environ.get("PYCOMPRESS_REQUIRE_EXT", "") == "1":
        raise ImportError(
            "PYCOMPRESS_REQUIRE_EXT=1 but the compiled extension pycompress._C could not be loaded "
            f"({_error}). Build it with `pip install --no-build-isolation -e .` against the installed torch."
        ) from exc
    warnings.warn(
        "pycompress._C is not built; the cpu and cuda backends are unavailable "
        f"({_error}). Build it with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def loaded() -> bool:
    return _C is not None


def cuda_built() -> bool:
    return _C is not None and bool(_C.cuda_built())


def missing_reason() -> str | None:
    """None when the extension is loaded, else a sentence saying why not."""
    if _C is not None:
        return None
    return f"extension pycompress._C not built ({_error})"
