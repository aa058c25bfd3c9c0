"""`pycompress bench step`: the training step of a recipe's stages, per backend, against plain torch.

Each stage is set up as ``pycompress run`` sets it up (:class:`pycompress.recipe.Runner`: the same
model conversion, QAT preparation and calibration, pruning hook, masked optimizer, KD teacher,
schedule and :class:`pycompress.train.Trainer`), from the structure the earlier stages leave
(QAT layers, pruning masks, slimmed channels), but with randomly initialised weights and fed
synthetic batches of the recipe's shape (``torch.randn`` images, random labels, a fixed seed, the
same data for every variant): no dataset, no checkpoint, nothing written. A step is
``Trainer.train_epoch``'s step: forward, KD teacher forward, loss, backward, the hooks (masks,
regularizers), the optimizer and the LR schedule.

Variants of a stage:

- every available backend (``pycompress.backends.use(name)``; the Triton interpreter is left out),
- ``float``: the same student without QAT layers and pruning masks / hooks (same KD teacher and
  optimizer spec, a plain torch optimizer), on the automatic backend choice,
- ``torch``: the float student (and teacher) with torch's own layers (``pycompress.nn``'s
  DepthwiseConv2d back to ``nn.Conv2d``) and a plain torch optimizer: no pycompress op at all.

Numbers: after ``warmup`` untimed steps of every variant, ``repeats`` repeats of ``steps`` steps
each, run round-robin over the variants (so a drift of the machine does not favour the last one);
the median (and minimum) milliseconds per step over the repeats.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from .. import backends
from ..recipe.runner import RunError, Runner, build_from_arch, count_params
from ..recipe.schema import TRAINING_KINDS, Recipe

__all__ = ["Row", "BenchStepError", "run", "format_table", "write_json", "input_info", "default_backends"]


class BenchStepError(ValueError):
    """A bad stage or backend, or a recipe whose input shape cannot be known without its data."""


@dataclasses.dataclass
class Row:
    stage: str
    variant: str  # a backend name, "float" or "torch"
    ms: float  # median milliseconds per step
    min_ms: float
    images_per_s: float
    batch: int
    steps: int  # steps per repeat
    repeats: int
    kind: str = ""  # the stage's kind
    compile_s: Optional[float] = None  # "compiled": seconds of the first step (torch.compile included)
    graph_breaks: Optional[int] = None  # "compiled": graph breaks while compiling
    vs_reference: Optional[float] = None  # reference ms / this ms (> 1: faster than the reference backend)
    vs_torch: Optional[float] = None  # torch ms / this ms
    vs_float: Optional[float] = None  # float ms / this ms (< 1: the QAT / pruning overhead)


# ---------------------------------------------------------------------------------------------- data
def input_info(dataset: str, options: Dict[str, Any], data_root: Optional[str] = None) -> SimpleNamespace:
    """``in_channels``, ``image_size`` (H, W) and ``num_classes`` of a recipe's dataset, from its
    name and options (no files needed for the built-in datasets but imagefolder)."""
    from ..data import build_dataset, canonical_name

    try:
        name = canonical_name(dataset)
    except ValueError as exc:
        raise BenchStepError(str(exc)) from None
    o = dict(options or {})
    if name in ("fashion_mnist", "mnist"):
        s = 28 + 2 * int(o.get("pad", 0))
        return SimpleNamespace(in_channels=1, image_size=(s, s), num_classes=10)
    if name in ("cifar10", "cifar100"):
        return SimpleNamespace(in_channels=3, image_size=(32, 32), num_classes=10 if name == "cifar10" else 100)
    if name == "food11":
        s = int(o.get("image_size", 256))
        return SimpleNamespace(in_channels=3, image_size=(s, s), num_classes=11)
    if name == "synthetic":
        s = int(o.get("image_size", 32))
        return SimpleNamespace(
            in_channels=int(o.get("in_channels", 3)), image_size=(s, s), num_classes=int(o.get("num_classes", 10))
        )
    try:  # imagefolder (classes = folders) or a dataset registered elsewhere: ask the data
        _, info = build_dataset(dataset, "train", data_root=data_root, augment=False, **o)
    except Exception as exc:  # noqa: BLE001 - missing files, bad options
        raise BenchStepError(
            f"dataset {dataset!r}: its input shape and classes come from its files ({type(exc).__name__}: {exc})"
        ) from None
    return SimpleNamespace(
        in_channels=int(info.in_channels), image_size=tuple(info.image_size), num_classes=int(info.num_classes)
    )


class _Batches:
    """``n`` batches cycling over a few fixed (inputs, targets) pairs already on the device."""

    def __init__(self, batches: List, n: int):
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        for i in range(self.n):
            yield self.batches[i % len(self.batches)]


# ---------------------------------------------------------------------------------------------- stages
class _StageBuilder(Runner):
    """The recipe runner with synthetic data, random weights, models kept in memory and, instead of
    training, a stage's Trainer set up and handed back (``self.built``)."""

    def __init__(self, recipe: Recipe, *, device: Optional[str], batch: Optional[int], steps: int, data_root=None):
        self._tmp = tempfile.TemporaryDirectory(prefix="pycompress-bench-step-")
        super().__init__(
            recipe,
            self._tmp.name,
            data_root=data_root,
            device=device,
            backend="auto",
            progress=False,
            log=lambda line: None,
        )
        self.batch, self.steps = batch, steps
        self._data_cache: Dict[int, List] = {}
        self.built = None  # (trainer, model) of the last _fit

    def close(self) -> None:
        self._tmp.cleanup()

    # -------------------------------------------------------------------- synthetic data
    def batch_size(self, stage_batch: Optional[int]) -> int:
        return int(self.batch or stage_batch or self.recipe.data.batch_size)

    def _synthetic(self, batch_size: int) -> List:
        if batch_size not in self._data_cache:
            g = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + batch_size)
            shape = (batch_size, self.info.in_channels, *self.info.image_size)
            self._data_cache[batch_size] = [
                (
                    torch.randn(shape, generator=g).to(self.device),
                    torch.randint(0, self.info.num_classes, (batch_size,), generator=g).to(self.device),
                )
                for _ in range(2)
            ]
        return self._data_cache[batch_size]

    def _data(self) -> None:
        d = self.recipe.data
        self.info = input_info(d.dataset, d.options, self.data_root)
        self.train_loader = self._train_loader(d.batch_size)
        self.test_loader = _Batches(self._synthetic(self.batch_size(d.eval_batch_size)), 1)
        self.val_loader = None  # the bench times steps; it selects nothing
        self.data_desc = {
            "dataset": d.dataset,
            "options": dict(d.options),
            "synthetic": True,
            "num_classes": self.info.num_classes,
            "in_channels": self.info.in_channels,
            "image_size": list(self.info.image_size),
        }

    def _train_loader(self, batch_size: int):
        return _Batches(self._synthetic(self.batch_size(batch_size)), self.steps)

    # -------------------------------------------------------------------- models
    def _materialize(self, target: str) -> nn.Module:
        cur = self.current[target]
        if "model" in cur:  # the structure an earlier stage of this bench left (QAT, masks, ...)
            return copy.deepcopy(cur["model"])
        from ..train.checkpoint import seed_everything

        # random weights: a teacher checkpoint, or a ptq stage's best.pt, only brings values
        seed_everything(self.recipe.seed * 2 + (target == "teacher"))
        return build_from_arch(cur["arch"])

    def _fit(self, stage, model, arch, sdir, name, resuming, train_loader):
        """Runner._fit's set-up (pruning hook and masked optimizer, KD teacher, Trainer), without
        training: the model goes on as the target's current model (masks attached)."""
        from ..prune import Pruner, build_masked_optimizer, has_masks

        hooks, optimizer = [], stage.optimizer
        eval_modules = []
        if stage.train_only:  # what is frozen takes no optimizer step and no gradient
            from ..train import freeze_except

            eval_modules = freeze_except(model, stage.train_only)["eval_modules"]
        if stage.prune is not None or has_masks(model):
            model.to(self.device)
            hooks.append(Pruner(model, stage.prune))
            optimizer = build_masked_optimizer(model, stage.optimizer)
        trainer = self._trainer(stage, model, optimizer, hooks, train_loader, name)
        trainer.eval_modules = eval_modules
        self.current[stage.target] = {"arch": arch, "model": model, "fresh": False}
        self.built = (trainer, model)
        summary = {"params": count_params(model), "best": "", "best_top1": None, "best_epoch": None}
        return summary, trainer

    def _trainer(self, stage, model, optimizer, hooks, train_loader, name, teacher_fn=None):
        from ..train import Trainer

        distiller = None
        if stage.distill is not None:
            from ..distill import Distiller

            teacher = self._materialize("teacher")
            if teacher_fn is not None:
                teacher = teacher_fn(teacher)
            distiller = Distiller(teacher, stage.distill)
        trainer = Trainer(
            model,
            train_loader,
            None,
            epochs=stage.epochs,
            optimizer=optimizer,
            hooks=hooks,
            schedule=stage.schedule,
            device=self.device,
            distiller=distiller,
            amp=stage.amp,
            compile=self.stage_compile(stage) if teacher_fn is None else None,
            seed=self.recipe.seed,
            out_dir=None,
            progress=False,
            grad_clip=stage.grad_clip,
            name=name,
            log=lambda line: None,
        )
        for h in trainer.hooks:  # what Trainer.fit does first (a pruner selects its masks here)
            if hasattr(h, "on_fit_start"):
                h.on_fit_start(trainer)
        return trainer

    # -------------------------------------------------------------------- the bench's entry points
    def prepare(self, index: int) -> None:
        """Synthetic data, the initial models, and the structure of every stage before ``index``."""
        self._data()
        self.current["student"] = self._initial("student")
        if self.recipe.teacher is not None:
            self.current["teacher"] = self._initial("teacher")
        for i, stage in enumerate(self.recipe.stages[:index]):
            if stage.kind in TRAINING_KINDS:
                self._run_training(i, stage)
            elif stage.kind == "ptq":
                self._run_ptq(i, stage)
            # evaluate, bn_recalibrate, export: the structure stays as it is
        self.base = dict(self.current)

    def build_stage(self, index: int):
        """(trainer, model) of stage ``index`` as ``pycompress run`` sets it up."""
        self.current = dict(self.base)
        self._run_training(index, self.recipe.stages[index])
        return self.built

    def build_float(self, index: int, torch_layers: bool):
        """(trainer, model) of stage ``index`` with the float student (no QAT, no masks, no pruning
        hook) and a plain torch optimizer; ``torch_layers``: also torch's own layers (student and
        teacher)."""
        from ..train.checkpoint import seed_everything

        stage = self.recipe.stages[index]
        self.current = dict(self.base)
        arch = dict(self.current[stage.target]["arch"])
        if stage.slim is not None:  # the slimmed structure this stage would train
            self._run_training(index, stage)
            arch = dict(self.current[stage.target]["arch"])
            self.current = dict(self.base)
        arch["qat"] = None
        seed_everything(self.recipe.seed * 2 + (stage.target == "teacher"))
        model = build_from_arch(arch)
        fix = _torch_layers if torch_layers else (lambda m: m)
        model = fix(model).to(self.device)
        trainer = self._trainer(
            stage, model, stage.optimizer, [], self._stage_loader(stage), stage.name, teacher_fn=fix
        )
        return trainer, model


def _torch_layers(model: nn.Module) -> nn.Module:
    """pycompress.nn's depthwise layers back to plain nn.Conv2d (same parameters), in place."""
    from ..nn import DepthwiseConv2d

    for m in model.modules():
        if type(m) is DepthwiseConv2d:
            m.__class__ = nn.Conv2d
    return model


# ---------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(trainer, warmup: int, steps: int) -> None:
    """``warmup`` untimed steps (compilation, allocator, caches), then ``steps`` steps per epoch."""
    loader = trainer.train_loader
    trainer.model.train()
    if trainer.distiller is not None:
        trainer.distiller.train()
    if warmup:
        loader.n = trainer.steps_per_epoch = warmup
        trainer.train_epoch()
    loader.n = trainer.steps_per_epoch = steps


def _time_repeat(trainer, steps: int) -> float:
    """Milliseconds per step of one repeat of ``steps`` Trainer steps (no collector pauses inside,
    as timeit)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        _sync(trainer.device)
        t0 = time.perf_counter()
        trainer.train_epoch()
        _sync(trainer.device)
        return (time.perf_counter() - t0) / steps * 1e3
    finally:
        if enabled:
            gc.enable()


def default_backends(device: torch.device) -> List[str]:
    """The backends that can run on ``device`` here, in auto priority order (no Triton interpreter)."""
    names = ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")
    return [b for b in names if backends.status(b) is None]


def _check_backends(names: Sequence[str], device: torch.device) -> List[str]:
    out = []
    for raw in names:
        try:
            name = backends._check_name(raw, "--backend")
        except ValueError as exc:
            raise BenchStepError(str(exc)) from None
        if name == "auto":
            raise BenchStepError("--backend takes a backend name (cuda, triton, cpu or reference), not 'auto'")
        reason = backends.status(name)
        if reason is not None:
            raise BenchStepError(f"backend {name!r} is not available here: {reason}")
        if name == "cpu" and device.type == "cuda" or name == "cuda" and device.type != "cuda":
            raise BenchStepError(f"backend {name!r} cannot run on device {device.type} (choose --device)")
        if name == "triton" and device.type != "cuda":
            raise BenchStepError("backend 'triton' on the CPU is the Triton interpreter, a testing tool: not timed")
        if name not in out:
            out.append(name)
    return out


def _stage_indices(recipe: Recipe, names: Optional[Sequence[str]]) -> List[int]:
    by_name = {s.name: i for i, s in enumerate(recipe.stages)}
    if not names:
        idx = [i for i, s in enumerate(recipe.stages) if s.kind in TRAINING_KINDS]
        if not idx:
            raise BenchStepError(f"recipe {recipe.name!r} has no training stage")
        return idx
    out = []
    for n in names:
        if n not in by_name:
            raise BenchStepError(f"recipe {recipe.name!r} has no stage {n!r} (stages: {', '.join(by_name)})")
        s = recipe.stages[by_name[n]]
        if s.kind not in TRAINING_KINDS:
            raise BenchStepError(
                f"stage {n!r} is a {s.kind!r} stage, which does not train (training kinds: {', '.join(TRAINING_KINDS)})"
            )
        out.append(by_name[n])
    return out


def run(
    recipe: Recipe,
    stages: Optional[Sequence[str]] = None,
    backend_names: Optional[Sequence[str]] = None,
    *,
    steps: int = 10,
    repeats: int = 3,
    warmup: int = 3,
    batch: Optional[int] = None,
    device: Optional[str] = None,
    data_root: Optional[str] = None,
    float_rows: bool = True,
    torch_rows: bool = True,
    compiled_rows: bool = False,
    printer: Optional[Callable[[str], None]] = None,
    meta: Optional[Dict[str, Any]] = None,
) -> List[Row]:
    """Time the training step of ``stages`` (default: every training stage) of ``recipe``; returns
    the rows, the ratios filled in. ``meta`` (a dict) receives the machine facts."""
    from ..train import TrainingDiverged

    say = printer or (lambda line: None)
    for key, v in (("steps", steps), ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BenchStepError(f"{key} must be an integer >= 1, got {v!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BenchStepError(f"warmup must be an integer >= 0, got {warmup!r}")
    indices = _stage_indices(recipe, stages)
    # only what the timed stages need: stages up to the last one asked for, exports left out
    keep = [s for s in recipe.stages[: max(indices) + 1] if s.kind != "export"]
    names_kept = [s.name for s in keep]
    sub = dataclasses.replace(recipe, stages=keep)
    try:
        builder = _StageBuilder(sub, device=device, batch=batch, steps=steps, data_root=data_root)
    except RunError as exc:
        raise BenchStepError(str(exc)) from None
    dev = builder.device
    try:
        chosen = _check_backends(backend_names, dev) if backend_names else default_backends(dev)
    except BenchStepError:
        builder.close()
        raise
    if meta is not None:
        meta.update(machine_facts(dev))
        meta.update({"recipe": recipe.name, "steps": steps, "repeats": repeats, "warmup": warmup})
    rows: List[Row] = []
    try:
        for stage_name in [recipe.stages[i].name for i in indices]:
            index = names_kept.index(stage_name)
            stage = keep[index]
            with _quiet_checks(dev):
                builder.prepare(index)
            bs = builder.batch_size(stage.batch_size)
            variants = [(b, b) for b in chosen]
            if compiled_rows:
                variants.append(("compiled", None))
            if float_rows:
                variants.append(("float", None))
            if torch_rows:
                variants.append(("torch", None))
            # Every variant is built and warmed up first, then the repeats run round-robin over
            # the variants, so a drift of the machine (load, clock, heap) spreads over all of them
            # instead of favouring whichever ran last.
            built = []
            for variant, backend in variants:
                ctx = backends.use(backend) if backend else contextlib.nullcontext()
                try:
                    with ctx, _quiet_checks(dev):
                        if variant in ("float", "torch"):
                            trainer, _ = builder.build_float(index, torch_layers=variant == "torch")
                        else:
                            builder.compile_all = variant == "compiled"
                            try:
                                trainer, _ = builder.build_stage(index)
                            finally:
                                builder.compile_all = False
                        _warm_up(trainer, max(warmup, 1) if variant == "compiled" else warmup, steps)
                except backends.BackendError as exc:
                    say(f"[{stage.name}] {variant}: skipped ({exc})")
                    continue
                except TrainingDiverged as exc:
                    raise BenchStepError(f"stage {stage.name!r}, {variant}: {exc}") from None
                built.append((variant, backend, trainer))
            times: Dict[str, List[float]] = {variant: [] for variant, _, _ in built}
            for _ in range(repeats):
                for variant, backend, trainer in built:
                    ctx = backends.use(backend) if backend else contextlib.nullcontext()
                    try:
                        with ctx, _quiet_checks(dev):
                            times[variant].append(_time_repeat(trainer, steps))
                    except TrainingDiverged as exc:
                        raise BenchStepError(f"stage {stage.name!r}, {variant}: {exc}") from None
            stage_rows = []
            for variant, _, trainer in built:
                med = statistics.median(times[variant])
                stage_rows.append(
                    Row(
                        stage=stage.name,
                        variant=variant,
                        ms=med,
                        min_ms=min(times[variant]),
                        images_per_s=bs / (med / 1e3),
                        batch=bs,
                        steps=steps,
                        repeats=repeats,
                        kind=stage.kind,
                        compile_s=trainer.compile_seconds,
                        graph_breaks=trainer.graph_breaks,
                    )
                )
                say(f"[{stage.name}] {variant}: {med:.2f} ms/step")
            built = None
            gc.collect()
            ref = {r.variant: r.ms for r in stage_rows}
            for r in stage_rows:
                r.vs_reference = ref["reference"] / r.ms if "reference" in ref else None
                r.vs_torch = ref["torch"] / r.ms if "torch" in ref else None
                r.vs_float = ref["float"] / r.ms if "float" in ref else None
            rows += stage_rows
    finally:
        builder.close()
    return rows


@contextlib.contextmanager
def _quiet_checks(device: torch.device):
    """As Runner.run: on a GPU the ops' value checks (one host sync per call) are off."""
    if device.type != "cuda":
        yield
        return
    from ..ops import value_checks

    with value_checks(False):
        yield


# ---------------------------------------------------------------------------------------------- output
def machine_facts(device: torch.device) -> Dict[str, Any]:
    facts = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
    }
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
    return facts


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(rows: Sequence[Row]) -> str:
    head = ["stage", "variant", "batch", "ms/step", "images/s", "vs reference", "vs torch", "vs float"]
    body = [
        [r.stage, r.variant, str(r.batch), f"{r.ms:.2f}", f"{r.images_per_s:.1f}"]
        + [_x(r.vs_reference), _x(r.vs_torch), _x(r.vs_float)]
        for r in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(head, *body)] if body else [len(h) for h in head]
    lines = []
    for i, cells in enumerate([head] + body):
        lines.append(
            "  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths))).rstrip()
        )
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [
        "",
        "ms/step: median over the repeats; vs X: X's ms/step / this row's (above 1: faster than X; "
        "vs float below 1: the QAT / pruning overhead).",
    ]
    for r in rows:
        if r.compile_s is not None:
            lines.append(
                f"{r.stage} / {r.variant}: torch.compile's first step took {r.compile_s:.1f} s "
                f"({r.graph_breaks} graph breaks); it pays after about " + _payback(r, rows)
            )
    return "\n".join(lines)


def _payback(row: Row, rows: Sequence[Row]) -> str:
    """Steps after which a compiled stage has saved its compilation time, against the eager row of
    the automatically chosen backend (the first backend row of the stage)."""
    eager = [r for r in rows if r.stage == row.stage and r.variant not in ("compiled", "float", "torch")]
    if not eager or row.compile_s is None:
        return "- (no eager row to compare)"
    saved_ms = eager[0].ms - row.ms
    if saved_ms <= 0:
        return f"never (a compiled step is not faster than {eager[0].variant}'s)"
    return f"{row.compile_s * 1e3 / saved_ms:.0f} steps (vs {eager[0].variant})"


def write_json(path: str, rows: Sequence[Row]) -> None:
    from ..utils import atomic_write_text

    atomic_write_text(path, json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n")
