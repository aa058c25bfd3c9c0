"""Checkpoints written atomically, and the RNG state they carry.

A checkpoint is a dict saved with :func:`torch.save` to a temporary file in the target directory,
fsync'ed and renamed over the destination, so a reader (or a resumed run after a crash) sees either
the previous complete file or the new complete file, never a torn one.
"""
from __future__ import annotations

import io
import os
import random
from typing import Any, Dict, Optional

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


def load_checkpoint(path: str, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        # Our checkpoints hold RNG states (numpy arrays, tuples), so they are not weights-only.
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
        raise CheckpointError(f"checkpoint {path!r} cannot be read: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a pycompress checkpoint (no '{FORMAT}' marker)")
    if state.get("version", 0) > VERSION:
        raise CheckpointError(f"{path!r} was written by a newer pycompress (format version "
                              f"{state['version']} > {VERSION})")
    return state


def rng_state() -> Dict[str, Any]:
    """The state of every RNG training touches: python, numpy, torch CPU and CUDA."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Optional[Dict[str, Any]]) -> None:
    if not state:
        return
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one integer."""
    seed = int(seed) % (2 ** 63)
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
