"""DeepHoyer sparsity-inducing regularizers (SPEC.md section 3).

Training loss = task loss + strength * sum over tensors W of R(W). Element-wise R, of any tensor:

    l1(W)             = sum |w|
    hoyer(W)          = sum |w| / sqrt(sum w^2)
    hoyer_square(W)   = (sum |w|)^2 / sum w^2
    transformed_l1(W) = sum 2|w| / (1 + |w|)

Group R, of a tensor with >= 2 dims (conv (out, in, kh, kw), FC (out, in); any further dims are
reduced with the rest), with input-channel groups g_c = ||W[:, c]||_2 and filter groups
g_f = ||W[f]||_2 (each over all other dims) and ||W||_F the Frobenius norm:

    group_lasso(W) = sum_c g_c + sum_f g_f
    group_hoyer(W) = (sum_c g_c + sum_f g_f) / ||W||_F
    group_hs(W)    = ((sum_c g_c)^2 + (sum_f g_f)^2) / ||W||_F^2

Zero safety. An all-zero tensor (sum|w| = 0, equivalently sum w^2 = 0) contributes exactly 0 with
a zero gradient (the 0/0 ratios are defined as 0), and a zero group inside a nonzero tensor uses
the subgradient 0 of its norm: ||.||_2 is computed as where(s > 0, sqrt(where(s > 0, s, 1)), 0)
on its sum of squares s, so neither value nor gradient is ever NaN / inf. This is done with
torch.where only (no .item(), no Python branch on tensor values): no host sync, friendly to
torch.compile and CUDA graphs.

Dtypes. Each R is computed in W's dtype, except that float16 / bfloat16 are computed (and
returned) in float32: their sums overflow (float16 max 65504) or lose most of their bits.
Everything is differentiable w.r.t. W and returns a 0-d tensor on W's device.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, Iterable

import torch

__all__ = [
    "l1",
    "hoyer",
    "hoyer_square",
    "transformed_l1",
    "group_lasso",
    "group_hoyer",
    "group_hs",
    "REGULARIZERS",
    "GROUP_REGULARIZERS",
    "is_group",
    "regularization",
]


def _check_tensor(w: torch.Tensor, what: str = "w") -> torch.Tensor:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if not w.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got dtype {w.dtype}")
    if w.dtype in (torch.float16, torch.bfloat16):
        return w.float()
    return w


def _check_group_tensor(w: torch.Tensor, what: str = "w") -> torch.Tensor:
    w = _check_tensor(w, what)
    if w.dim() < 2:
        raise ValueError(f"group regularizers need a tensor with >= 2 dims, {what} has shape {tuple(w.shape)}")
    return w


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den where den > 0, else 0; gradient 0 (never NaN) where den == 0."""
    pos = den > 0
    return torch.where(pos, num / torch.where(pos, den, torch.ones_like(den)), torch.zeros_like(num))


def _safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """sqrt(s) for s >= 0 with gradient 0 (the subgradient we use) at s == 0 instead of inf."""
    pos = s > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, s, torch.ones_like(s))), torch.zeros_like(s))


# ------------------------------------------------------------------------------------ element-wise
def l1(w: torch.Tensor) -> torch.Tensor:
    """R(W) = sum |w| (gradient sign(w), 0 at w = 0)."""
    w = _check_tensor(w)
    return w.abs().sum()


def hoyer(w: torch.Tensor) -> torch.Tensor:
    """R(W) = sum |w| / sqrt(sum w^2); 0 (zero gradient) for an all-zero tensor. Scale invariant."""
    w = _check_tensor(w)
    return _safe_div(w.abs().sum(), _safe_sqrt(w.square().sum()))


def hoyer_square(w: torch.Tensor) -> torch.Tensor:
    """R(W) = (sum |w|)^2 / sum w^2 (Hoyer-Square); 0 (zero gradient) for an all-zero tensor."""
    w = _check_tensor(w)
    return _safe_div(w.abs().sum().square(), w.square().sum())


def transformed_l1(w: torch.Tensor) -> torch.Tensor:
    """R(W) = sum 2|w| / (1 + |w|)."""
    w = _check_tensor(w)
    a = w.abs()
    return (2 * a / (1 + a)).sum()


# ------------------------------------------------------------------------------------------ group
def _group_sums(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_c g_c, sum_f g_f, ||W||_F^2) with zero-safe group norms."""
    sq = w.square()
    dims = list(range(w.dim()))
    ch = _safe_sqrt(sq.sum(dim=[d for d in dims if d != 1])).sum()
    fi = _safe_sqrt(sq.sum(dim=[d for d in dims if d != 0])).sum()
    return ch, fi, sq.sum()


def group_lasso(w: torch.Tensor) -> torch.Tensor:
    """R(W) = sum_c ||W[:, c]||_2 + sum_f ||W[f]||_2 (input channels + filters; FC columns + rows)."""
    w = _check_group_tensor(w)
    ch, fi, _ = _group_sums(w)
    return ch + fi


def group_hoyer(w: torch.Tensor) -> torch.Tensor:
    """R(W) = (sum_c g_c + sum_f g_f) / ||W||_F; 0 (zero gradient) for an all-zero tensor."""
    w = _check_group_tensor(w)
    ch, fi, fro2 = _group_sums(w)
    return _safe_div(ch + fi, _safe_sqrt(fro2))


def group_hs(w: torch.Tensor) -> torch.Tensor:
    """R(W) = ((sum_c g_c)^2 + (sum_f g_f)^2) / ||W||_F^2 (Group-HS); 0 for an all-zero tensor."""
    w = _check_group_tensor(w)
    ch, fi, fro2 = _group_sums(w)
    return _safe_div(ch.square() + fi.square(), fro2)


# --------------------------------------------------------------------------------------- registry
REGULARIZERS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "l1": l1,
    "hoyer": hoyer,
    "hoyer_square": hoyer_square,
    "transformed_l1": transformed_l1,
    "group_lasso": group_lasso,
    "group_hoyer": group_hoyer,
    "group_hs": group_hs,
    # network slimming (Liu et al. 2017): L1 on the BatchNorm scales gamma (the Pruner applies it to
    # every affine BatchNorm of the model, not to the selected conv / linear weights)
    "bn_l1": l1,
}

GROUP_REGULARIZERS = frozenset({"group_lasso", "group_hoyer", "group_hs"})


def _check_kind(kind: str) -> str:
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, got {kind!r} ({type(kind).__name__})")
    if kind not in REGULARIZERS:
        raise ValueError(f"unknown regularizer kind {kind!r}; valid: {list(REGULARIZERS)}")
    return kind


def is_group(name: str) -> bool:
    """True for the group regularizers (which apply only to tensors with >= 2 dims)."""
    return _check_kind(name) in GROUP_REGULARIZERS


def regularization(tensors: Iterable[torch.Tensor], kind: str, strength: float) -> torch.Tensor:
    """strength * sum over ``tensors`` of REGULARIZERS[kind](W), a 0-d tensor.

    Group kinds skip tensors with < 2 dims (biases, BN); element-wise kinds apply to every tensor.
    The result lives on the first tensor's device (each term is moved there) in the promoted dtype
    of the terms; with no tensors it is a plain float32 0.0 on the CPU, and with tensors none of
    which applies it is a 0.0 on the first tensor's device. ``strength`` is a finite real >= 0.
    """
    kind = _check_kind(kind)
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real):
        raise TypeError(f"strength must be a real number, got {strength!r} ({type(strength).__name__})")
    strength = float(strength)
    if not math.isfinite(strength) or strength < 0:
        raise ValueError(f"strength must be a finite number >= 0, got {strength!r}")
    if isinstance(tensors, torch.Tensor):
        raise TypeError("tensors must be an iterable of tensors (e.g. model.parameters()), got one tensor")
    fn = REGULARIZERS[kind]
    group = kind in GROUP_REGULARIZERS
    device = None
    total = None
    for i, w in enumerate(tensors):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"tensors[{i}] must be a torch.Tensor, got {type(w).__name__}")
        if device is None:
            device = w.device
        if group and w.dim() < 2:
            continue
        r = fn(w).to(device)
        total = r if total is None else total + r
    if total is None:
        return torch.zeros((), device=device)
    return total * strength
