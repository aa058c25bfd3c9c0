"""Checkpoints written atomically, and the RNG state they carry.

A checkpoint is a dict saved with :func:`torch.save` to a temporary file in the target directory,
fsync'ed and renamed over the destination, so a reader (or a resumed run after a crash) sees either
the previous complete file or the new complete file, never a torn one.

Checkpoints hold only what a weights-only load accepts (tensors, str, int, float, bool, None, lists,
tuples, dicts), and :func:`load_checkpoint` always loads with ``torch.load(weights_only=True)``: a
checkpoint from someone else cannot execute code. Checkpoints of older pycompress versions carry the
numpy RNG state as a numpy array; for those exactly the numpy globals that rebuild an array (as the
torch documentation recommends) are allowed, nothing else.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import zipfile
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..utils import atomic_write_bytes

FORMAT = "pycompress-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, unreadable or not a pycompress checkpoint."""


def save_checkpoint(path: str, state: Dict[str, Any]) -> None:
    """Atomically write ``state`` (plus the format marker) to ``path``."""
    payload = dict(state)
    payload.setdefault("format", FORMAT)
    payload.setdefault("version", VERSION)
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(path, buf.getvalue())


def _legacy_numpy_globals() -> List[Any]:
    """The numpy globals a weights-only load needs for the numpy RNG state of checkpoints written by
    older pycompress versions (``np.random.get_state()``: a uint32 ndarray): ``_reconstruct`` (under
    its numpy 1.x and 2.x names), ``ndarray``, ``dtype`` and the uint32 dtype class."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return [
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        (_reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        type(np.dtype(np.uint32)),
    ]


def _refused(path: str, exc: BaseException) -> bool:
    """Whether a failed weights-only load was a refusal of the pickle's content (globals or opcodes
    a weights-only load does not allow) rather than an unreadable file."""
    if not isinstance(exc, pickle.UnpicklingError):
        return False
    return "GLOBAL" in str(exc) or zipfile.is_zipfile(path)


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error for anything else.

    Always a weights-only load: a file whose pickle would build other objects (run code) is refused
    with a :class:`CheckpointError`, never unpickled."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        if _refused(path, exc):
            found = re.search(r"GLOBAL (\S+)", str(exc))
            what = f" (first refused: {found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint {path!r} contains objects that a weights-only load refuses (executable "
                f"pickle content{what}), so it was not loaded; pycompress checkpoints hold only "
                "tensors and plain data"
            ) from None
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a pycompress checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(
            f"{path!r} was written by a newer pycompress (format version {state['version']} > {VERSION})"
        )
    return state


def _numpy_state() -> Dict[str, Any]:
    """``np.random.get_state()`` as weights-only-safe data (the uint32 key as a list of ints)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    return {
        "bit_generator": str(name),
        "key": [int(k) for k in key.tolist()],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _set_numpy_state(state: Any) -> None:
    if isinstance(state, dict):
        key = state["key"]
        if isinstance(key, torch.Tensor):
            key = key.cpu().tolist()
        state = (
            state["bit_generator"],
            np.asarray(key, dtype=np.uint32),
            int(state["pos"]),
            int(state["has_gauss"]),
            float(state["cached_gaussian"]),
        )
    np.random.set_state(state)  # a tuple: the numpy RNG state of an older checkpoint


def rng_state() -> Dict[str, Any]:
    """The state of every RNG training touches: python, numpy, torch CPU and CUDA, as
    weights-only-safe data (tuples of ints, a dict of ints / floats / str, ByteTensors)."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Restore what :func:`rng_state` returned (also the numpy tuple of older checkpoints)."""
    if not state:
        return
    python = state["python"]
    # random.setstate wants tuples; a state that went through JSON-like data may hold lists
    random.setstate((python[0], tuple(python[1]), python[2]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it to a GPU
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    seed = int(seed) % (2**63)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
