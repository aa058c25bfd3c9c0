"""Compression in a training loop of your own: QAT, pruning with its schedule, KD and the hooks,
without the :class:`~pycompress.train.Trainer`.

A thin layer over the pieces the recipes use (:func:`pycompress.quant.prepare_qat` /
:func:`~pycompress.quant.calibrate`, :class:`pycompress.prune.Pruner` and the masked optimizers,
:class:`pycompress.distill.Distiller`, :class:`pycompress.quant.ALSRefit`, the per-iteration LR
schedules), called in the order the Trainer calls them::

    from pycompress.loop import Compression

    comp = Compression(
        model,
        prune={"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "gradual", "update_interval": 4},
        quantize={"weight_bits": 4, "act_bits": 8},
        distill={"kind": "hinton", "alpha": 0.5, "temperature": 4},
        teacher=teacher,
    )
    comp.calibrate(train_loader)                        # activation scales (with quantize)
    optimizer = comp.start({"name": "sgd", "lr": 0.05}, epochs=2, steps_per_epoch=len(train_loader),
                           schedule={"name": "cosine"})
    for epoch in range(2):
        comp.begin_epoch(train_loader)                  # seeds the epoch, train mode
        for x, y in train_loader:
            loss, logits = comp.loss(x, y)              # forward, KD loss, regularizer
            optimizer.zero_grad()
            loss.backward()
            comp.step()                                 # mask the step, optimizer, LR, new masks
        comp.end_epoch()
    comp.export("model.pcz")

``prune``, ``quantize`` and ``distill`` take exactly what a recipe stage's ``prune:``,
``quantize:`` and ``distill:`` sections take (:class:`pycompress.prune.PruneSpec`,
:class:`pycompress.quant.QuantSpec`, :func:`pycompress.distill.build_loss`), the optimizer and
schedule what its ``optimizer:`` and ``schedule:`` take; every one is validated when given.

Same result as a recipe: a :class:`Compression` built with a recipe stage's sections, its
``seed`` (the recipe's) and ``name`` (the stage's), calibrated with
``seed=recipe_seed * 7 + stage_index`` (:func:`calibration_seed`) and trained for the stage's
epochs, ``max_steps_per_epoch`` steps each, on a loader with the same batches and a
``torch.Generator`` (``pycompress.data.make_loader``) reaches the same masks, quantizer scales and
weights, bit for bit on the CPU (tests/test_own_loop.py). Each epoch re-seeds every RNG and the
loader's generator from ``(seed, name, epoch)`` as the Trainer does (:func:`epoch_seed`). The
recipe's fresh weights come from ``seed_everything(recipe_seed * 2)`` before the student is built
(``recipe_seed * 2 + 1`` for a teacher without a checkpoint), and each stage starts from the
previous stage's best epoch: the last one when a stage has one epoch or its accuracy kept rising.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .train.trainer import calibration_seed, epoch_seed, seed_loader

__all__ = ["Compression", "epoch_seed", "calibration_seed", "seed_loader"]


def _positive_int(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Compression: {what} must be an integer >= 1, got {value!r}")
    return int(value)


class Compression:
    """Compress ``model`` in a training loop of your own (see the module docstring).

    Construction prepares the model in place: with ``quantize`` the selected layers become QAT
    layers (``prepare_qat``; LSQ scales become parameters, so build the optimizer afterwards, or
    let :meth:`start` build it); with ``prune`` (or masks the model already has from an earlier
    pruning run, which are then kept fixed) a :class:`pycompress.prune.Pruner` is attached, which
    chooses its masks in :meth:`start` or along its schedule; with ``distill`` the ``teacher`` is
    frozen in eval mode inside a :class:`pycompress.distill.Distiller`. "als" weight scales get
    the :class:`pycompress.quant.ALSRefit` hook (refit once per epoch).

    Args:
        model: the network to compress (changed in place and moved to ``device``).
        prune: a recipe's ``prune:`` section (:class:`pycompress.prune.PruneSpec` or its dict).
        quantize: a recipe's ``quantize:`` section (:class:`pycompress.quant.QuantSpec` or its dict).
        distill: a recipe's ``distill:`` section (:func:`pycompress.distill.build_loss` spec, e.g.
            ``{"kind": "hinton", "alpha": 0.5, "temperature": 4}`` or ``"kldiv:1"``); needs ``teacher``.
        teacher: the trained teacher network (only with ``distill``).
        device: where the model, the teacher and each batch go.
        seed: base seed of the per-epoch seeding (a recipe's ``seed``).
        name: the loop's name: part of the per-epoch seed (a recipe stage's ``name``) and of log lines.
        log: callable taking a line of text (mask selection events); default: nothing.
        example_input: a batch the model takes (e.g. ``torch.zeros(2, C, H, W)``), given to
            ``prepare_qat`` so that conv / linear layers whose forward never runs stay float (the
            recipe runner passes one); None: every selected layer is quantized.

    Attributes the hooks read, as they read the Trainer's: ``model``, ``optimizer``,
    ``scheduler``, ``epochs``, ``steps_per_epoch``, ``epoch`` (completed epochs), ``global_step``
    (optimizer steps taken), ``name``. Also ``pruner``, ``distiller``, ``hooks``, ``plan`` (the
    QAT plan, :func:`pycompress.quant.qat_plan`) and ``history`` (one row per finished epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        prune: Union[None, Mapping[str, Any], Any] = None,
        quantize: Union[None, Mapping[str, Any], Any] = None,
        distill: Any = None,
        teacher: Optional[nn.Module] = None,
        device: Any = "cpu",
        seed: int = 0,
        name: str = "train",
        log: Optional[Callable[[str], None]] = None,
        example_input: Optional[torch.Tensor] = None,
    ) -> None:
        from .prune import Pruner, PruneSpec, has_masks
        from .quant import ALSRefit, QuantSpec, prepare_qat, qat_modules, qat_plan

        if not isinstance(model, nn.Module):
            raise TypeError(f"Compression: model must be a torch.nn.Module, got {type(model).__name__}")
        if distill is not None and teacher is None:
            raise ValueError("Compression: distill needs a teacher (teacher=<your trained network>)")
        if teacher is not None and distill is None:
            raise ValueError(
                "Compression: a teacher was given without distill; give the KD loss too, e.g. "
                "distill={'kind': 'hinton', 'alpha': 0.5, 'temperature': 4}"
            )
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"Compression: teacher must be a torch.nn.Module, got {type(teacher).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Compression: seed must be an integer, got {seed!r}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"Compression: name must be a non-empty string, got {name!r}")
        # Validate every section before anything changes the model.
        prune_spec = None if prune is None else PruneSpec.from_dict(prune)
        qspec = None if quantize is None else QuantSpec.from_dict(quantize)
        distiller = None
        if distill is not None:
            from .distill import Distiller

            distiller = Distiller(teacher, distill)

        self.device = torch.device(device)
        self.seed = int(seed)
        self.name = name
        self.log = log or (lambda line: None)
        self.model = model
        self.quant_spec = qspec
        self.plan: Optional[Dict[str, Dict[str, Any]]] = None
        if qspec is not None:
            if example_input is None:
                prepare_qat(model, qspec)
            else:
                prepare_qat(model, qspec, example_input=example_input)
        self.model.to(self.device)
        # The recipe runner's order (Runner._fit): pruner, then ALS refit (after the masks), then KD.
        self.hooks: List[Any] = []
        self.pruner = None
        if prune_spec is not None or has_masks(model):
            self.pruner = Pruner(model, prune_spec, log=self.log)
            self.hooks.append(self.pruner)
        if any(m.weight_quant is not None and m.weight_quant.mode == "als" for m in qat_modules(model).values()):
            self.hooks.append(ALSRefit())
        if qspec is not None:
            self.plan = qat_plan(model)
        self.distiller = distiller.to(self.device) if distiller is not None else None

        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.scheduler = None
        self.epochs: Optional[int] = None
        self.steps_per_epoch: Optional[int] = None
        self.grad_clip: Optional[float] = None
        self.epoch = 0  # completed epochs
        self.global_step = 0  # optimizer steps taken
        self.history: List[Dict[str, Any]] = []
        self._row: Optional[Dict[str, Any]] = None  # the epoch in progress
        self._epoch_steps = 0
        self._calibrated = False

    # ------------------------------------------------------------------------------ set-up
    def calibrate(
        self, batches: Iterable, num_batches: Optional[int] = None, *, seed: Optional[int] = None
    ) -> Dict[str, Dict[str, Any]]:
        """Set the activation quantizers' scales from a few batches (:func:`pycompress.quant.calibrate`;
        eval mode, no gradients). Needed once when ``quantize`` gives activation bits, before
        :meth:`start` (which chooses the first masks: the recipes calibrate before it too).

        Args:
            batches: a loader (or any iterable) of ``(inputs, targets)`` or input tensors.
            num_batches: how many (default: the spec's ``calib_batches``).
            seed: re-seed the RNGs and the loader's generator first (:func:`seed_loader`); a recipe
                uses :func:`calibration_seed` of its seed and the stage's index.

        Returns name -> {scale, signed, min, max} of every calibrated quantizer."""
        from .quant import calibrate

        if self.quant_spec is None:
            raise RuntimeError("Compression.calibrate: there is nothing to calibrate without quantize=...")
        if self.optimizer is not None:
            raise RuntimeError(
                "Compression.calibrate: call it before start(): start() chooses the first pruning masks, "
                "and the recipes calibrate before that"
            )
        if num_batches is None:
            num_batches = self.quant_spec.calib_batches
        if seed is not None:
            seed_loader(batches, seed)
        out = calibrate(self.model, batches, num_batches=num_batches, device=self.device)
        self._calibrated = True
        return out

    def build_optimizer(self, spec: Mapping[str, Any]) -> torch.optim.Optimizer:
        """The optimizer a recipe stage builds from its ``optimizer:`` section (``name`` sgd, adam or
        adamw, ``lr``, ``weight_decay``, ``momentum``, ... with no-bias-decay groups; see
        :func:`pycompress.train.validate_optimizer_spec`): when pruning, its masked version
        (:func:`pycompress.prune.build_masked_optimizer`: pruned weights, their momentum and weight
        decay stay exactly 0 in one fused step), else :func:`pycompress.train.build_optimizer`."""
        from .prune import build_masked_optimizer
        from .train import build_optimizer

        if self.pruner is not None:
            return build_masked_optimizer(self.model, spec)
        return build_optimizer(self.model, spec)

    def _check_optimizer(self, opt: torch.optim.Optimizer) -> None:
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        params = {id(p) for p in self.model.parameters()}
        stale = held - params
        if stale:
            raise ValueError(
                f"Compression.start: the optimizer holds {len(stale)} tensor(s) that are not parameters of the "
                "model; build it after Compression(...) (preparing QAT replaces layers)"
            )
        from .quant import qat_modules

        missing = [
            f"{ln}.{qn}.{pn}"
            for ln, m in qat_modules(self.model).items()
            for qn in ("weight_quant", "act_quant")
            if getattr(m, qn, None) is not None
            for pn, p in getattr(m, qn).named_parameters()
            if p.requires_grad and id(p) not in held
        ]
        if missing:
            raise ValueError(
                f"Compression.start: the optimizer does not hold the learned (LSQ) quantizer scales, e.g. "
                f"{missing[0]!r}; build it after Compression(...), or pass the optimizer spec to start()"
            )

    def start(
        self,
        optimizer: Union[Mapping[str, Any], torch.optim.Optimizer],
        *,
        epochs: int,
        steps_per_epoch: int,
        schedule: Optional[Mapping[str, Any]] = None,
        grad_clip: Optional[float] = None,
    ) -> torch.optim.Optimizer:
        """Get ready to train: build the optimizer (from a spec, :meth:`build_optimizer`) or take
        yours, build the per-iteration LR schedule and run the hooks' ``on_fit_start`` (a one-shot
        or gradual pruning schedule chooses its first masks here and hands them to a masked
        optimizer; "als" weight scales are fit). Returns the optimizer.

        Args:
            optimizer: an optimizer spec (a recipe's ``optimizer:`` section) or a torch optimizer
                over the model's parameters, built after ``Compression(...)``. With pruning any
                optimizer works (the gradients are masked before its step, the weights after it);
                the masked one from a spec does it in one fused step, as the recipes do.
            epochs: how many epochs the loop will run (the schedule and a gradual pruning ramp
                span them).
            steps_per_epoch: optimizer steps per epoch (``len(train_loader)``, or your cap).
            schedule: a recipe's ``schedule:`` section (:func:`pycompress.train.build_scheduler`;
                a cosine schedule spans ``epochs`` by default); None: constant LR.
            grad_clip: max global gradient norm, clipped in :meth:`step` before the hooks; None: off.
        """
        from .train import build_scheduler

        if self.optimizer is not None:
            raise RuntimeError("Compression.start: already started; build a new Compression for another run")
        self.epochs = _positive_int("epochs", epochs)
        self.steps_per_epoch = _positive_int("steps_per_epoch", steps_per_epoch)
        if grad_clip is not None and (
            isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not grad_clip > 0
        ):
            raise ValueError(f"Compression.start: grad_clip must be a number > 0 or None, got {grad_clip!r}")
        self._check_calibrated()
        if isinstance(optimizer, torch.optim.Optimizer):
            self._check_optimizer(optimizer)
            opt = optimizer
        elif isinstance(optimizer, Mapping):
            opt = self.build_optimizer(optimizer)
        else:
            raise TypeError(
                f"Compression.start: optimizer must be a spec dict or a torch.optim.Optimizer, got "
                f"{type(optimizer).__name__}"
            )
        self.scheduler = build_scheduler(
            opt, schedule or {"name": "constant"}, self.steps_per_epoch, default_epochs=self.epochs
        )
        self.optimizer = opt
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        for h in self.hooks:
            if hasattr(h, "on_fit_start"):
                h.on_fit_start(self)
        return opt

    def _check_calibrated(self) -> None:
        from .quant import FakeQuantizer

        if self.quant_spec is None or self._calibrated:
            return
        if any(isinstance(q, FakeQuantizer) and q.kind == "act" and not q.is_calibrated for q in self.model.modules()):
            raise RuntimeError(
                "Compression.start: the activation quantizers are not calibrated; call "
                "comp.calibrate(train_loader) first"
            )

    # ------------------------------------------------------------------------------ the loop
    def begin_epoch(self, loader: Any = None, *, seed: bool = True) -> int:
        """Start an epoch: re-seed python, numpy, torch and ``loader``'s generator from
        :func:`epoch_seed` ``(seed, name, epoch)`` (``seed=False``: leave the RNGs alone), then put
        the model in train mode (a teacher stays in eval mode). Returns the epoch's index (0-based).

        Seeding makes an epoch's data order, augmentation and dropout depend only on the seed, the
        name and the epoch; pass the train loader so its shuffling is re-seeded (a DataLoader built
        with ``generator=torch.Generator()``, as ``pycompress.data.make_loader`` builds them)."""
        if self.optimizer is None:
            raise RuntimeError("Compression.begin_epoch: call start(...) first")
        if self._row is not None:
            raise RuntimeError("Compression.begin_epoch: the previous epoch was not ended; call end_epoch()")
        if self.epoch >= self.epochs:
            raise RuntimeError(
                f"Compression.begin_epoch: the {self.epochs} epoch(s) given to start() are done "
                "(the LR schedule and pruning ramp end there)"
            )
        if seed:
            seed_loader(loader, epoch_seed(self.seed, self.name, self.epoch))
        self.model.train()
        if self.distiller is not None:
            self.distiller.train()  # the teacher stays in eval mode
        self._row = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"]}
        self._epoch_steps = 0
        self._loss_sum, self._seen = 0.0, 0
        return self.epoch

    def loss(self, inputs: torch.Tensor, targets: torch.Tensor):
        """The training loss of one batch and the student's logits: ``(loss, logits)``.

        Moves the batch to ``device``, runs the teacher (no gradients, eval mode) and then the
        student, and returns the KD loss (with ``distill``) or the cross-entropy, plus every hook's
        extra loss (a pruning regularizer). Call ``loss.backward()`` on it, then :meth:`step`."""
        x = inputs.to(self.device, non_blocking=True)
        y = targets.to(self.device, non_blocking=True)
        if self.distiller is not None:
            t = self.distiller.teacher_outputs(x)
            out = self.model(x)
            loss = self.distiller.loss(out.float(), t.float(), y)
        else:
            out = self.model(x)
            loss = F.cross_entropy(out.float(), y)
        for h in self.hooks:
            extra = h.extra_loss(self) if hasattr(h, "extra_loss") else None
            if extra is not None:
                loss = loss + extra
        if self._row is not None:
            self._loss_sum += float(loss.detach()) * y.shape[0]
            self._seen += int(y.shape[0])
        return loss, out

    def step(self) -> None:
        """One optimizer step, after ``loss.backward()``: clip the gradients (``grad_clip``), run
        the hooks' ``before_step`` (gradients of pruned weights masked unless the optimizer does
        it), ``optimizer.step()``, the LR schedule's step, then the hooks' ``after_step`` (the
        pruning schedule's new masks, weights re-masked, the once-per-epoch ALS refit)."""
        if self._row is None:
            raise RuntimeError("Compression.step: call begin_epoch(...) first")
        if self._epoch_steps >= self.steps_per_epoch:
            raise RuntimeError(
                f"Compression.step: this epoch already took steps_per_epoch={self.steps_per_epoch} steps; "
                "stop the epoch there (the schedules count on it) and call end_epoch()"
            )
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        for h in self.hooks:
            if hasattr(h, "before_step"):
                h.before_step(self)
        self.optimizer.step()
        self.scheduler.step()
        for h in self.hooks:
            if hasattr(h, "after_step"):
                h.after_step(self)
        self.global_step += 1
        self._epoch_steps += 1

    def end_epoch(self) -> Dict[str, Any]:
        """End the epoch: run the hooks' ``on_epoch_end`` (pruning records the sparsity; "als"
        scales are refit if the last step did not) and return the epoch's row: ``epoch``
        (1-based), ``lr`` (at its start), ``steps``, ``train_loss`` (mean over the batches given to
        :meth:`loss`) and, when pruning, ``sparsity`` (of the pruned layers)."""
        if self._row is None:
            raise RuntimeError("Compression.end_epoch: no epoch in progress; call begin_epoch(...) first")
        row = self._row
        row["steps"] = self._epoch_steps
        row["train_loss"] = self._loss_sum / self._seen if self._seen else math.nan
        for h in self.hooks:
            if hasattr(h, "on_epoch_end"):
                h.on_epoch_end(self, row)
        self.history.append(row)
        self.epoch += 1
        self._row = None
        return row

    # ------------------------------------------------------------------------------ results
    def evaluate(self, loader: Iterable, *, max_batches: Optional[int] = None) -> Dict[str, Any]:
        """Loss, top-1 and top-5 (percent) of the model in eval mode on ``loader``
        (:func:`pycompress.train.evaluate`); the model's mode is restored."""
        from .train import evaluate

        return evaluate(self.model, loader, self.device, max_batches=max_batches)

    def sparsity(self):
        """The :class:`pycompress.prune.SparsityReport` of the pruned layers (None without pruning):
        ``.selected_sparsity``, ``.format()``, ..."""
        return None if self.pruner is None else self.pruner.report()

    def size(self, fold_bn: bool = True) -> Dict[str, Any]:
        """Storage of the model at its bit widths and sparsity (:func:`pycompress.quant.model_size`;
        ``fold_bn``: as the artifact stores it): ``bytes``, ``fp32_bytes``, ``compression``, ..."""
        from .quant import model_size

        return model_size(self.model, fold_bn=fold_bn)

    def export(
        self,
        path: str,
        *,
        loader: Optional[Iterable] = None,
        arch: Optional[Dict[str, Any]] = None,
        data: Optional[Dict[str, Any]] = None,
        encoding: str = "pcz",
        fold_bn: bool = True,
        force: bool = False,
    ) -> Dict[str, Any]:
        """Write the compressed model as an artifact (``pycompress.export``: quantized weights as
        integer codes, pruned weights as a bit mask plus their nonzero values, BatchNorm folded),
        load the written file back and check it; returns its row: ``path``, ``file_bytes``, and with
        a ``loader`` the file's ``top1`` / ``top5`` / ``loss`` and ``agreement`` (the share of
        images where it predicts what the model does). Load it with ``pycompress.export.load``.

        ``arch`` says how to rebuild the network (default: what ``pycompress.models.build``
        recorded on it; a model from elsewhere needs a registered factory,
        :func:`pycompress.models.register`). ``data``: the dataset description ``pycompress eval``
        uses. ``encoding``: pcz, fp16 or uint8 (the tensors that are not quantized codes)."""
        from .export import arch_of
        from .export.pipeline import export_formats

        if encoding not in ("pcz", "fp16", "uint8"):
            raise ValueError(f"Compression.export: encoding must be 'pcz', 'fp16' or 'uint8', got {encoding!r}")
        was_training = self.model.training
        try:
            res = export_formats(
                self.model,
                {encoding: str(path)},
                arch=arch if arch is not None else arch_of(self.model),
                data=data,
                loader=loader,
                device=self.device,
                fold_bn=fold_bn,
                force=force,
                log=self.log,
            )
        finally:
            self.model.train(was_training)
        row = dict(res["artifacts"][0])
        row["counted_bytes"] = res["counted_bytes"]
        row["fp32_bytes"] = res["fp32_bytes"]
        return row
