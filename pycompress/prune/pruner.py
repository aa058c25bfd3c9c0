"""Pruner: runs a PruneSpec inside the training loop, as a :class:`pycompress.train.Hook`.

It chooses masks at the start of the stage (oneshot, regrow) or along the way (regrow, gradual),
keeps pruned weights at exactly 0 between steps, adds the sparsity regularizer to the loss and
saves its position in the checkpoint; masks and shadow weights are model buffers, so they are in
the checkpoint's model state. With a :class:`~pycompress.prune.optim.MaskedOptimizer` the masks are
handed to the optimizer (one fused masked step per tensor); with any other optimizer the gradients
are masked before the step and the weights re-masked after it.

Without a spec (``Pruner(model)``) it only keeps the masks the model already has, which is what a
later stage (QAT, fine-tuning) of a pruned model needs.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Union

import torch
import torch.nn as nn

from ..ops import apply_mask
from . import masks as M
from .criteria import mask_sparsity, select_masks
from .optim import MaskedOptimizer
from .regularizers import regularization
from .report import SparsityReport, sparsity_report
from .spec import PruneSpec

__all__ = ["Pruner", "prune_model", "gradual_sparsity"]


def gradual_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic schedule: ``final + (initial - final) * (1 - (step - start) / (end - start))^3``,
    ``initial`` before ``start`` and ``final`` after ``end``."""
    if step <= start:
        return initial
    if step >= end:
        return final
    frac = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def _select(
    model: nn.Module, spec: PruneSpec, layers: List[str], sparsity: Optional[float] = None, salt: int = 0
) -> Dict[str, torch.Tensor]:
    weights = M.layer_weights(model, layers, dense=True)
    params = spec.criterion_params()
    if sparsity is not None and "sparsity" in params:
        params["sparsity"] = sparsity
    if spec.criterion == "random":
        g = torch.Generator().manual_seed(spec.seed * 1_000_003 + salt)
        params["generator"] = g
    return select_masks(weights, spec.criterion, **params)


def prune_model(model: nn.Module, spec: Union[PruneSpec, Mapping[str, Any]]) -> SparsityReport:
    """One-shot pruning outside a training loop: choose masks with ``spec``'s criterion over its
    layers, attach them (pruned weights become 0) and return the sparsity report."""
    spec = PruneSpec.from_dict(spec)
    if spec.criterion is None:
        raise ValueError("prune_model: the spec has no criterion")
    layers = spec.select_layers(model)
    if not layers:
        raise ValueError(
            f"prune_model: no layer matched (types={spec.types}, include={spec.include}, "
            f"exclude={spec.exclude}, first={spec.first}, last={spec.last})"
        )
    M.attach_masks(model, _select(model, spec, layers))
    return sparsity_report(model, selected=[f"{n}.weight" for n in layers])


def bn_scales(model: nn.Module) -> List[torch.Tensor]:
    """The scales (gamma) of every affine BatchNorm of ``model``: what ``regularizer: bn_l1``
    pushes towards 0 so that network slimming (``pycompress.prune.structured``, criterion
    ``bn_gamma``) can remove those channels."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m.weight for m in model.modules() if isinstance(m, _BatchNorm) and m.affine and m.weight is not None]


class Pruner:
    """A trainer hook running ``spec`` on ``model`` (see the module docstring).

    Args:
        model: the network (the same object the trainer trains).
        spec: a PruneSpec or its dict; None keeps the existing masks only.
        log: callable taking a line of text (selection events).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: Union[None, PruneSpec, Mapping[str, Any]] = None,
        *,
        log: Optional[Callable[[str], None]] = None,
    ):
        self.model = model
        self.spec = PruneSpec.from_dict(spec) if spec is not None else None
        self.log = log or (lambda line: None)
        if self.spec is not None:
            self.layers = self.spec.select_layers(model)
            if not self.layers:
                s = self.spec
                raise ValueError(
                    f"prune: no layer matched (types={s.types}, include={s.include}, "
                    f"exclude={s.exclude}, first={s.first}, last={s.last})"
                )
        else:
            self.layers = list(M.masked_layers(model))
        self.state: Dict[str, Any] = {"selected": False, "frozen": False, "updates": 0, "sparsity": None}
        self.trainer = None
        self.total_steps: Optional[int] = None

    # --------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> Dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state.update(state)

    def before_load(self, trainer, checkpoint: Mapping[str, Any]) -> None:
        """Give the model the mask / shadow buffers of the checkpoint before it is loaded."""
        M.prepare_state_dict(self.model, checkpoint["model"])

    # --------------------------------------------------------------------------- helpers
    @property
    def _schedule(self) -> Optional[str]:
        return self.spec.schedule if self.spec is not None and self.spec.criterion is not None else None

    def _regrowing(self) -> bool:
        return self._schedule == "regrow" and not self.state["frozen"] and bool(M.shadowed_layers(self.model))

    def _masked_optimizer(self) -> Optional[MaskedOptimizer]:
        opt = getattr(self.trainer, "optimizer", None)
        return opt if isinstance(opt, MaskedOptimizer) else None

    def _sync_optimizer(self) -> None:
        opt = self._masked_optimizer()
        if opt is None:
            return
        if self._regrowing():
            opt.set_masks({})  # the dense shadow weights take plain steps
        else:
            # frozen layers (a stage's train_only) are not in the optimizer: nothing updates them
            held = {id(p) for g in opt.param_groups for p in g["params"]}
            opt.set_masks(
                {m.weight: m._buffers[M.MASK] for m in M.masked_layers(self.model).values() if id(m.weight) in held}
            )

    def _attach(self, masks: Dict[str, torch.Tensor], what: Optional[str] = None) -> None:
        """Attach newly selected masks (zeroing the pruned weights), record the sparsity, hand the
        masks to a masked optimizer; log the event when ``what`` names it."""
        M.attach_masks(self.model, masks)
        self.state["sparsity"] = mask_sparsity(masks)
        self.state["updates"] += 1
        self._sync_optimizer()
        if what is None:
            return
        self.log(
            f"[{getattr(self.trainer, 'name', 'prune')}] {what}: {self.spec.criterion} masks on "
            f"{len(masks)} layers, {100 * self.state['sparsity']:.2f}% of their weights pruned"
        )

    def _gradual_end(self) -> int:
        s = self.spec
        if s.end_step is not None:
            return s.end_step
        return max(s.start_step + 1, int(0.75 * (self.total_steps or 1)))

    def selected_params(self) -> List[str]:
        """Parameter names (``<layer>.weight``) of the layers this pruner manages."""
        return [f"{n}.weight" for n in self.layers]

    def report(self) -> SparsityReport:
        return sparsity_report(self.model, selected=self.selected_params())

    # --------------------------------------------------------------------------- hook
    def on_fit_start(self, trainer) -> None:
        self.trainer = trainer
        self.total_steps = trainer.epochs * trainer.steps_per_epoch
        spec, sched = self.spec, self._schedule
        if sched != "regrow" or self.state["frozen"]:
            M.drop_shadows(self.model)  # dense shadows of an earlier stage are stale now
        if sched is not None and not self.state["selected"]:
            if sched == "gradual":
                s0 = gradual_sparsity(0, spec.start_step, self._gradual_end(), spec.initial_sparsity, spec.sparsity)
                self._attach(_select(self.model, spec, self.layers, s0, salt=0), "gradual start")
            else:
                masks = _select(self.model, spec, self.layers)
                if sched == "regrow":
                    mods = dict(self.model.named_modules())
                    for n in self.layers:
                        M.set_shadow(mods[n], mods[n].weight.detach())
                self._attach(masks, "one-shot" if sched == "oneshot" else "regrow start")
            self.state["selected"] = True
        self._sync_optimizer()

    def extra_loss(self, trainer) -> Optional[torch.Tensor]:
        spec = self.spec
        if spec is None or spec.regularizer is None:
            return None
        if spec.regularizer == "bn_l1":  # network slimming: sparsity on the BatchNorm scales
            return regularization(bn_scales(self.model), "l1", spec.strength)
        mods = dict(self.model.named_modules())
        return regularization([mods[n].weight for n in self.layers], spec.regularizer, spec.strength)

    @torch.no_grad()
    def before_step(self, trainer) -> None:
        if self._regrowing():
            # Straight-through: the gradient computed at shadow * mask updates the dense shadow.
            for m in M.shadowed_layers(self.model).values():
                m.weight.detach().copy_(m._buffers[M.SHADOW])
            return
        if self._masked_optimizer() is None:
            for m in M.masked_layers(self.model).values():
                if m.weight.grad is not None:
                    apply_mask(m.weight.grad, m._buffers[M.MASK], inplace=True)

    @torch.no_grad()
    def after_step(self, trainer) -> None:
        t = trainer.global_step + 1  # steps completed, this one included
        spec, sched = self.spec, self._schedule
        if self._regrowing():
            for m in M.shadowed_layers(self.model).values():
                m._buffers[M.SHADOW].copy_(m.weight.detach())
            stop = spec.update_stop
            if t % spec.update_interval == 0 and (stop is None or t < stop):
                # weight (= shadow now) becomes shadow * new mask
                self._attach(_select(self.model, spec, self.layers, salt=t))
            else:
                M.apply_masks(self.model)
            if (stop is not None and t >= stop) or t >= (self.total_steps or float("inf")):
                self.state["frozen"] = True
                M.drop_shadows(self.model)
                self._sync_optimizer()
                self.log(
                    f"[{trainer.name}] masks frozen at step {t} ({100 * (self.state['sparsity'] or 0):.2f}% pruned)"
                )
            return
        if sched == "gradual":
            start, end = spec.start_step, self._gradual_end()
            if start <= t <= end and ((t - start) % spec.update_interval == 0 or t == end):
                s = gradual_sparsity(t, start, end, spec.initial_sparsity, spec.sparsity)
                self._attach(_select(self.model, spec, self.layers, s, salt=t))
                return
        if self._masked_optimizer() is None:
            M.apply_masks(self.model)

    def on_epoch_end(self, trainer, row: Dict[str, Any]) -> None:
        if M.has_masks(self.model) or (self.spec is not None and self.spec.regularizer is not None):
            rep = self.report()
            row["sparsity"] = rep.selected_sparsity if rep.selected_total else rep.sparsity
