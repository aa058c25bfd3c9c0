"""Knowledge-distillation losses (SPEC sections 1 and 2).

All losses take ``(student_logits, teacher_logits, targets=None)`` with logits of shape ``(N, C)``
(class dimension last) and return a scalar. Probabilities are ``p_s = softmax(s / T)`` and
``p_t = softmax(t / T)``; everything is computed from ``log_softmax`` so that a probability that
underflows to 0 (e.g. logits of +-1e4) contributes exactly 0 instead of NaN/inf. Logits must be
finite. Divergences use the natural log, are summed over classes and averaged over the batch
("batchmean"). float16/bfloat16 inputs are computed in float32.

Kinds (``kind`` key, case-insensitive):

=======================  ======================================================================
``hinton``               ``(1 - alpha) * CE(s, y) + alpha * T^2 * KL(p_t || p_s)`` (food-11 HW7;
                         CE on the raw logits, i.e. at temperature 1). ``alpha`` in [0, 1],
                         default 0.5; ``temperature`` default 20 (the homework's values).
``kl_student_teacher``   ``KL(p_s || p_t) = sum p_s (log p_s - log p_t)``. Alias ``kldiv``
                         (MicroNet's name), ``kl_st``.
``kl_teacher_student``   ``KL(p_t || p_s)``. Alias ``kl_ts``.
``ce``                   soft cross-entropy ``-sum p_t log p_s`` (= KL(p_t||p_s) + H(p_t)).
                         Alias ``soft_ce``.
``js``                   Jensen-Shannon ``0.5 KL(p_s || m) + 0.5 KL(p_t || m)``,
                         ``m = (p_s + p_t) / 2``; bounded by ``log 2``.
``symmetric_kl``         ``KL(p_s || p_t) + KL(p_t || p_s)`` -- the plain SUM, NOT halved.
                         Alias ``skl``.
=======================  ======================================================================

For every kind except ``hinton`` the loss is

    ``weight * (scale * D(p_s, p_t) + label_weight * CE(s, y))``

where ``scale = T^2`` if ``t2_scale`` is true (default false) else 1 and ``label_weight`` defaults
to 0 (no label term; ``targets`` then not needed). ``temperature`` defaults to 1 for these kinds.
For ``hinton`` the loss is ``weight * ((1 - alpha) * CE + alpha * T^2 * KL(p_t || p_s))``.
``weight`` defaults to 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "KINDS",
    "ALIASES",
    "DistillLoss",
    "CombinedLoss",
    "build_loss",
    "kl_div_logits",
    "soft_cross_entropy",
    "js_div_logits",
]

KINDS = ("hinton", "kl_student_teacher", "kl_teacher_student", "ce", "js", "symmetric_kl")
ALIASES = {
    "kldiv": "kl_student_teacher",
    "kl_st": "kl_student_teacher",
    "kl_ts": "kl_teacher_student",
    "soft_ce": "ce",
    "skl": "symmetric_kl",
}
_DEFAULT_T = {"hinton": 20.0}
_COMMON_KEYS = {"kind", "weight", "temperature"}
_KEYS = {"hinton": _COMMON_KEYS | {"alpha"}}
_PROB_KEYS = _COMMON_KEYS | {"label_weight", "t2_scale"}


# ---------------------------------------------------------------------------------------------
# functional pieces (log-probabilities in, batch-mean scalar out)
# ---------------------------------------------------------------------------------------------
def _kl_logp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """batch-mean KL(p || q) from log-probabilities (last dim = classes)."""
    # p = exp(logp) is exactly 0 where logp underflows; finite logp - logq keeps 0 * x = 0.
    return (logp.exp() * (logp - logq)).sum(-1).mean()


def kl_div_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, temperature: float = 1.0):
    """batch-mean KL(softmax(p/T) || softmax(q/T))."""
    return _kl_logp(F.log_softmax(p_logits / temperature, -1), F.log_softmax(q_logits / temperature, -1))


def soft_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """batch-mean ``-sum softmax(t/T) * log_softmax(s/T)``."""
    logp_s = F.log_softmax(student_logits / temperature, -1)
    p_t = F.softmax(teacher_logits / temperature, -1)
    return -(p_t * logp_s).sum(-1).mean()


def js_div_logits(a_logits: torch.Tensor, b_logits: torch.Tensor, temperature: float = 1.0):
    """batch-mean Jensen-Shannon divergence of softmax(a/T) and softmax(b/T) (natural log)."""
    loga = F.log_softmax(a_logits / temperature, -1)
    logb = F.log_softmax(b_logits / temperature, -1)
    # log m = log((pa + pb) / 2), stable through logsumexp
    logm = torch.logaddexp(loga, logb) - math.log(2.0)
    return 0.5 * _kl_logp(loga, logm) + 0.5 * _kl_logp(logb, logm)


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"distill loss: {key!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"distill loss: {key!r} must be finite, got {value!r}")
    return value


def _canonical_kind(kind: Any) -> str:
    if not isinstance(kind, str):
        raise ValueError(f"distill loss: 'kind' must be a string, got {kind!r}")
    k = kind.strip().lower()
    k = ALIASES.get(k, k)
    if k not in KINDS:
        raise ValueError(
            f"distill loss: unknown 'kind' {kind!r}; expected one of {list(KINDS)} (aliases {sorted(ALIASES)})"
        )
    return k


class DistillLoss(nn.Module):
    """One distillation loss term; see the module docstring for the formulas.

    Args:
        kind: one of :data:`KINDS` or an alias.
        temperature: T > 0 (default 20 for ``hinton``, 1 otherwise).
        weight: overall multiplier >= 0 (default 1).
        alpha: ``hinton`` only, in [0, 1] (default 0.5).
        label_weight: non-``hinton`` kinds only, >= 0 weight of ``CE(s, y)`` (default 0).
        t2_scale: non-``hinton`` kinds only: multiply the divergence by T^2 (default False).
    """

    def __init__(
        self,
        kind: str,
        temperature: float | None = None,
        weight: float = 1.0,
        alpha: float | None = None,
        label_weight: float | None = None,
        t2_scale: bool | None = None,
    ) -> None:
        super().__init__()
        self.kind = _canonical_kind(kind)
        if temperature is None:
            temperature = _DEFAULT_T.get(self.kind, 1.0)
        self.temperature = _number("temperature", temperature)
        if self.temperature <= 0:
            raise ValueError(f"distill loss: 'temperature' must be > 0, got {temperature!r}")
        self.weight = _number("weight", weight)
        if self.weight < 0:
            raise ValueError(f"distill loss: 'weight' must be >= 0, got {weight!r}")
        if self.kind == "hinton":
            if label_weight is not None:
                raise ValueError("distill loss: 'label_weight' is not used by kind 'hinton' (use 'alpha')")
            if t2_scale is not None:
                raise ValueError("distill loss: 't2_scale' is not used by kind 'hinton' (always T^2)")
            self.alpha = _number("alpha", 0.5 if alpha is None else alpha)
            if not 0.0 <= self.alpha <= 1.0:
                raise ValueError(f"distill loss: 'alpha' must be in [0, 1], got {alpha!r}")
            self.label_weight = 1.0 - self.alpha
            self.t2_scale = True
        else:
            if alpha is not None:
                raise ValueError(
                    f"distill loss: 'alpha' is only used by kind 'hinton', not {self.kind!r} (use 'label_weight')"
                )
            self.alpha = None
            self.label_weight = _number("label_weight", 0.0 if label_weight is None else label_weight)
            if self.label_weight < 0:
                raise ValueError(f"distill loss: 'label_weight' must be >= 0, got {label_weight!r}")
            if t2_scale is not None and not isinstance(t2_scale, bool):
                raise ValueError(f"distill loss: 't2_scale' must be a bool, got {t2_scale!r}")
            self.t2_scale = bool(t2_scale)

    @property
    def needs_targets(self) -> bool:
        return self.label_weight > 0

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The unweighted, unscaled distillation term D(p_s, p_t) at this temperature."""
        s, t, T = student_logits, teacher_logits, self.temperature
        if self.kind in ("hinton", "kl_teacher_student"):
            return kl_div_logits(t, s, T)
        if self.kind == "kl_student_teacher":
            return kl_div_logits(s, t, T)
        if self.kind == "ce":
            return soft_cross_entropy(s, t, T)
        if self.kind == "js":
            return js_div_logits(s, t, T)
        # symmetric_kl: plain sum, not halved
        logp_s = F.log_softmax(s / T, -1)
        logp_t = F.log_softmax(t / T, -1)
        return _kl_logp(logp_s, logp_t) + _kl_logp(logp_t, logp_s)

    def forward(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        if student_logits.dim() != 2 or teacher_logits.shape != student_logits.shape:
            raise ValueError(
                "distill loss: expected student and teacher logits of the same shape (N, C), got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        s, t = student_logits, teacher_logits
        if s.dtype in (torch.float16, torch.bfloat16):
            s = s.float()
        if t.dtype in (torch.float16, torch.bfloat16) or t.dtype != s.dtype:
            t = t.to(s.dtype)
        if self.kind == "hinton":
            kd_coef = self.alpha
        else:
            kd_coef = 1.0
        scale = self.temperature**2 if self.t2_scale else 1.0
        loss = (kd_coef * scale) * self.divergence(s, t)
        if self.label_weight > 0:
            if targets is None:
                raise ValueError(
                    f"distill loss {self.kind!r}: targets are required when the label "
                    f"term weight is {self.label_weight} > 0"
                )
            loss = loss + self.label_weight * F.cross_entropy(s, targets)
        return self.weight * loss

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}", f"temperature={self.temperature}", f"weight={self.weight}"]
        if self.kind == "hinton":
            parts.append(f"alpha={self.alpha}")
        else:
            parts += [f"label_weight={self.label_weight}", f"t2_scale={self.t2_scale}"]
        return ", ".join(parts)


class CombinedLoss(nn.Module):
    """Sum of several :class:`DistillLoss` terms (each carrying its own ``weight``)."""

    def __init__(self, terms: Sequence[DistillLoss]) -> None:
        super().__init__()
        if len(terms) == 0:
            raise ValueError("distill loss: empty list of loss specs")
        self.terms = nn.ModuleList(terms)

    @property
    def needs_targets(self) -> bool:
        return any(t.needs_targets for t in self.terms)

    def forward(self, student_logits, teacher_logits, targets=None):
        total = self.terms[0](student_logits, teacher_logits, targets)
        for term in self.terms[1:]:
            total = total + term(student_logits, teacher_logits, targets)
        return total


def _from_string(spec: str) -> DistillLoss:
    # "kind" | "kind:weight" | "kind:weight:temperature"
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) > 3 or not parts[0]:
        raise ValueError(f"distill loss: bad spec string {spec!r}; expected 'kind[:weight[:temperature]]'")
    kwargs: dict[str, Any] = {}
    for key, text in zip(("weight", "temperature"), parts[1:]):
        try:
            kwargs[key] = float(text)
        except ValueError:
            raise ValueError(f"distill loss: {key!r} in spec {spec!r} is not a number: {text!r}") from None
    return DistillLoss(parts[0], **kwargs)


def _from_mapping(spec: Mapping[str, Any]) -> DistillLoss:
    if "kind" not in spec:
        raise ValueError(f"distill loss: spec {dict(spec)!r} has no 'kind' key")
    kind = _canonical_kind(spec["kind"])
    allowed = _KEYS.get(kind, _PROB_KEYS)
    for key in spec:
        if key not in allowed:
            raise ValueError(f"distill loss: unknown key {key!r} for kind {kind!r}; allowed {sorted(allowed)}")
    kwargs = {k: v for k, v in spec.items() if k != "kind"}
    return DistillLoss(kind, **kwargs)


def build_loss(spec: Any) -> nn.Module:
    """Build a distillation loss from a spec.

    ``spec`` may be
      * a dict: ``{"kind": "hinton", "alpha": 0.5, "temperature": 20}``; keys ``kind`` (required),
        ``weight``, ``temperature``, plus ``alpha`` (hinton) or ``label_weight`` / ``t2_scale``
        (other kinds). Unknown keys raise ValueError naming the key.
      * a string ``"kind[:weight[:temperature]]"`` (MicroNet syntax, e.g. ``"kldiv:1"``); several
        terms may be joined with commas: ``"kldiv:1,ce:0.5"`` -> their sum.
      * a list/tuple of dicts or strings -> their sum (:class:`CombinedLoss`).
      * an existing :class:`DistillLoss` / :class:`CombinedLoss` (returned unchanged).

    The result is called as ``loss(student_logits, teacher_logits, targets=None)``.
    """
    if isinstance(spec, (DistillLoss, CombinedLoss)):
        return spec
    if isinstance(spec, str):
        pieces = spec.split(",")
        if any(not p.strip() for p in pieces):
            raise ValueError(f"distill loss: bad spec string {spec!r}")
        if len(pieces) == 1:
            return _from_string(pieces[0])
        return CombinedLoss([_from_string(p) for p in pieces])
    if isinstance(spec, Mapping):
        return _from_mapping(spec)
    if isinstance(spec, (list, tuple)):
        terms = []
        for item in spec:
            built = build_loss(item)
            if isinstance(built, CombinedLoss):
                terms.extend(built.terms)
            else:
                terms.append(built)
        return CombinedLoss(terms)
    raise ValueError(f"distill loss: spec must be a dict, string or list, got {type(spec).__name__}")
