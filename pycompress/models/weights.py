"""Start a model from a weights file: ``load_weights(model, path, strict=True)``.

The file is read without running any code from it:

* ``*.safetensors``: read with the ``safetensors`` package (a dependency);
* anything else: ``torch.load(path, map_location="cpu", weights_only=True)`` of a state_dict, or of
  a checkpoint dict that holds one under ``"state_dict"`` or ``"model"`` (a pycompress checkpoint
  included). Keys that all start with ``module.`` (a DistributedDataParallel model) lose the prefix.

Every key is compared before anything is loaded: keys of the model missing from the file, keys of
the file the model does not have, and keys whose shapes differ. ``strict=True`` (the default)
raises one :class:`WeightsError` naming all of them; ``strict=False`` loads what fits and returns
(and logs) what it skipped, e.g. a classifier with another number of classes. A BatchNorm's
``num_batches_tracked`` counter missing from the file is never an error.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

__all__ = [
    "WeightsError",
    "read_state_dict",
    "compare",
    "describe",
    "load_weights",
    "read_safetensors",
    "write_safetensors",
]

_SHOWN = 12  # names listed per kind of mismatch before "... and N more"


class WeightsError(ValueError):
    """A weights file cannot be read, or does not fit the model (every mismatch named)."""


# ------------------------------------------------------------------------------------ safetensors
def read_safetensors(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (on the CPU), read by the ``safetensors`` package."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str) -> None:
    """Write ``tensors`` as a ``.safetensors`` file (contiguous CPU copies)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


# ------------------------------------------------------------------------------------ reading
def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The state_dict a weights file holds (see the module docstring for the formats)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path!r} not found")
    if path.endswith(".safetensors"):
        state: Any = read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable, or refused by the weights-only load
            raise WeightsError(
                f"weights file {path!r} is not a safetensors file (*.safetensors) nor a state_dict that "
                f"torch.load(weights_only=True) reads ({type(exc).__name__}: {str(exc)[:300]})"
            ) from None
        if isinstance(state, Mapping):
            for key in ("state_dict", "model"):
                inner = state.get(key)
                if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                    state = inner
                    break
    if not isinstance(state, Mapping):
        raise WeightsError(f"weights file {path!r} holds a {type(state).__name__}, not a state_dict")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"weights file {path!r} is not a state_dict: {_names(bad)} are not tensors (a checkpoint dict "
            f"is read when it holds the state_dict under 'state_dict' or 'model')"
        )
    state = {str(k): v for k, v in state.items()}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _names(keys: List[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def compare(model: nn.Module, state: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """``{"missing", "unexpected", "shape", "fits"}``: the model's keys the state lacks, the
    state's keys the model lacks, ``[(key, file shape, model shape)]`` for shape differences, and
    the keys that fit. A missing ``num_batches_tracked`` is not listed."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = [
        (k, list(state[k].shape), list(own[k].shape)) for k in own if k in state and state[k].shape != own[k].shape
    ]
    mismatched = {k for k, _, _ in shape}
    fits = [k for k in own if k in state and k not in mismatched]
    return {"missing": missing, "unexpected": unexpected, "shape": shape, "fits": fits}


def describe(diff: Mapping[str, Any]) -> List[str]:
    """One line per kind of mismatch."""
    lines = []
    if diff["missing"]:
        lines.append(f"missing from the file ({len(diff['missing'])}): {_names(diff['missing'])}")
    if diff["unexpected"]:
        lines.append(f"in the file but not in the model ({len(diff['unexpected'])}): {_names(diff['unexpected'])}")
    if diff["shape"]:
        shown = [f"{k} (file {tuple(a)}, model {tuple(b)})" for k, a, b in diff["shape"]]
        lines.append(f"shape differs ({len(shown)}): {_names(shown)}")
    return lines


def load_weights(
    model: nn.Module,
    path: str,
    *,
    strict: bool = True,
    what: str = "the model",
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Load the weights file ``path`` into ``model`` in place; returns :func:`compare`'s result
    plus ``"path"``. ``strict=True``: any missing, unexpected or shape-mismatched key raises one
    :class:`WeightsError` listing them all, and nothing is loaded. ``strict=False``: the keys that
    fit are loaded, the rest skipped (and logged); a file of which nothing fits is still an error.
    ``what`` names the model in messages (e.g. ``"model 'torchvision:resnet18'"``)."""
    state = read_state_dict(path)
    diff = compare(model, state)
    problems = describe(diff)
    if problems and strict:
        raise WeightsError(
            f"weights file {path!r} does not fit {what}:\n  "
            + "\n  ".join(problems)
            + "\nNothing was loaded. Set 'strict: false' next to 'weights' to load the tensors that fit "
            "(missing and unexpected keys are then ignored and shape-mismatched ones skipped, e.g. a new "
            "classifier)."
        )
    if not diff["fits"]:
        raise WeightsError(f"weights file {path!r}: none of its {len(state)} tensors fits {what}")
    with torch.no_grad():
        model.load_state_dict({k: state[k] for k in diff["fits"]}, strict=False)
    if log is not None:
        log(
            f"loaded {len(diff['fits'])} tensors from {path} into {what}"
            + ("" if not problems else " (strict: false; skipped:\n  " + "\n  ".join(problems) + ")")
        )
    return dict(diff, path=path)
