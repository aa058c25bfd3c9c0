"""Small shared helpers: atomic file writes, the input of a batch, a model's device."""

from __future__ import annotations

import itertools
import os
import tempfile
from typing import Optional

import torch


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a torn one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        # mkstemp creates the file 0600; give it the mode a plain open() would (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def batch_input(batch, who: str) -> torch.Tensor:
    """The input tensor of a batch: the batch itself or the first item of an (inputs, targets)
    tuple / list. ``who`` names the caller in the error."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(f"{who}: a batch must be a tensor or an (inputs, targets) tuple/list, got {type(batch).__name__}")


def model_device(model: torch.nn.Module) -> Optional[torch.device]:
    """The device of a model's first parameter or buffer (None for a model without any)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None
