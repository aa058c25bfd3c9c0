"""Optimizers that keep pruned weights exactly 0.

``MaskedSGD`` runs :func:`pycompress.ops.masked_sgd_step` (one fused pass per tensor in the cpu,
cuda and triton backends) for parameters that have a mask, and a plain SGD step for the others:
gradient, momentum and weight decay of pruned entries are masked, so a pruned weight never moves.
``MaskedAdam`` / ``MaskedAdamW`` mask the gradients, run torch's step and re-mask the weights and
both moment buffers (plain torch: the reference path).

Masks are packed masks (``pycompress.ops.pack_mask``) given per parameter with
:meth:`set_masks`; a pruning schedule that re-selects masks calls it again. The state_dict is the
parent optimizer's, so a checkpoint of a masked optimizer loads into it like any other.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..ops import apply_mask, masked_sgd_step, packed_mask_bytes

__all__ = ["MaskedOptimizer", "MaskedSGD", "MaskedAdam", "MaskedAdamW", "build_masked_optimizer"]


class MaskedOptimizer:
    """Mixin: holds ``{parameter: packed mask}``."""

    def _init_masks(self, backend: Optional[str]) -> None:
        self._masks: Dict[torch.Tensor, torch.Tensor] = {}
        self.backend = backend

    def set_masks(self, masks: Mapping[torch.Tensor, Optional[torch.Tensor]]) -> None:
        """Replace the masks: ``{parameter: packed mask or None}``; parameters not named are dense."""
        known = {p for g in self.param_groups for p in g["params"]}
        out = {}
        for p, mk in masks.items():
            if p not in known:
                raise ValueError(
                    f"set_masks: a masked tensor is not a parameter of this optimizer (shape {tuple(p.shape)})"
                )
            if mk is not None:
                if mk.dtype != torch.uint8 or mk.shape != (packed_mask_bytes(p.numel()),) or mk.device != p.device:
                    raise ValueError(
                        f"set_masks: the mask of a parameter of shape {tuple(p.shape)} on {p.device} "
                        f"must be a packed uint8 mask of {packed_mask_bytes(p.numel())} bytes on "
                        f"the same device, got {mk.dtype} {tuple(mk.shape)} on {mk.device}"
                    )
                out[p] = mk
        self._masks = out

    def mask_of(self, p: torch.Tensor) -> Optional[torch.Tensor]:
        return self._masks.get(p)

    @property
    def num_masked(self) -> int:
        return len(self._masks)


class MaskedSGD(MaskedOptimizer, torch.optim.SGD):
    """torch.optim.SGD with masked parameters updated by the fused masked SGD step."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        torch.optim.SGD.__init__(
            self, params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov
        )
        self._init_masks(backend)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("maximize", False):
                raise ValueError("MaskedSGD does not support maximize=True")
            params, grads, bufs, masks = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                params.append(p)
                grads.append(p.grad)
                bufs.append(self.state[p].get("momentum_buffer"))
                masks.append(self._masks.get(p))
            if not params:
                continue
            momentum = group["momentum"]
            masked_sgd_step(
                params,
                grads,
                bufs,
                masks,
                lr=float(group["lr"]),
                momentum=momentum,
                weight_decay=group["weight_decay"],
                dampening=group["dampening"],
                nesterov=group["nesterov"],
                backend=self.backend,
            )
            if momentum != 0:
                for p, b in zip(params, bufs):
                    self.state[p]["momentum_buffer"] = b
        return loss


class _MaskedAdamBase(MaskedOptimizer):
    def _masked_step(self, parent, closure):
        with torch.no_grad():
            for p, mk in self._masks.items():
                if p.grad is not None:
                    apply_mask(p.grad, mk, inplace=True, backend=self.backend)
        loss = parent.step(self, closure)
        with torch.no_grad():
            for p, mk in self._masks.items():
                apply_mask(p.detach(), mk, inplace=True, backend=self.backend)
                st = self.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    t = st.get(key)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape:
                        apply_mask(t, mk, inplace=True, backend=self.backend)
        return loss


class MaskedAdam(_MaskedAdamBase, torch.optim.Adam):
    """torch.optim.Adam with masked gradients, weights and moments."""

    def __init__(self, params, *, backend: Optional[str] = None, **kwargs):
        torch.optim.Adam.__init__(self, params, **kwargs)
        self._init_masks(backend)

    def step(self, closure=None):
        return self._masked_step(torch.optim.Adam, closure)


class MaskedAdamW(_MaskedAdamBase, torch.optim.AdamW):
    """torch.optim.AdamW with masked gradients, weights and moments."""

    def __init__(self, params, *, backend: Optional[str] = None, **kwargs):
        torch.optim.AdamW.__init__(self, params, **kwargs)
        self._init_masks(backend)

    def step(self, closure=None):
        return self._masked_step(torch.optim.AdamW, closure)


def build_masked_optimizer(model: nn.Module, spec: Mapping[str, Any], *, backend: Optional[str] = None):
    """Like :func:`pycompress.train.build_optimizer` (same spec and no-bias-decay groups), but the
    masked version of the optimizer. Masks are set later with ``set_masks``."""
    from ..train.trainer import param_groups, validate_optimizer_spec

    s = validate_optimizer_spec(spec)
    groups = param_groups(model, s["weight_decay"], s["no_bias_decay"])
    kw = {k: v for k, v in s.items() if k not in ("name", "no_bias_decay", "weight_decay")}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    cls = {"sgd": MaskedSGD, "adam": MaskedAdam, "adamw": MaskedAdamW}[s["name"]]
    return cls(groups, backend=backend, **kw)
