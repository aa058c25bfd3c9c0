"""Run a validated recipe: stages in order, each from the previous stage's best checkpoint, in a run
directory that survives a crash.

Run directory::

    recipe.yaml                  the resolved recipe (defaults filled in, --set applied)
    run.json                     progress: per stage status, result, timings (written atomically)
    stages/NN-<name>/            checkpoint.pt, best.pt, metrics.csv|jsonl, curves.png,
                                 sparsity.txt|json (stages of a pruned model)
    report.md, report.json       the final report

``resume=True`` continues an interrupted run: finished stages are skipped (their best checkpoints
are reused), the interrupted stage restarts from its last epoch checkpoint with everything restored
(see :mod:`pycompress.train.trainer`), and the result equals an uninterrupted run's.

Under ``torchrun --nproc_per_node N`` the training stages run on all N processes with
DistributedDataParallel (:mod:`pycompress.train.distributed`); process 0 alone writes the run
directory and runs the stages that do not train, and every process receives its results. A run is
resumed with the same number of processes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import time
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
import yaml

from .. import backends
from ..train import distributed as D
from ..train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, seed_everything
from ..train.trainer import calibration_seed, seed_loader
from ..utils import atomic_write_text
from .layers import treatment_lines
from .schema import CHECKPOINT_KINDS, DEFAULT_EXPORT_FORMATS, TRAINING_KINDS, Recipe, StageSpec, dump_recipe

RUN_FORMAT = "pycompress-run"


class RunError(RuntimeError):
    """The run cannot start or continue (an existing run directory, a changed recipe, ...)."""


# ------------------------------------------------------------------------------ models from arch
def model_arch(
    name: str, args: Dict[str, Any], in_channels: int, num_classes: int, qat: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Everything needed to rebuild a model before loading its state dict (a slimmed model also
    carries ``"slim"``: its per-layer channel counts)."""
    return {
        "model": name,
        "args": dict(args),
        "in_channels": int(in_channels),
        "num_classes": int(num_classes),
        "qat": qat,
    }


def build_from_arch(arch: Dict[str, Any]) -> nn.Module:
    from ..models import build

    model = build(
        arch["model"], in_channels=arch["in_channels"], num_classes=arch["num_classes"], **arch.get("args", {})
    )
    if arch.get("slim"):
        from ..prune.structured import apply_plan as apply_slim_plan

        apply_slim_plan(model, arch["slim"])
    if arch.get("qat"):
        from ..quant import apply_plan

        apply_plan(model, arch["qat"])
    return model


def load_model(path: str, map_location: Any = "cpu"):
    """Rebuild the model stored in a pycompress checkpoint: ``(model, checkpoint)``."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if "arch" not in ckpt:
        raise CheckpointError(f"{path!r} does not say how to rebuild its model (no 'arch' entry)")
    model = build_from_arch(ckpt["arch"])
    _load_state(model, ckpt["model"])
    return model, ckpt


def _load_state(model: nn.Module, state: Dict[str, Any]) -> None:
    """load_state_dict, after giving the model the pruning-mask buffers the state has."""
    from ..prune import prepare_state_dict

    prepare_state_dict(model, state)
    model.load_state_dict(state)


def _load_teacher_weights(model: nn.Module, path: str) -> None:
    """A teacher from a pycompress checkpoint or a plain state_dict file."""
    if not os.path.isfile(path):
        raise RunError(f"teacher.checkpoint {path!r} does not exist")
    try:
        ckpt = load_checkpoint(path)
        state = ckpt["model"]
    except CheckpointError as first:
        try:  # a plain state_dict file (weights only: a file from someone else runs no code)
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable, or refused by the weights-only load
            raise RunError(
                f"teacher.checkpoint {path!r} is neither a pycompress checkpoint ({first}) nor a "
                f"weights-only state_dict file ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as exc:
        raise RunError(f"teacher.checkpoint {path!r} does not fit the teacher model: {exc}") from None


def count_params(model: nn.Module) -> int:
    """Parameters of the network itself (quantizer scales excluded)."""
    return sum(
        p.numel()
        for n, p in model.named_parameters()
        if not any(part in ("weight_quant", "act_quant") for part in n.split("."))
    )


# ------------------------------------------------------------------------------ the runner
class Runner:
    def __init__(
        self,
        recipe: Recipe,
        out_dir: str,
        *,
        data_root: Optional[str] = None,
        device: Optional[str] = None,
        backend: Optional[str] = None,
        resume: bool = False,
        progress: Optional[bool] = None,
        log: Optional[Callable[[str], None]] = None,
        compile: bool = False,
    ):
        self.recipe = recipe
        # --compile: torch.compile in every training stage (a stage's own `compile` mapping gives the
        # options). Not part of the recipe (it does not change what is computed), so a resume may add
        # or drop it.
        self.compile_all = bool(compile)
        self.out = os.fspath(out_dir)
        self.data_root = data_root
        self.resume = resume
        self.progress = progress
        self.log = log or (lambda line: print(line, flush=True))
        dev = device or recipe.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise RunError("device 'cuda' requested but no CUDA device is available (use --device cpu)")
        self.device = torch.device(dev)
        self.backend = backend or recipe.kernel_backend
        if self.backend != "auto":
            reason = backends.status(self.backend)
            if reason is not None:
                raise RunError(f"kernel backend {self.backend!r} is not available here: {reason}")
        for stage in recipe.stages:  # fail before anything trains, not at the end of the run
            if stage.kind == "export" and "onnx" in (stage.formats or ()):
                import importlib.util

                missing = [m for m in ("onnx", "onnxruntime") if importlib.util.find_spec(m) is None]
                if missing:
                    raise RunError(
                        f"stage {stage.name!r} exports onnx, which needs the onnx extra (missing: "
                        f"{', '.join(missing)}): pip install 'pycompress[onnx]', or drop onnx from its "
                        f"formats"
                    )
        self.state: Dict[str, Any] = {}
        self.current: Dict[str, Dict[str, Any]] = {}  # target -> {"arch", "path"}

    # -------------------------------------------------------------------- run directory
    def stage_compile(self, stage: StageSpec) -> Optional[Dict[str, Any]]:
        """torch.compile's arguments for a training stage (None: eager)."""
        if stage.compile is not None:
            return stage.compile
        return {} if self.compile_all else None

    def _p(self, *parts: str) -> str:
        return os.path.join(self.out, *parts)

    def stage_dir(self, index: int, stage: StageSpec) -> str:
        return self._p("stages", f"{index:02d}-{stage.name}")

    def _save_state(self) -> None:
        if D.is_main():
            atomic_write_text(self._p("run.json"), json.dumps(self.state, indent=2, default=str))

    def _prepare_dir(self) -> None:
        """Create or check the run directory (process 0); every process gets the run state."""
        self.state = D.on_main(self._prepare_dir_main)

    def _prepare_dir_main(self) -> Dict[str, Any]:
        resolved = dump_recipe(self.recipe)
        run_json = self._p("run.json")
        if os.path.exists(run_json):
            if not self.resume:
                raise RunError(f"{self.out} already holds a run; pass --resume to continue it, or choose another --out")
            with open(run_json, encoding="utf-8") as f:
                self.state = json.load(f)
            was = int(self.state.get("world_size", 1))
            if was != D.world_size():
                raise RunError(
                    f"cannot resume {self.out}: it was started with {was} process(es) and this run has "
                    f"{D.world_size()}; the global batch (per-process batch x processes) would change. Resume "
                    f"with the same number: "
                    + (f"torchrun --nproc_per_node {was} -m pycompress run ..." if was > 1 else "pycompress run ...")
                )
            with open(self._p("recipe.yaml"), encoding="utf-8") as f:
                before = yaml.safe_load(f)
            now = yaml.safe_load(resolved)
            if before != now:
                diff = _diff(before, now)
                raise RunError(
                    f"cannot resume {self.out}: the recipe changed since the run started "
                    f"({'; '.join(diff[:5])}). Resume with the same recipe and --set "
                    "options, or start a new run with another --out"
                )
            self.log(f"resuming run in {self.out}")
        else:
            os.makedirs(self.out, exist_ok=True)
            atomic_write_text(self._p("recipe.yaml"), resolved)
            self.state = {
                "format": RUN_FORMAT,
                "recipe": self.recipe.name,
                "source": self.recipe.source,
                "started": _dt.datetime.now().isoformat(timespec="seconds"),
                "world_size": D.world_size(),
                "stages": {},
            }
            self._save_state()
        return self.state

    # -------------------------------------------------------------------- data and models
    def _data(self) -> None:
        from ..data import build_dataset, make_loader

        d = self.recipe.data
        train_set, info = build_dataset(d.dataset, "train", data_root=self.data_root, augment=d.augment, **d.options)
        test_set, _ = build_dataset(d.dataset, "test", data_root=self.data_root, augment=False, **d.options)
        val_set = None
        if d.validation:
            train_set, val_set = self._split_validation(train_set, d)
        self.info = info
        self.train_set = train_set
        self.train_loader = self._train_loader(d.batch_size)
        pin = self.device.type == "cuda"
        opts = {"shuffle": False, "seed": self.recipe.seed, "num_workers": d.num_workers, "pin_memory": pin}
        self.test_loader = make_loader(test_set, d.eval_batch_size, **opts)
        self.val_loader = None if val_set is None else make_loader(val_set, d.eval_batch_size, **opts)
        self.data_desc = {
            "dataset": d.dataset,
            "options": dict(d.options),
            "train_samples": len(train_set),
            "test_samples": len(test_set),
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "image_size": list(info.image_size),
            "mean": list(info.mean),
            "std": list(info.std),
        }
        if val_set is not None:
            self.data_desc["val_samples"] = len(val_set)
            self.data_desc["validation_seed"] = d.validation_seed

    def _split_validation(self, train_set, d):
        """(train, validation): ``d.validation`` training images, a random subset drawn with
        ``d.validation_seed`` (the same for every recipe seed), held out and read without
        augmentation; the rest, in their original order, train."""
        from torch.utils.data import Subset

        from ..data import build_dataset

        n = len(train_set)
        if d.validation >= n:
            raise RunError(
                f"data.validation is {d.validation} but the {d.dataset} training split has only {n} images; "
                "hold out fewer"
            )
        gen = torch.Generator().manual_seed(int(d.validation_seed))
        perm = torch.randperm(n, generator=gen)
        val_idx = sorted(perm[: d.validation].tolist())
        train_idx = sorted(perm[d.validation :].tolist())
        plain = train_set
        if d.augment:
            plain, _ = build_dataset(d.dataset, "train", data_root=self.data_root, augment=False, **d.options)
        return Subset(train_set, train_idx), Subset(plain, val_idx)

    def _stage_loader(self, stage: StageSpec):
        """The whole training set at the stage's batch size (default: the data section's)."""
        return self.train_loader if stage.batch_size is None else self._train_loader(stage.batch_size)

    def _stage_train_loader(self, stage: StageSpec):
        """A training stage's loader: under torchrun, this process's shard."""
        return D.shard_loader(self._stage_loader(stage))

    def _optimizer_spec(self, stage: StageSpec) -> Dict[str, Any]:
        """The stage's optimizer, its learning rate scaled by ``distributed.lr_scale`` under torchrun."""
        factor = D.lr_factor(self.recipe.distributed.lr_scale)
        if factor == 1.0:
            return stage.optimizer
        return dict(stage.optimizer, lr=stage.optimizer["lr"] * factor)

    def _train_loader(self, batch_size: int):
        from ..data import make_loader

        d = self.recipe.data
        # drop_last keeps every step's batch statistics comparable (BN) unless the set is tiny
        return make_loader(
            self.train_set,
            batch_size,
            shuffle=True,
            seed=self.recipe.seed,
            num_workers=d.num_workers,
            drop_last=len(self.train_set) > batch_size,
            pin_memory=self.device.type == "cuda",
        )

    def _initial(self, target: str) -> Dict[str, Any]:
        spec = self.recipe.model if target == "student" else self.recipe.teacher
        arch = model_arch(spec.name, spec.args, self.info.in_channels, self.info.num_classes)
        cur = {"arch": arch, "path": getattr(spec, "checkpoint", None), "fresh": True}
        if spec.weights is not None:
            cur["weights"] = {"path": spec.weights, "strict": spec.strict}
        from ..models import is_external

        if spec.weights is not None or is_external(spec.name):
            self._check_initial(target, cur)  # a weights file that does not fit fails now, not mid-run
        return cur

    def _check_initial(self, target: str, cur: Dict[str, Any]) -> None:
        """Build the target's starting model once, before any stage: load its weights file (logging
        what was loaded and skipped) and check that a model from outside the zoo takes the data's
        images and gives one output per class."""
        from ..models.weights import WeightsError

        name = cur["arch"]["model"]
        try:
            model = self._materialize(target, cur, log=self.log)
        except WeightsError as exc:  # it names the file and the model
            raise RunError(str(exc)) from None
        shape = self._input_shape()
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros([2] + shape))
        except Exception as exc:  # noqa: BLE001 - any failure here would fail the first stage
            raise RunError(
                f"{target} {name!r} cannot run on the data's images ({'x'.join(map(str, shape))}): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        k = self.info.num_classes
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, k):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise RunError(
                f"{target} {name!r} gives {got} for a batch of 2 images; the dataset has {k} classes, so it "
                f"must give a tensor of shape (2, {k}) (an import: factory receives num_classes when its "
                f"signature names it)"
            )

    def _materialize(self, target: str, cur: Optional[Dict[str, Any]] = None, log=None) -> nn.Module:
        cur = cur or self.current[target]
        # Fresh weights are seeded per target, so they do not depend on what ran before.
        seed_everything(self.recipe.seed * 2 + (target == "teacher"))
        model = build_from_arch(cur["arch"])
        if cur["path"] is not None:
            if cur.get("fresh"):  # teacher.checkpoint given in the recipe
                _load_teacher_weights(model, cur["path"])
            else:
                _load_state(model, load_checkpoint(cur["path"])["model"])
        elif cur.get("fresh") and cur.get("weights"):  # model.weights / teacher.weights
            from ..models.weights import load_weights

            w = cur["weights"]
            what = f"the {target} ({cur['arch']['model']})"
            load_weights(model, w["path"], strict=w["strict"], what=what, log=log)
        return model

    # -------------------------------------------------------------------- stages
    def _run_evaluate(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        from ..train import evaluate

        model = self._materialize(stage.target)
        t0 = time.perf_counter()
        ev = evaluate(model, self._test_loader(stage), self.device, progress=self.progress, desc=f"{stage.name}")
        res = {
            "top1": ev["top1"],
            "top5": ev["top5"],
            "loss": ev["loss"],
            "samples": ev["samples"],
            "selection": self.selection,
        }
        if self.val_loader is not None:
            loader = self._eval_loader(stage)
            val = evaluate(model, loader, self.device, progress=self.progress, desc=f"{stage.name} val")
            res["val_top1"] = val["top1"]
        res["seconds"] = time.perf_counter() - t0
        res.update(_model_facts(model, self._input_shape()))
        self.log(
            f"[{stage.name}] {stage.target}: top1 {ev['top1']:.2f} top5 {ev['top5']:.2f} "
            f"loss {ev['loss']:.4f} on {ev['samples']} test samples "
            f"({res['params']:,} params, {res['size_bytes']:,} bytes)"
        )
        return res

    def _input_shape(self):
        return [int(self.data_desc["in_channels"])] + [int(v) for v in self.data_desc["image_size"]]

    def _run_training(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        if stage.slim is not None:
            return self._run_slim(index, stage)
        t0 = time.perf_counter()
        sdir = self.stage_dir(index, stage)
        resuming = os.path.exists(os.path.join(sdir, "checkpoint.pt"))
        train_loader = self._stage_train_loader(stage)
        model = self._materialize(stage.target)
        arch = dict(self.current[stage.target]["arch"])
        if stage.quantize is not None:
            from ..quant import QuantSpec, calibrate, prepare_qat, qat_plan

            qspec = QuantSpec.from_dict(stage.quantize)
            # a probe batch: layers whose forward does not run stay float (prepare_qat warns)
            plan = prepare_qat(model, qspec, example_input=torch.zeros([2] + self._input_shape()))
            self.log(
                f"[{stage.name}] QAT on {len(plan)} layers: "
                + ", ".join(f"{n} w{p.get('weight_bits')}/a{p.get('act_bits')}" for n, p in list(plan.items())[:4])
                + (" ..." if len(plan) > 4 else "")
            )
            model.to(self.device)
            if not resuming:
                # Calibration batches come from the train loader in a seeded order.
                seed_loader(train_loader, calibration_seed(self.recipe.seed, index))
                # A train_only stage changes nothing outside its layers: only new (or rebuilt)
                # activation quantizers are calibrated; otherwise every one is, from this model.
                calibrate(
                    model,
                    train_loader,
                    num_batches=qspec.calib_batches,
                    device=self.device,
                    only_uncalibrated=bool(stage.train_only),
                )
            arch["qat"] = qat_plan(model)
        summary, trainer = self._fit(stage, model, arch, sdir, stage.name, resuming, train_loader)
        # epochs of earlier sessions (resume) + everything this session did (set-up, calibration)
        summary["seconds"] = trainer.elapsed - trainer.session_elapsed + (time.perf_counter() - t0)
        return summary

    def _fit(
        self,
        stage: StageSpec,
        model: nn.Module,
        arch: Dict[str, Any],
        sdir: str,
        name: str,
        resuming: bool,
        train_loader,
    ):
        """Train ``model`` as ``stage`` says into ``sdir``; the best checkpoint becomes the target's
        current model. Returns (summary, trainer)."""
        from ..train import Trainer

        hooks, optimizer = [], self._optimizer_spec(stage)
        pruner = None
        eval_modules = []
        if stage.train_only:
            from ..train import freeze_except

            try:
                fr = freeze_except(model, stage.train_only)
            except ValueError as exc:
                raise RunError(f"stage {stage.name!r}: {exc}") from None
            eval_modules = fr["eval_modules"]
            self.log(
                f"[{name}] trains only {', '.join(fr['trainable'])} ({fr['trainable_params']:,} parameters); "
                f"{len(fr['frozen'])} parameter tensors frozen, {len(eval_modules)} modules kept in eval mode"
            )
        from ..prune import Pruner, build_masked_optimizer, has_masks

        if stage.prune is not None or has_masks(model):
            # Masks of earlier stages stay fixed; a prune section chooses (new) ones.
            model.to(self.device)
            pruner = Pruner(model, stage.prune, log=self.log)
            hooks.append(pruner)
            optimizer = build_masked_optimizer(model, optimizer)
        from ..quant import ALSRefit, qat_modules

        # MicroNet's ALS weight scales: refit once per epoch (after the pruner re-applied the masks)
        if any(m.weight_quant is not None and m.weight_quant.mode == "als" for m in qat_modules(model).values()):
            hooks.append(ALSRefit())
        distiller = None
        if stage.distill is not None:
            from ..distill import Distiller

            distiller = Distiller(self._materialize("teacher"), stage.distill)
        trainer = Trainer(
            model,
            train_loader,
            self._eval_loader(stage, shard=True),
            epochs=stage.epochs,
            optimizer=optimizer,
            hooks=hooks,
            schedule=stage.schedule,
            device=self.device,
            distiller=distiller,
            amp=stage.amp,
            compile=self.stage_compile(stage),
            seed=self.recipe.seed,
            out_dir=sdir,
            log_format=stage.log_format,
            progress=self.progress,
            max_steps_per_epoch=stage.max_steps_per_epoch,
            grad_clip=stage.grad_clip,
            name=name,
            log=self.log,
            eval_modules=eval_modules,
            distributed={
                "sync_bn": self.recipe.distributed.sync_bn,
                "find_unused_parameters": self.recipe.distributed.find_unused_parameters,
            },
            checkpoint_extra=lambda: {
                "arch": arch,
                "data": self.data_desc,
                "recipe": self.recipe.name,
                "target": stage.target,
                "kernel_backend": self.backend,
            },
        )
        summary = trainer.fit(resume=resuming)
        best_path = os.path.join(sdir, "best.pt")
        self.current[stage.target] = {"arch": arch, "path": best_path, "fresh": False}
        summary = D.on_main(lambda: self._stage_facts(summary, best_path, pruner, sdir, name, stage))
        summary["best"] = os.path.relpath(best_path, self.out)  # the run directory may move
        summary["arch"] = arch
        return summary, trainer

    def _stage_facts(
        self, summary: Dict[str, Any], best_path: str, pruner, sdir: str, name: str, stage: StageSpec
    ) -> Dict[str, Any]:
        """The best model's test metrics (with a validation split), size, MACs, latency and
        sparsity report (process 0)."""
        summary = dict(summary)
        best_model, _ = load_model(best_path)
        summary = self._with_test(summary, best_model, stage, summary.get("best_top1"))
        summary.update(_model_facts(best_model, self._input_shape()))
        if pruner is not None:
            from ..prune import sparsity_report

            rep = sparsity_report(best_model, selected=pruner.selected_params())
            atomic_write_text(os.path.join(sdir, "sparsity.json"), json.dumps(rep.to_dict(), indent=1) + "\n")
            atomic_write_text(os.path.join(sdir, "sparsity.txt"), rep.format() + "\n")
            summary["sparsity"] = {
                "selected": rep.selected_sparsity,
                "overall": rep.sparsity,
                "selected_params": rep.selected_total,
                "nonzero_params": rep.alive,
                "compression_rate": _finite(rep.compression_rate),
                "layers": len(pruner.layers),
            }
            self.log(f"[{name}] sparsity of the best model ({sdir}/sparsity.txt):\n{rep.format()}")
        return summary

    def _run_slim(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        """Network slimming: each round removes its share of channels from the current best model
        (``pycompress.prune.structured``), builds a NEW optimizer and schedule for the smaller
        network and fine-tunes it for ``epochs``, keeping the round's best epoch; the next round
        starts from that. A round interrupted mid-way resumes from its own checkpoint."""
        from ..prune.structured import SlimSpec, slim

        t0 = time.perf_counter()
        spec = SlimSpec.from_dict(stage.slim)
        sdir = self.stage_dir(index, stage)
        shape = self._input_shape()
        train_loader = self._stage_train_loader(stage)
        before = D.on_main(lambda: _model_facts(self._materialize(stage.target), shape))
        rounds, seconds, summary = [], 0.0, {}
        for r in range(1, spec.rounds + 1):
            rdir = os.path.join(sdir, f"round-{r}")
            name = stage.name if spec.rounds == 1 else f"{stage.name}-r{r}"
            ckpt = os.path.join(rdir, "checkpoint.pt")
            if os.path.exists(ckpt):  # an interrupted (or finished) round: its own architecture
                arch = load_checkpoint(ckpt)["arch"]
                seed_everything(self.recipe.seed * 2)
                model = build_from_arch(arch)
                resuming = True
            else:
                model = self._materialize(stage.target)
                res = slim(model, spec, input_shape=shape, per_round=True, last_round=r == spec.rounds)
                arch = dict(self.current[stage.target]["arch"], slim=res.plan)
                self.log(
                    f"[{name}] slimmed ({spec.criterion}, {100 * spec.ratio_for('', True):.1f}% of each group's "
                    f"channels this round):\n{res.format()}"
                )
                resuming = False
            summary, trainer = self._fit(stage, model, arch, rdir, name, resuming, train_loader)
            seconds += trainer.elapsed - trainer.session_elapsed  # epochs of earlier sessions (resume)
            rounds.append(
                {
                    "round": r,
                    "params": summary["params"],
                    "macs": summary.get("macs"),
                    "latency_ms": summary.get("latency_ms"),
                    "best_top1": summary.get("best_top1"),  # on the selection split
                    "top1": summary.get("top1"),  # the test set's, with a validation split
                    "best_epoch": summary.get("best_epoch"),
                    "best": summary["best"],
                }
            )
        summary["slim"] = {
            "rounds": rounds,
            "before": before,
            "criterion": spec.criterion,
            "ratio": spec.ratio,
            "params_ratio": summary["params"] / max(before["params"], 1),
            "macs_ratio": (summary.get("macs") or 0) / max(before.get("macs") or 1, 1),
        }
        summary["seconds"] = seconds + (time.perf_counter() - t0)
        summary["epochs"] = stage.epochs * spec.rounds
        return summary

    def _preflight(self) -> None:
        """Checks that need the data's shapes, before anything trains: every slim stage's settings
        are tried on a throwaway copy of the student (a graph the analysis cannot follow, or
        exclusions that leave nothing to prune, fail here, not after hours of training)."""
        slims = [s for s in self.recipe.stages if s.slim is not None]
        if not slims:
            return
        from ..prune.structured import SlimError, SlimSpec, slim

        spec = self.recipe.model
        for stage in slims:
            probe = build_from_arch(model_arch(spec.name, spec.args, self.info.in_channels, self.info.num_classes))
            try:
                slim(probe, SlimSpec.from_dict(stage.slim), input_shape=self._input_shape(), per_round=True)
            except SlimError as exc:
                raise RunError(f"stage {stage.name!r}: {exc}") from None

    def _seeded_train_loader(self, index: int, stage: StageSpec):
        """The stage's training loader, its shuffling seeded from (seed, stage index)."""
        loader = self._stage_loader(stage)
        seed_loader(loader, calibration_seed(self.recipe.seed, index))
        return loader

    def _eval_loader(self, stage: StageSpec, shard: bool = False):
        """The loader that selects (best epoch, best round): the validation split when the data
        section holds one out, else the test set; ``eval_batches`` of it when the stage says so.
        ``shard``: this process's shard under torchrun (training stages; their evaluation sums over
        processes)."""
        base = self.val_loader if self.val_loader is not None else self.test_loader
        loader = D.shard_loader(base, shuffle=False) if shard else base
        return loader if stage.eval_batches is None else _Limited(loader, stage.eval_batches)

    def _test_loader(self, stage: StageSpec):
        """The test set (``eval_batches`` of it when the stage says so): reported, never selected on."""
        loader = self.test_loader
        return loader if stage.eval_batches is None else _Limited(loader, stage.eval_batches)

    @property
    def selection(self) -> str:
        """What chooses best epochs and rounds: "validation" or "test" (no split held out)."""
        return "test" if self.val_loader is None else "validation"

    def _with_test(self, res: Dict[str, Any], model: nn.Module, stage: StageSpec, val_top1) -> Dict[str, Any]:
        """With a validation split: evaluate the stage's output model once on the test set; its
        numbers become the result's top1/top5/loss (the report's), the selection metric stays as
        ``val_top1``. Without one, the stage's numbers already are test numbers."""
        res["selection"] = self.selection
        if self.val_loader is None:
            return res
        from ..train import evaluate

        model.to(self.device)
        ev = evaluate(model, self._test_loader(stage), self.device, progress=self.progress, desc=f"{stage.name} test")
        res.update(
            {
                "val_top1": val_top1,
                "top1": ev["top1"],
                "top5": ev["top5"],
                "loss": ev["loss"],
                "test_samples": ev["samples"],
            }
        )
        self.log(
            f"[{stage.name}] test: top1 {ev['top1']:.2f} top5 {ev['top5']:.2f} on {ev['samples']} images "
            f"(validation top1 {_fmt(val_top1)}, what selected it)"
        )
        return res

    def _save_stage_model(
        self, index: int, stage: StageSpec, model: nn.Module, arch: Dict[str, Any], history, best: Dict[str, Any]
    ) -> str:
        """best.pt of a stage that does not train (ptq, bn_recalibrate), loadable like a trained one."""
        sdir = self.stage_dir(index, stage)
        path = os.path.join(sdir, "best.pt")
        save_checkpoint(
            path,
            {
                "stage": stage.name,
                "epoch": len(history),
                "epochs": len(history),
                "model": model.state_dict(),
                "history": history,
                "best_metric": best.get("top1"),
                "complete": True,
                "arch": arch,
                "data": self.data_desc,
                "recipe": self.recipe.name,
                "target": stage.target,
                "kernel_backend": self.backend,
            },
        )
        self.current[stage.target] = {"arch": arch, "path": path, "fresh": False}
        return path

    def _run_ptq(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        """Post-training quantization: per-channel weights, calibrated activations, no training."""
        from ..quant import QuantSpec, quantize_post_training
        from ..train import evaluate

        t0 = time.perf_counter()
        model = self._materialize(stage.target).to(self.device)
        qspec = QuantSpec.from_dict(stage.quantize)
        eval_loader = self._eval_loader(stage)
        before = evaluate(model, eval_loader, self.device, progress=self.progress, desc=f"{stage.name} float")
        batches = stage.batches or qspec.calib_batches
        res = quantize_post_training(
            model, qspec, self._seeded_train_loader(index, stage), num_batches=batches, device=self.device
        )
        ev = evaluate(model, eval_loader, self.device, progress=self.progress, desc=stage.name)
        arch = dict(self.current[stage.target]["arch"])
        arch["qat"] = res["plan"]
        self.log(
            f"[{stage.name}] post-training quantization of {len(res['plan'])} layers, {batches} calibration "
            f"batches: {self.selection} top1 {before['top1']:.2f} -> {ev['top1']:.2f}"
        )
        history = [{"epoch": 1, "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"]}]
        best_path = self._save_stage_model(index, stage, model, arch, history, ev)
        out = {
            "top1": ev["top1"],
            "top5": ev["top5"],
            "loss": ev["loss"],
            "float_top1": before["top1"],
            "calib_batches": batches,
            "layers": len(res["plan"]),
            "best": os.path.relpath(best_path, self.out),
            "arch": arch,
        }
        out = self._with_test(out, model, stage, out["top1"])
        out["seconds"] = time.perf_counter() - t0
        out.update(_model_facts(model, self._input_shape()))
        return out

    def _run_bn_recalibrate(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        """MicroNet step 5: re-estimate BatchNorm statistics (a true average over ``batches`` per
        round, rounds continuing the same average), evaluate after each round, keep the best
        (the model as it came in counts as round 0)."""
        import copy

        from ..train import evaluate, recalibrate_bn

        t0 = time.perf_counter()
        model = self._materialize(stage.target).to(self.device)
        eval_loader = self._eval_loader(stage)
        loader = self._seeded_train_loader(index, stage)
        batches = stage.batches or len(loader)
        ev = evaluate(model, eval_loader, self.device, progress=self.progress, desc=f"{stage.name} before")
        history = [{"round": 0, "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "batches": 0}]
        best, best_state = history[0], copy.deepcopy(model.state_dict())
        self.log(f"[{stage.name}] before recalibration: {self.selection} top1 {ev['top1']:.2f}")
        seen = 0
        for r in range(1, (stage.rounds or 1) + 1):
            info = recalibrate_bn(model, loader, num_batches=batches, device=self.device, reset=r == 1)
            seen += info["batches"]
            ev = evaluate(model, eval_loader, self.device, progress=self.progress, desc=f"{stage.name} round {r}")
            history.append({"round": r, "top1": ev["top1"], "top5": ev["top5"], "loss": ev["loss"], "batches": seen})
            self.log(
                f"[{stage.name}] round {r}: {info['layers']} BatchNorm layers over {seen} batches: "
                f"{self.selection} top1 {ev['top1']:.2f}"
            )
            if ev["top1"] > best["top1"]:
                best, best_state = history[-1], copy.deepcopy(model.state_dict())
        model.load_state_dict(best_state)
        arch = dict(self.current[stage.target]["arch"])
        best_path = self._save_stage_model(index, stage, model, arch, history, best)
        self.log(
            f"[{stage.name}] kept round {best['round']} ({self.selection} top1 {best['top1']:.2f}; before "
            f"{history[0]['top1']:.2f})"
        )
        out = {
            "top1": best["top1"],
            "top5": best["top5"],
            "loss": best["loss"],
            "before_top1": history[0]["top1"],
            "best_round": best["round"],
            "rounds": history,
            "best": os.path.relpath(best_path, self.out),
            "arch": arch,
        }
        out = self._with_test(out, model, stage, out["top1"])
        out["seconds"] = time.perf_counter() - t0
        out.update(_model_facts(model, self._input_shape()))
        return out

    def _run_export(self, index: int, stage: StageSpec) -> Dict[str, Any]:
        """Write the student's compressed artifacts and measure each file on the test set."""
        from ..export.pipeline import artifact_paths, export_formats

        t0 = time.perf_counter()
        cur = self.current["student"]
        model = self._materialize("student")
        formats = stage.formats or list(DEFAULT_EXPORT_FORMATS)
        base = self._p("model" if stage.name == "export" else stage.name)
        arch = {k: v for k, v in cur["arch"].items() if k != "qat"}
        source = {
            "checkpoint": os.path.relpath(cur["path"], self.out) if cur["path"] else None,
            "recipe": self.recipe.name,
            "run": os.path.basename(os.path.abspath(self.out)),
        }
        res = export_formats(
            model,
            artifact_paths(base, formats),
            arch=arch,
            data=self.data_desc,
            source=source,
            loader=self._test_loader(stage),
            device=self.device,
            fold_bn=True if stage.fold_bn is None else stage.fold_bn,
            force=True,
            log=lambda line: self.log(f"[{stage.name}] {line}"),
        )
        for a in res["artifacts"]:
            a["file"] = os.path.relpath(a.pop("path"), self.out)
        main = next((a for a in res["artifacts"] if a["format"] == "pcz"), res["artifacts"][0])
        facts = _model_facts(model)
        out = {
            "top1": main.get("top1"),
            "top5": main.get("top5"),
            "params": facts["params"],
            "size_bytes": main["file_bytes"],
            "counted_bytes": res["counted_bytes"],
            "counted_bytes_unfolded": res["counted_bytes_unfolded"],
            "fp32_bytes": res["fp32_bytes"],
            "quantized": facts["quantized"],
            "checkpoint_top1": (res["source"] or {}).get("top1"),
            "artifacts": res["artifacts"],
            "seconds": time.perf_counter() - t0,
        }
        return out

    def run(self) -> Dict[str, Any]:
        from ..ops import value_checks

        with D.session(self.device.type) as ddp_device:  # under torchrun: the process group
            if ddp_device is not None:
                self.device = ddp_device  # cuda:LOCAL_RANK, or the CPU
                if not D.is_main():
                    self.log, self.progress = (lambda line: None), False
            ctx = backends.use(self.backend) if self.backend != "auto" else contextlib.nullcontext()
            # The QAT modules only pass valid scales; on a GPU the op's value checks would cost one
            # host sync per call.
            checks = value_checks(False) if self.device.type == "cuda" else contextlib.nullcontext()
            with ctx, checks:
                return self._run()

    def _final_layers(self) -> Optional[Dict[str, Any]]:
        """The report's "layers": each layer of the student as the run leaves it and its treatment."""
        from .layers import layer_treatments

        cur = self.current.get("student")
        if cur is None:
            return None
        model = self._materialize("student")
        probe = torch.zeros([2] + self._input_shape())
        path = cur.get("path")
        return {
            "stage": os.path.relpath(path, self.out) if path and not cur.get("fresh") else None,
            "rows": layer_treatments(model, probe),
        }

    def _adopt(self, stage: StageSpec, res: Dict[str, Any]) -> None:
        """A finished stage that ends with a checkpoint makes it its target's current model."""
        if stage.kind in CHECKPOINT_KINDS:
            self.current[stage.target] = {"arch": res["arch"], "path": self._p(res["best"]), "fresh": False}

    def _run(self) -> Dict[str, Any]:
        self._prepare_dir()
        t_start = time.perf_counter()
        self._data()
        self._preflight()
        self.current["student"] = self._initial("student")
        if self.recipe.teacher is not None:
            self.current["teacher"] = self._initial("teacher")
        self.log(
            f"run {self.recipe.name!r}: {len(self.recipe.stages)} stages on {self.device}, "
            f"kernel backend {self.backend}, data {self.recipe.data.dataset} "
            f"({self.data_desc['train_samples']} train / "
            + (f"{self.data_desc['val_samples']} validation / " if self.val_loader is not None else "")
            + f"{self.data_desc['test_samples']} test) "
            f"-> {self.out}"
        )
        if D.is_distributed():
            w = D.world_size()
            factor = D.lr_factor(self.recipe.distributed.lr_scale)
            self.log(
                f"{w} processes ({dist_backend()}): each trains on 1/{w} of every epoch, global batch = {w} x the "
                f"per-process batch (data: {w} x {self.recipe.data.batch_size} = {w * self.recipe.data.batch_size}); "
                + (
                    f"learning rates x {factor:g} (lr_scale {self.recipe.distributed.lr_scale})"
                    if factor != 1
                    else "learning rates as in the recipe"
                )
            )
        for i, stage in enumerate(self.recipe.stages):
            st = self.state["stages"].get(stage.name, {})
            if st.get("status") == "done":
                self._adopt(stage, st["result"])
                self.log(f"[{stage.name}] already done, skipped")
                continue
            self.state["stages"][stage.name] = {"index": i, "kind": stage.kind, "status": "running"}
            self._save_state()
            if stage.kind in TRAINING_KINDS:  # every process trains; process 0's result
                res = D.broadcast_object(self._run_training(i, stage))
            elif stage.kind == "ptq":  # the stages that do not train run on process 0 alone
                res = D.on_main(lambda: self._run_ptq(i, stage))
            elif stage.kind == "bn_recalibrate":
                res = D.on_main(lambda: self._run_bn_recalibrate(i, stage))
            elif stage.kind == "export":
                res = D.on_main(lambda: self._run_export(i, stage))
            else:
                res = D.on_main(lambda: self._run_evaluate(i, stage))
            self._adopt(stage, res)  # the same on every process
            self.state["stages"][stage.name] = {
                "index": i,
                "kind": stage.kind,
                "target": stage.target,
                "status": "done",
                "result": res,
            }
            self._save_state()
        self.state["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        self.state["session_seconds"] = time.perf_counter() - t_start
        self._save_state()
        report = build_report(self.recipe, self.state, self.data_desc, str(self.device), self.backend)
        report["layers"] = D.on_main(self._final_layers)
        if D.is_main():
            write_report(self.out, report)
        D.barrier()
        self.log(f"report: {self._p('report.md')}")
        return report


def dist_backend() -> str:
    import torch.distributed as dist

    return dist.get_backend() if D.is_distributed() else "none"


class _Limited:
    """The first ``n`` batches of a loader."""

    def __init__(self, loader, n: int):
        self.loader, self.n = loader, n

    def __len__(self) -> int:
        return min(len(self.loader), self.n)

    def __iter__(self):
        for i, b in enumerate(self.loader):
            if i >= self.n:
                return
            yield b


def _model_facts(model: nn.Module, input_shape=None) -> Dict[str, Any]:
    """Parameters, counted size, and with an input shape the MACs per image and the batch-64 CPU
    inference latency of the model as it is (pycompress.profile)."""
    from ..quant import is_qat, model_size

    size = model_size(model)
    facts = {
        "params": count_params(model),
        "size_bytes": int(size["bytes"]),
        "fp32_bytes": int(size["fp32_bytes"]),
        "quantized": bool(is_qat(model)),
    }
    if input_shape is not None:
        from ..profile import measure_latency, profile_model

        model = model.cpu()
        facts["macs"] = int(profile_model(model, input_shape)["macs"])
        lat = measure_latency(model, input_shape, batch_sizes=(64,), warmup=2, repeats=7)
        facts["latency_ms"] = float(lat[0]["ms"])  # median ms per batch of 64 on the CPU
        from ..score import score_model

        sc = score_model(model, input_shape)  # the CIFAR-100 reference figures
        facts["micronet"] = {"score": sc["score"], "params": sc["params"], "ops": sc["ops"], "freebie": sc["freebie"]}
    return facts


def _diff(a: Any, b: Any, path: str = "") -> list:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            label = f"{path}[{i}]"
            if isinstance(x, dict) and isinstance(x.get("name"), str):
                label = f"{path}[{i}] {x['name']!r}"  # stages by name
            out += _diff(x, y, label)
        return out
    return [] if a == b else [f"{path}: {a!r} -> {b!r}"]


# ------------------------------------------------------------------------------ report
def build_report(
    recipe: Recipe, state: Dict[str, Any], data: Dict[str, Any], device: str, backend: str
) -> Dict[str, Any]:
    stages = []
    for s in recipe.stages:
        st = state["stages"].get(s.name, {})
        res = dict(st.get("result", {}))
        res.pop("arch", None)
        stages.append({"name": s.name, "kind": s.kind, "target": s.target, "status": st.get("status"), **res})
    final = None
    for s in reversed(stages):
        if s["target"] == "student" and s.get("status") == "done":
            final = s
            break
    teacher = next((s for s in reversed(stages) if s["target"] == "teacher" and s.get("status") == "done"), None)
    export = next((s for s in reversed(stages) if s["kind"] == "export" and s.get("status") == "done"), None)

    def acc(s, key):
        if s is None:
            return None
        return s.get(key) if s.get(key) is not None else s.get(f"best_{key}")

    report = {
        "recipe": recipe.name,
        "source": recipe.source,
        "description": recipe.description,
        "data": data,
        # what chose best epochs / rounds: a held-out validation split, or (none held out) the test set
        "selection": "validation" if data.get("val_samples") else "test",
        "device": device,
        "world_size": int(state.get("world_size", 1)),
        "kernel_backend": backend,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}",
        "started": state.get("started"),
        "finished": state.get("finished"),
        "total_seconds": sum(float(s.get("seconds") or 0.0) for s in stages),
        "student": None
        if final is None
        else {
            "top1": acc(final, "top1"),
            "top5": acc(final, "top5"),
            "val_top1": next(
                (
                    x["val_top1"]
                    for x in reversed(stages)
                    if x["target"] == "student" and x.get("status") == "done" and x.get("val_top1") is not None
                ),
                None,
            ),
            "params": final.get("params"),
            "size_bytes": final.get("size_bytes"),
            "fp32_bytes": final.get("fp32_bytes"),
            "compression": (final["fp32_bytes"] / final["size_bytes"]) if final and final.get("size_bytes") else None,
            "quantized": final.get("quantized"),
            "stage": final["name"],
            "sparsity": _last_sparsity(stages),
            "micronet": next(
                (
                    x["micronet"]
                    for x in reversed(stages)
                    if x["target"] == "student" and x.get("status") == "done" and x.get("micronet")
                ),
                None,
            ),
            # where an artifact was written, size_bytes is its real file size
            "file_bytes": export.get("size_bytes") if export else None,
            "counted_bytes": export.get("counted_bytes") if export else final.get("size_bytes"),
            "checkpoint_top1": export.get("checkpoint_top1") if export else None,
        },
        "artifacts": export.get("artifacts") if export else None,
        "teacher": None
        if teacher is None
        else {
            "top1": acc(teacher, "top1"),
            "top5": acc(teacher, "top5"),
            "params": teacher.get("params"),
            "stage": teacher["name"],
        },
        "stages": stages,
    }
    return report


def _last_sparsity(stages) -> Optional[Dict[str, Any]]:
    """The sparsity facts of the student's last pruned training stage, if any."""
    for s in reversed(stages):
        if s["target"] == "student" and s.get("status") == "done" and s.get("sparsity"):
            return s["sparsity"]
    return None


def _finite(v):
    return v if v is None or v != float("inf") else None


def _fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


def write_report(out_dir: str, report: Dict[str, Any]) -> None:
    atomic_write_text(os.path.join(out_dir, "report.json"), json.dumps(report, indent=2, default=str))
    lines = [f"# pycompress run: {report['recipe']}", ""]
    if report.get("description"):
        lines += [report["description"].strip(), ""]
    d = report["data"]
    val = d.get("val_samples")
    lines += [
        f"- data: {d['dataset']} ({d['train_samples']} train / "
        + (f"{val} validation / " if val else "")
        + f"{d['test_samples']} test images, {d['num_classes']} classes)",
        (
            f"- model selection: best epochs and rounds chosen on the validation split ({val} training images "
            f"held out, seed {d.get('validation_seed', 0)}); the test set is evaluated once per stage, for this "
            "report only"
            if val
            else "- model selection: best epochs and rounds chosen on the test set (no validation split held out: "
            "`data.validation` in the recipe), so the top-1 figures are optimistic"
        ),
        f"- device: {report['device']}, kernel backend: {report['kernel_backend']}, "
        f"torch {report['torch']}, {report['machine']}",
        f"- started {report['started']}, finished {report['finished']}, stage time "
        f"{report['total_seconds'] / 60:.1f} min",
    ]
    w = report.get("world_size", 1)
    if w > 1:
        lines.append(
            f"- {w} processes (torchrun, DistributedDataParallel): global batch = {w} x each stage's batch size; "
            "every process held a bit-identical model after every epoch"
        )
    lines += [
        "",
    ]
    s = report.get("student")
    if s:
        size_head = "file size (bytes)" if s.get("file_bytes") else "size (bytes)"
        lines += [
            "## Result",
            "",
            f"| model | {'test ' if report.get('selection') == 'validation' else ''}top-1 (%) | top-5 (%) | "
            f"parameters | {size_head} | fp32 size | compression |",
            "|---|---|---|---|---|---|---|",
            f"| student ({s['stage']}) | {_fmt(s['top1'])} | {_fmt(s['top5'])} | {s['params']:,} | "
            f"{s['size_bytes']:,} | {s['fp32_bytes']:,} | {_fmt(s['compression'], '.2f')}x |",
        ]
        t = report.get("teacher")
        if t:
            lines.append(f"| teacher ({t['stage']}) | {_fmt(t['top1'])} | {_fmt(t['top5'])} | {t['params']:,} | | | |")
        lines.append("")
        if s.get("file_bytes"):
            lines += [
                f"The student's size is the byte count of its artifact file `model.pcz`; its counted bits "
                f"(`pycompress.quant.model_size` with BatchNorm folded) give {s['counted_bytes']:,} bytes, "
                f"the rest is the manifest and header. The top-1 is measured on the file "
                f"(the checkpoint it came from: {_fmt(s.get('checkpoint_top1'))}%).",
                "",
            ]
        sp = s.get("sparsity")
        if sp:
            lines += [
                f"Sparsity: {100 * sp['selected']:.2f}% of the weights of the {sp['layers']} pruned layers "
                f"are 0 ({100 * sp['overall']:.2f}% of all parameters; {sp['nonzero_params']:,} nonzero). "
                "The size counts a 1-bit mask plus the nonzero values of each pruned layer.",
                "",
            ]
        mn = s.get("micronet")
        if mn:
            lines += [
                f"MicroNet score of the final model: {mn['score']:.5f} ({mn['params']:,.0f} parameters / 36.5M + "
                f"{mn['ops']:,.0f} operations / 10.49B; `pycompress score`, the CIFAR-100 reference figures"
                + (
                    ""
                    if report["data"]["dataset"] in ("cifar100", "cifar-100")
                    else ": not comparable to the challenge on this data"
                )
                + ").",
                "",
            ]
    arts = report.get("artifacts")
    if arts:
        lines += [
            "## Artifacts",
            "",
            "| format | file | file bytes | counted bytes | top-1 (%) | same prediction as the checkpoint |",
            "|---|---|---|---|---|---|",
        ]
        for a in arts:
            agree = a.get("agreement")
            counted = a.get("counted_bits")
            lines.append(
                f"| {a['format']} | `{a['file']}` | {a['file_bytes']:,} | "
                f"{'-' if counted is None else f'{(counted + 7) // 8:,}'} | {_fmt(a.get('top1'))} | "
                f"{'-' if agree is None else f'{100 * agree:.2f}%'} |"
            )
        lines += [
            "",
            "pcz: quantized weights as integer codes, other tensors fp32; fp16 / uint8: the other "
            "tensors in IEEE half / hw7's per-tensor min-max uint8; onnx: a QDQ graph for ONNX "
            "Runtime (top-1 measured with ONNX Runtime). Load a .pcz with "
            "`pycompress.export.load`, evaluate it with `pycompress eval FILE`.",
            "",
        ]
    for st in report["stages"]:
        sl = st.get("slim")
        if not sl:
            continue
        b = sl["before"]
        lines.append(
            f"Slimming ({st['name']}: {sl['criterion']}, {len(sl['rounds'])} round(s), "
            f"{100 * sl['ratio']:.1f}% of each group's channels): parameters {b['params']:,} -> "
            f"{st['params']:,} ({100 * sl['params_ratio']:.1f}%), MACs {b.get('macs', 0) / 1e6:.3f} M -> "
            f"{(st.get('macs') or 0) / 1e6:.3f} M ({100 * sl['macs_ratio']:.1f}%), batch-64 CPU latency "
            f"{_fmt(b.get('latency_ms'))} -> {_fmt(st.get('latency_ms'))} ms"
            + (f" ({b['latency_ms'] / st['latency_ms']:.2f}x)" if b.get("latency_ms") and st.get("latency_ms") else "")
            + "."
        )
        lines.append("")
    lines += treatment_lines(report.get("layers"))  # "## Layers": each layer of the final student
    validated = report.get("selection") == "validation"
    heads = "val top-1 (selected) | test top-1" if validated else "best top-1 | final top-1"
    lines += [
        "## Stages",
        "",
        f"| # | stage | kind | target | epochs | {heads} | sparsity | size (bytes) | MACs (M) | "
        "latency b64 (ms) | MicroNet score | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, st in enumerate(report["stages"]):
        if validated:
            best, final = st.get("val_top1"), st.get("top1")
        else:
            best = st.get("best_top1", st.get("top1"))
            final = st.get("final_top1", st.get("top1"))
        size = st.get("size_bytes")
        sp = (st.get("sparsity") or {}).get("selected")
        macs = st.get("macs")
        lines.append(
            f"| {i} | {st['name']} | {st['kind']} | {st['target']} | {st.get('epochs', '-')} | "
            f"{_fmt(best)} | {_fmt(final)} | {'-' if sp is None else f'{100 * sp:.1f}%'} | "
            f"{'-' if size is None else f'{size:,}'} | {'-' if macs is None else f'{macs / 1e6:.3f}'} | "
            f"{_fmt(st.get('latency_ms'))} | {_fmt((st.get('micronet') or {}).get('score'), '.5f')} | "
            f"{_fmt(st.get('seconds'), '.1f')} |"
        )
    lines += [
        "",
        "MicroNet score: `pycompress score` of each stage's best model (parameters / 36.5M + math operations / "
        "10.49B, the challenge's CIFAR-100 reference figures; 32-bit additions; the 16-bit freebie only for a model "
        "with nothing below 16 bits). It is the challenge's score only for a CIFAR-100 model; on other data it "
        "compares runs with each other.",
        "",
        "Per-stage logs and curves: `stages/NN-<name>/metrics.*`, `curves.png`; best "
        "checkpoints: `stages/NN-<name>/best.pt` (evaluate one with `pycompress eval`).",
        "",
    ]
    atomic_write_text(os.path.join(out_dir, "report.md"), "\n".join(lines))


def run_recipe(recipe: Recipe, out_dir: Optional[str] = None, **kwargs) -> Dict[str, Any]:
    """Run ``recipe`` into ``out_dir`` (default ``runs/<recipe name>``); returns the report."""
    return Runner(recipe, out_dir or os.path.join("runs", recipe.name), **kwargs).run()


__all__ = [
    "Runner",
    "RunError",
    "run_recipe",
    "build_from_arch",
    "load_model",
    "model_arch",
    "build_report",
    "write_report",
    "count_params",
]
