"""Mask selection criteria: which weights to keep.

Every criterion takes ``weights: Mapping[str, torch.Tensor]`` (name -> weight tensor, any floating
dtype, any device; never modified) and returns ``dict[str, torch.Tensor]`` of **bool** masks with the
same names, shapes and devices (True = keep, False = prune), in the mapping's order. Selection runs
under ``torch.no_grad()`` on absolute values computed in float32 (float64 for float64 input), so a
float16 / bfloat16 weight is ranked by its exact value. No criterion syncs with the host.

Element counts use round-half-up, not Python's banker's ``round``:

    n_prune(s, n) = floor(s * n + 0.5)

Criteria (SPEC.md section 1 step 2 for MicroNet, section 3 for DeepHoyer):

* ``global_magnitude(weights, sparsity)``: MicroNet's global rule. With n the total number of
  elements over all tensors and k = n_prune(sparsity, n), t = the k-th smallest |w| over all tensors
  together; keep |w| > t. Ties at t are pruned, so the achieved sparsity is >= the target.
* ``layer_magnitude(weights, sparsity)``: the same rule on each tensor separately.
* ``threshold(weights, value)``: DeepHoyer fixed threshold, keep |w| >= value.
* ``std_ratio(weights, ratio=0.25)``: DeepHoyer per tensor, keep |w| >= ratio * std(W).
* ``random(weights, sparsity, generator=None)``: prune exactly n_prune(sparsity, numel) elements
  per tensor, uniformly at random (a baseline).
* ``filter_norm(weights, sparsity, p=2)`` / ``channel_norm(weights, sparsity, p=2)``: structured,
  prune the n_prune smallest dim-0 (output filter / FC row) or dim-1 (input channel / FC column)
  slices by L_p norm.

``select_masks(weights, criterion, **params)`` dispatches by name through ``CRITERIA``;
``mask_sparsity(masks)`` is the fraction of pruned elements.
"""

from __future__ import annotations

import inspect
import math
import numbers
from typing import Callable, Mapping, Optional, Union

import torch

__all__ = [
    "global_magnitude",
    "layer_magnitude",
    "threshold",
    "std_ratio",
    "random",
    "filter_norm",
    "channel_norm",
    "CRITERIA",
    "select_masks",
    "mask_sparsity",
    "n_prune",
]


# ----------------------------------------------------------------------------------------- checks
def _check_weights(weights: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a Mapping name -> torch.Tensor, got {type(weights).__name__}")
    for name, w in weights.items():
        if not isinstance(name, str):
            raise TypeError(f"weights: names must be str, got {name!r} ({type(name).__name__})")
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"weights[{name!r}] must be a torch.Tensor, got {type(w).__name__}")
        if not w.is_floating_point():
            raise TypeError(f"weights[{name!r}] must be a floating-point tensor, got dtype {w.dtype}")
    return weights


def _check_real(what: str, value, lo: float, hi: float = math.inf) -> float:
    """A real number (bool, complex and tensors rejected) in [lo, hi]; NaN rejected."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or not lo <= value <= hi:
        hi_txt = "inf)" if hi == math.inf else f"{hi:g}]"
        raise ValueError(f"{what} must be in [{lo:g}, {hi_txt}, got {value!r}")
    return value


def _check_sparsity(what: str, value) -> float:
    return _check_real(what, value, 0.0, 1.0)


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number > 0 (inf allowed), got {p!r} ({type(p).__name__})")
    p = float(p)
    if math.isnan(p) or p <= 0:
        raise ValueError(f"p must be > 0 (inf allowed), got {p!r}")
    return p


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _abs(w: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """|w| in the compute dtype (float32, or float64 for float64 input), a new tensor."""
    return w.detach().to(dtype or _compute_dtype(w.dtype)).abs()


def n_prune(sparsity: float, n: int) -> int:
    """Number of elements (or slices) to prune: floor(sparsity * n + 0.5) (round half up)."""
    return int(math.floor(sparsity * n + 0.5))


# ------------------------------------------------------------------------------------- magnitude
def _keep_above_kth(a: torch.Tensor, k: int) -> Optional[torch.Tensor]:
    """t = the k-th smallest value of the flat tensor ``a`` (None when k == 0)."""
    if k == 0:
        return None
    return torch.kthvalue(a, k).values


@torch.no_grad()
def global_magnitude(weights: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """MicroNet global magnitude pruning over all tensors together.

    n = sum of numel over all tensors, k = floor(sparsity * n + 0.5). If k == 0 everything is kept;
    otherwise t = the k-th smallest |w| over the concatenation of all tensors (torch.kthvalue) and

        mask = |w| > t

    Ties at t are pruned too, so the achieved sparsity is >= the target (exactly the target when
    the magnitudes are distinct). sparsity = 1 prunes everything. |w| is compared in float64 if any
    tensor is float64, float32 otherwise; the concatenation lives on the first tensor's device.
    Weights are expected to be finite (a NaN is never kept, as NaN > t is False).
    """
    _check_weights(weights)
    sparsity = _check_sparsity("sparsity", sparsity)
    if not weights:
        return {}
    dtype = torch.float64 if any(w.dtype == torch.float64 for w in weights.values()) else torch.float32
    n = sum(w.numel() for w in weights.values())
    k = n_prune(sparsity, n)
    if k == 0:
        return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    device = next(iter(weights.values())).device
    flat = torch.cat([_abs(w, dtype).reshape(-1).to(device) for w in weights.values()])
    t = _keep_above_kth(flat, k)
    del flat
    return {name: _abs(w, dtype) > t.to(w.device) for name, w in weights.items()}


@torch.no_grad()
def layer_magnitude(
    weights: Mapping[str, torch.Tensor], sparsity: Union[float, Mapping[str, float]]
) -> dict[str, torch.Tensor]:
    """The ``global_magnitude`` rule applied to each tensor on its own.

    For each tensor W with sparsity s: k = floor(s * numel + 0.5), t = k-th smallest |w| of W,
    mask = |w| > t (all kept when k == 0; ties at t pruned, so achieved sparsity >= s).
    ``sparsity`` is one number for all tensors or a Mapping name -> number covering exactly the
    names of ``weights`` (missing or unknown names raise ValueError naming them).
    """
    _check_weights(weights)
    if isinstance(sparsity, Mapping):
        missing = [name for name in weights if name not in sparsity]
        if missing:
            raise ValueError(f"sparsity: no value for tensor(s) {missing}")
        unknown = [name for name in sparsity if name not in weights]
        if unknown:
            raise ValueError(f"sparsity: names {unknown} are not in weights")
        per = {name: _check_sparsity(f"sparsity[{name!r}]", sparsity[name]) for name in weights}
    else:
        s = _check_sparsity("sparsity", sparsity)
        per = {name: s for name in weights}
    masks = {}
    for name, w in weights.items():
        k = n_prune(per[name], w.numel())
        if k == 0:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
            continue
        a = _abs(w)
        masks[name] = a > _keep_above_kth(a.reshape(-1), k)
    return masks


# ------------------------------------------------------------------------------------ thresholds
@torch.no_grad()
def threshold(weights: Mapping[str, torch.Tensor], value: float) -> dict[str, torch.Tensor]:
    """DeepHoyer fixed threshold: mask = |w| >= value (|w| < value is pruned); value >= 0.

    value = 0 keeps everything (also exact zeros); the comparison is in the compute dtype.
    """
    _check_weights(weights)
    value = _check_real("value", value, 0.0)
    return {name: _abs(w) >= value for name, w in weights.items()}


@torch.no_grad()
def std_ratio(weights: Mapping[str, torch.Tensor], ratio: float = 0.25) -> dict[str, torch.Tensor]:
    """DeepHoyer per-tensor threshold: t = ratio * std(W), mask = |w| >= t.

    std is torch.std (unbiased, over all elements of the tensor, in the compute dtype). A tensor
    with fewer than 2 elements has std 0 here (torch would give NaN), so it is kept. ratio >= 0.
    """
    _check_weights(weights)
    ratio = _check_real("ratio", ratio, 0.0)
    masks = {}
    for name, w in weights.items():
        a = _abs(w)
        if w.numel() < 2:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
            continue
        t = ratio * torch.std(w.detach().to(a.dtype))
        masks[name] = a >= t
    return masks


# ---------------------------------------------------------------------------------------- random
@torch.no_grad()
def random(
    weights: Mapping[str, torch.Tensor], sparsity: float, generator: Optional[torch.Generator] = None
) -> dict[str, torch.Tensor]:
    """Random baseline: per tensor, exactly k = floor(sparsity * numel + 0.5) elements are pruned,
    the first k of ``torch.randperm(numel, generator=generator)``.

    The permutation is drawn on the generator's device (CPU without a generator), tensors in the
    mapping's order, so a seeded generator and the same mapping order reproduce the masks.
    """
    _check_weights(weights)
    sparsity = _check_sparsity("sparsity", sparsity)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    masks = {}
    for name, w in weights.items():
        numel = w.numel()
        k = n_prune(sparsity, numel)
        flat = torch.ones(numel, dtype=torch.bool, device=w.device)
        if k > 0:
            perm = torch.randperm(numel, generator=generator, device=gen_device)
            flat[perm[:k].to(w.device)] = False
        masks[name] = flat.reshape(w.shape)
    return masks


# ------------------------------------------------------------------------------------ structured
def _slice_norm_masks(
    weights: Mapping[str, torch.Tensor], sparsity: float, p, dim: int, what: str
) -> dict[str, torch.Tensor]:
    _check_weights(weights)
    sparsity = _check_sparsity("sparsity", sparsity)
    p = _check_p(p)
    masks = {}
    for name, w in weights.items():
        if w.dim() < 2:
            raise ValueError(f"{what} needs tensors with >= 2 dims, but weights[{name!r}] has shape {tuple(w.shape)}")
        n_slices = w.shape[dim]
        k = n_prune(sparsity, n_slices)
        if k == 0:
            masks[name] = torch.ones_like(w, dtype=torch.bool)
            continue
        a = _abs(w).transpose(0, dim).reshape(n_slices, -1)
        norms = torch.linalg.vector_norm(a, ord=p, dim=1)
        order = torch.sort(norms, stable=True).indices  # ascending; equal norms: lower index first
        keep = torch.ones(n_slices, dtype=torch.bool, device=w.device)
        keep[order[:k]] = False
        view = [1] * w.dim()
        view[dim] = n_slices
        masks[name] = keep.reshape(view).expand(w.shape).clone()
    return masks


@torch.no_grad()
def filter_norm(weights: Mapping[str, torch.Tensor], sparsity: float, p: float = 2) -> dict[str, torch.Tensor]:
    """Structured: prune whole output filters (dim-0 slices: conv filters, FC rows).

    Per tensor (dim >= 2), n_f = W.shape[0], k = floor(sparsity * n_f + 0.5); the k filters with
    the smallest ||W[f]||_p (over all other dims; p > 0, inf allowed) are pruned, ties broken by
    index (stable sort: lower index pruned first). A tensor with < 2 dims raises ValueError.
    """
    return _slice_norm_masks(weights, sparsity, p, 0, "filter_norm")


@torch.no_grad()
def channel_norm(weights: Mapping[str, torch.Tensor], sparsity: float, p: float = 2) -> dict[str, torch.Tensor]:
    """Structured: prune whole input channels (dim-1 slices: conv input channels, FC columns).

    Per tensor (dim >= 2), n_c = W.shape[1], k = floor(sparsity * n_c + 0.5); the k channels with
    the smallest ||W[:, c]||_p (over all other dims) are pruned, ties broken by index (lower index
    pruned first). A tensor with < 2 dims raises ValueError.
    """
    return _slice_norm_masks(weights, sparsity, p, 1, "channel_norm")


# -------------------------------------------------------------------------------------- registry
CRITERIA: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "global_magnitude": global_magnitude,
    "layer_magnitude": layer_magnitude,
    "threshold": threshold,
    "std_ratio": std_ratio,
    "random": random,
    "filter_norm": filter_norm,
    "channel_norm": channel_norm,
}


def select_masks(weights: Mapping[str, torch.Tensor], criterion: str, **params) -> dict[str, torch.Tensor]:
    """Masks from ``CRITERIA[criterion](weights, **params)``.

    Unknown criterion: ValueError listing the valid names. A keyword the criterion does not take,
    or a required one that is missing (e.g. ``threshold`` needs ``value``): TypeError naming it.
    """
    if not isinstance(criterion, str):
        raise TypeError(f"criterion must be a str, got {criterion!r} ({type(criterion).__name__})")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid: {sorted(CRITERIA)}")
    fn = CRITERIA[criterion]
    sig = inspect.signature(fn)
    accepted = [name for name in sig.parameters if name != "weights"]
    unknown = [name for name in params if name not in accepted]
    if unknown:
        raise TypeError(f"criterion {criterion!r} got unexpected parameter(s) {unknown}; it takes {accepted}")
    missing = [
        name for name in accepted if sig.parameters[name].default is inspect.Parameter.empty and name not in params
    ]
    if missing:
        raise TypeError(f"criterion {criterion!r} needs parameter(s) {missing}")
    return fn(weights, **params)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of pruned elements over all masks: #False / #elements (0.0 for no elements).

    Non-bool masks count their zeros as pruned. Returns a Python float (syncs with the host).
    """
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a Mapping name -> torch.Tensor, got {type(masks).__name__}")
    total = 0
    pruned = 0
    for name, m in masks.items():
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"masks[{name!r}] must be a torch.Tensor, got {type(m).__name__}")
        total += m.numel()
        pruned += int(m.numel() - torch.count_nonzero(m).item())
    return pruned / total if total else 0.0
