"""The recipe schema: YAML -> validated dataclasses, strictly.

Everything is checked before anything runs: an unknown key (with a did-you-mean), a wrong type, a
missing field or an impossible value raises :class:`RecipeError` naming the file, the stage and the
key, e.g. ``recipes/x.yaml: stages[2] 'qat4': optimizer: 'lr' must be > 0, got -1``.

Layout (see recipes/quickstart.yaml for a full example)::

    name: quickstart            # run name (default: the file name)
    seed: 0
    kernel_backend: auto        # auto | reference | cpu | triton | cuda: pins the op backend
    device: auto                # auto | cpu | cuda
    data:    {dataset: fashion_mnist, batch_size: 128, eval_batch_size: 1000, augment: true,
              num_workers: 0, options: {}}
    model:   {name: mobilenet_student, args: {width_mult: 1.0}}   # also torchvision:<name>, timm:<name>,
                                #   import:<module>:<function>; weights: FILE, strict: true
    teacher: {name: lenet5, args: {}, checkpoint: null}     # optional
    distributed: {lr_scale: none, sync_bn: false, find_unused_parameters: false}  # torchrun runs only
    stages:
      - name: teacher           # unique, [A-Za-z0-9_-]
        kind: train             # train | distill | prune | quantize | finetune | ptq | bn_recalibrate
                                #   | evaluate | export | slim
        target: teacher         # student (default) | teacher
        epochs: 3
        optimizer: {name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}
        schedule: {name: warmup_cosine, warmup_epochs: 0.2}
        distill: {kind: hinton, alpha: 0.5, temperature: 4}  # KD in any training stage
        quantize: {weight_bits: 4, act_bits: 8}              # QAT in any student stage
        prune: {criterion: global_magnitude, sparsity: 0.75}  # pruning in any training stage

Stage kinds only differ in what they require: ``distill`` needs a ``distill`` section, ``prune`` a
``prune`` section (see pycompress.prune.PruneSpec), ``quantize`` a ``quantize`` section, ``evaluate``
takes no training settings. ``train_only: [regex, ...]`` on a training stage trains only the layers whose
qualified name (or an enclosing module's) matches; everything else is frozen, in eval mode (MicroNet's
FC stage). Stages that do not train: ``ptq`` (post-training quantization:
``quantize`` + ``batches`` of calibration), ``bn_recalibrate`` (MicroNet's BatchNorm
re-estimation: ``batches`` per round, ``rounds``, the best round kept), ``evaluate``, and
``export`` (``formats``: pcz, fp16, uint8, onnx; ``fold_bn``), which writes the compressed
artifacts. A recipe that quantizes or prunes gets an ``export`` stage at the end unless it has
one or sets ``auto_export: false``. KD, pruning and QAT compose within one stage; masks chosen in
one stage stay fixed in every later training stage. Each stage starts from the best checkpoint of
the previous stage with the same target (``ptq`` and ``bn_recalibrate`` write one too).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import yaml

STAGE_KINDS = (
    "train",
    "distill",
    "prune",
    "slim",
    "quantize",
    "finetune",
    "ptq",
    "bn_recalibrate",
    "evaluate",
    "export",
)
TRAINING_KINDS = ("train", "distill", "prune", "slim", "quantize", "finetune")
# kinds that end with a new best checkpoint of their target (the next stage starts from it)
CHECKPOINT_KINDS = TRAINING_KINDS + ("ptq", "bn_recalibrate")
EXPORT_FORMATS = ("pcz", "fp16", "uint8", "onnx")
DEFAULT_EXPORT_FORMATS = ("pcz", "fp16", "uint8")
# the keys each kind that does not train may carry (besides name, kind, target)
_NON_TRAINING_KEYS = {
    "evaluate": (),
    "export": ("formats", "fold_bn"),
    "ptq": ("quantize", "batches", "batch_size", "eval_batches"),
    "bn_recalibrate": ("batches", "rounds", "batch_size", "eval_batches"),
}
_KIND_ONLY_KEYS = ("formats", "fold_bn", "batches", "rounds")  # never on a training stage
TARGETS = ("student", "teacher")
DEVICES = ("auto", "cpu", "cuda")
LOG_FORMATS = ("csv", "jsonl")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file, the stage and the key."""


# ------------------------------------------------------------------------------ dataclasses
@dataclass
class DataSpec:
    dataset: str
    batch_size: int = 128
    eval_batch_size: int = 512
    augment: bool = True
    num_workers: int = 0
    options: Dict[str, Any] = field(default_factory=dict)
    # training images held out as a validation split (a seeded random subset of the train split,
    # never augmented): best checkpoints and bn_recalibrate rounds are chosen on it and the test
    # set is evaluated once per stage for the report. 0: no split (selection on the test set).
    validation: int = 0
    validation_seed: int = 0


@dataclass
class DistributedSpec:
    """How a run under ``torchrun --nproc_per_node N`` trains (nothing changes with one process).
    ``batch_size`` stays per process, so the global batch is N x batch_size; ``lr_scale``
    multiplies every training stage's learning rate by 1 (none), N (linear) or sqrt(N) (sqrt);
    ``sync_bn`` uses SyncBatchNorm on GPUs (ignored on CPUs); ``find_unused_parameters`` is DDP's
    option for models with parameters that some steps do not use."""

    lr_scale: str = "none"
    sync_bn: bool = False
    find_unused_parameters: bool = False


@dataclass
class ModelSpec:
    name: str  # a zoo name, or torchvision:<name> | timm:<name> | import:<package.module>:<function>
    args: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # start from this weights file (.safetensors or a torch state_dict)
    strict: bool = True  # false: load the tensors of `weights` that fit, skip (and log) the rest


@dataclass
class TeacherSpec:
    name: str
    args: Dict[str, Any] = field(default_factory=dict)
    checkpoint: Optional[str] = None
    weights: Optional[str] = None
    strict: bool = True


@dataclass
class StageSpec:
    name: str
    kind: str
    target: str = "student"
    epochs: Optional[int] = None
    optimizer: Optional[Dict[str, Any]] = None
    schedule: Optional[Dict[str, Any]] = None
    distill: Optional[Any] = None  # dict, "kind:weight[:T]" string or a list of them
    quantize: Optional[Dict[str, Any]] = None
    prune: Optional[Dict[str, Any]] = None
    slim: Optional[Dict[str, Any]] = None  # structured pruning: channels removed, fine-tuned per round
    amp: bool = False
    compile: Optional[Dict[str, Any]] = None  # torch.compile of the student's training forward ({} = defaults)
    grad_clip: Optional[float] = None
    max_steps_per_epoch: Optional[int] = None
    eval_batches: Optional[int] = None  # cap on eval batches per epoch (None: the whole set)
    batch_size: Optional[int] = None  # this stage's training batch size (default: data's)
    log_format: str = "csv"
    formats: Optional[List[str]] = None  # export: artifact formats (default pcz, fp16, uint8)
    fold_bn: Optional[bool] = None  # export: fold BatchNorm into the layer before it (default true)
    batches: Optional[int] = None  # ptq: calibration batches; bn_recalibrate: batches per round
    rounds: Optional[int] = None  # bn_recalibrate: rounds, each evaluated (default 1)
    # regexes: only the layers whose qualified name (or an enclosing module's) matches train; every
    # other parameter is frozen and every other module stays in eval mode (MicroNet's FC stage)
    train_only: Optional[List[str]] = None


@dataclass
class Recipe:
    data: DataSpec
    model: ModelSpec
    stages: List[StageSpec]
    name: Optional[str] = None
    description: str = ""
    seed: int = 0
    kernel_backend: str = "auto"
    device: str = "auto"
    teacher: Optional[TeacherSpec] = None
    auto_export: bool = True  # append an export stage to recipes that quantize or prune
    distributed: DistributedSpec = field(default_factory=DistributedSpec)
    source: Optional[str] = field(default=None, metadata={"internal": True})

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source", None)
        if self.distributed == DistributedSpec():
            d.pop("distributed")  # the default is left out, so runs started before it existed resume
        for key in ("model", "teacher"):  # likewise weights / strict when not used
            if d.get(key) is not None and d[key].get("weights") is None and d[key].get("strict", True) is True:
                d[key].pop("weights", None)
                d[key].pop("strict", None)
        if not self.data.validation:  # likewise the data section without a validation split
            d["data"].pop("validation", None)
            d["data"].pop("validation_seed", None)
        return d

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


_SECTIONS = {"data": DataSpec, "model": ModelSpec, "teacher": TeacherSpec}


# ------------------------------------------------------------------------------ structural checks
class _Ctx:
    def __init__(self, file: Optional[str]):
        self.file = file or "<recipe>"

    def fail(self, where: str, msg: str) -> RecipeError:
        return RecipeError(f"{self.file}: {where}: {msg}" if where else f"{self.file}: {msg}")


def _type_name(v: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_keys(ctx: _Ctx, where: str, raw: Dict[str, Any], cls) -> None:
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    for k in raw:
        if k not in names:
            raise ctx.fail(where, f"unknown key {k!r}{_suggest(k, names)}; allowed: {', '.join(names)}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in raw:
            raise ctx.fail(where, f"missing required key {f.name!r}")


def _want(ctx, where, key, value, kind, *, optional=False, low=None, high=None, choices=None, low_ok=True):
    """Check one scalar: kind is int, float, bool, str, dict, list."""
    loc = f"{where}: {key!r}" if where else repr(key)
    if value is None:
        if optional:
            return None
        raise ctx.fail(where, f"{key!r} must not be null")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{ctx.file}: {loc} must be an integer, got {_type_name(value)} {value!r}")
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{ctx.file}: {loc} must be a number, got {_type_name(value)} {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{ctx.file}: {loc} must be finite, got {value!r}")
        value = float(value)
    elif not isinstance(value, kind):
        raise RecipeError(f"{ctx.file}: {loc} must be {_type_name(kind())}, got {_type_name(value)} {value!r}")
    if choices is not None and value not in choices:
        raise RecipeError(
            f"{ctx.file}: {loc} must be one of {', '.join(map(str, choices))}, got {value!r}{_suggest(value, choices)}"
        )
    if low is not None and (value < low or (value == low and not low_ok)):
        raise RecipeError(f"{ctx.file}: {loc} must be {'>=' if low_ok else '>'} {low}, got {value!r}")
    if high is not None and value > high:
        raise RecipeError(f"{ctx.file}: {loc} must be <= {high}, got {value!r}")
    return value


def _section(ctx: _Ctx, raw: Any, cls, where: str):
    if not isinstance(raw, dict):
        raise ctx.fail(where, f"must be a mapping, got {_type_name(raw)}")
    _check_keys(ctx, where, raw, cls)
    return raw


def _data(ctx, raw) -> DataSpec:
    w = "data"
    _section(ctx, raw, DataSpec, w)
    from ..data import names as data_names
    from ..data.datasets import canonical_name

    ds = _want(ctx, w, "dataset", raw["dataset"], str)
    try:
        canonical_name(ds)
    except Exception:  # noqa: BLE001
        raise ctx.fail(
            w, f"'dataset': unknown dataset {ds!r}{_suggest(ds, data_names())}; known: {', '.join(data_names())}"
        ) from None
    if raw.get("validation_seed") not in (None, 0) and not raw.get("validation"):
        raise ctx.fail(w, "'validation_seed' is set but 'validation' (the number of held-out images) is 0 or missing")
    return DataSpec(
        dataset=ds,
        batch_size=_want(ctx, w, "batch_size", raw.get("batch_size", 128), int, low=1),
        eval_batch_size=_want(ctx, w, "eval_batch_size", raw.get("eval_batch_size", 512), int, low=1),
        augment=_want(ctx, w, "augment", raw.get("augment", True), bool),
        num_workers=_want(ctx, w, "num_workers", raw.get("num_workers", 0), int, low=0),
        options=_want(ctx, w, "options", raw.get("options") or {}, dict),
        validation=_want(ctx, w, "validation", raw.get("validation", 0), int, low=0),
        validation_seed=_want(ctx, w, "validation_seed", raw.get("validation_seed", 0), int, low=0),
    )


def _distributed(ctx, raw) -> DistributedSpec:
    w = "distributed"
    if raw is None:
        return DistributedSpec()
    _section(ctx, raw, DistributedSpec, w)
    from ..train.distributed import LR_SCALES

    return DistributedSpec(
        lr_scale=_want(ctx, w, "lr_scale", raw.get("lr_scale", "none"), str, choices=LR_SCALES),
        sync_bn=_want(ctx, w, "sync_bn", raw.get("sync_bn", False), bool),
        find_unused_parameters=_want(ctx, w, "find_unused_parameters", raw.get("find_unused_parameters", False), bool),
    )


def _model(ctx, raw, cls, where):
    _section(ctx, raw, cls, where)
    from ..models import accepted_kwargs, check_name, is_external
    from ..models import names as model_names

    name = _want(ctx, where, "name", raw["name"], str)
    external = is_external(name)
    if external:  # torchvision:, timm:, import: (an unknown name, no timm, a module that does not import)
        try:
            check_name(name)
        except ValueError as exc:
            raise ctx.fail(where, f"'name': {exc}") from None
    elif name not in model_names():
        raise ctx.fail(
            where,
            f"'name': unknown model {name!r}{_suggest(name, model_names())}; known: {', '.join(model_names())} "
            f"(or torchvision:<name>, timm:<name>, import:<package.module>:<function>)",
        )
    args = _want(ctx, where, "args", raw.get("args") or {}, dict)
    accepted = accepted_kwargs(name)  # None: a model whose arguments cannot be listed (the build decides)
    for k in args:
        if k in ("in_channels", "num_classes"):
            raise ctx.fail(f"{where}.args", f"{k!r} is set from the dataset; remove it")
        if accepted is not None and k not in accepted:
            raise ctx.fail(
                f"{where}.args",
                f"model {name!r} takes no argument {k!r}"
                f"{_suggest(k, accepted)}; it accepts: "
                f"{', '.join(accepted) or '(none)'}",
            )
    from ..models import build
    from ..models.external import check_device

    try:  # catches impossible values (negative widths, bad depths) now, not after training
        with check_device(name):  # torchvision / timm: on the meta device, costing nothing
            build(name, in_channels=3, num_classes=10, **args)
    except (TypeError, ValueError) as exc:
        raise ctx.fail(f"{where}.args" if args or not external else where, str(exc)) from None
    weights = _want(ctx, where, "weights", raw.get("weights"), str, optional=True)
    strict = _want(ctx, where, "strict", raw.get("strict", True), bool)
    if weights is not None and not os.path.isfile(weights):
        raise ctx.fail(where, f"'weights': file {weights!r} not found")
    if weights is None and not strict:
        raise ctx.fail(where, "'strict' applies to a 'weights' file, and there is none")
    if cls is ModelSpec:
        return ModelSpec(name=name, args=dict(args), weights=weights, strict=strict)
    ckpt = _want(ctx, where, "checkpoint", raw.get("checkpoint"), str, optional=True)
    if ckpt is not None and weights is not None:
        raise ctx.fail(where, "give either 'checkpoint' (a trained teacher) or 'weights' (a file to start from)")
    return TeacherSpec(name=name, args=dict(args), checkpoint=ckpt, weights=weights, strict=strict)


def _stage(ctx, raw, index) -> StageSpec:
    where = f"stages[{index}]"
    if not isinstance(raw, dict):
        raise ctx.fail(where, f"must be a mapping, got {_type_name(raw)}")
    if isinstance(raw.get("name"), str):
        where = f"stages[{index}] {raw['name']!r}"
    _check_keys(ctx, where, raw, StageSpec)
    name = _want(ctx, where, "name", raw["name"], str)
    if not _NAME_RE.match(name):
        raise ctx.fail(where, f"'name' must match [A-Za-z0-9][A-Za-z0-9_-]* (it names a directory), got {name!r}")
    kind = _want(ctx, where, "kind", raw["kind"], str, choices=STAGE_KINDS)
    s = StageSpec(
        name=name,
        kind=kind,
        target=_want(ctx, where, "target", raw.get("target", "student"), str, choices=TARGETS),
        epochs=_want(ctx, where, "epochs", raw.get("epochs"), int, optional=True, low=1),
        optimizer=_want(ctx, where, "optimizer", raw.get("optimizer"), dict, optional=True),
        schedule=_want(ctx, where, "schedule", raw.get("schedule"), dict, optional=True),
        distill=raw.get("distill"),
        quantize=_want(ctx, where, "quantize", raw.get("quantize"), dict, optional=True),
        prune=_want(ctx, where, "prune", raw.get("prune"), dict, optional=True),
        slim=_want(ctx, where, "slim", raw.get("slim"), dict, optional=True),
        amp=_want(ctx, where, "amp", raw.get("amp", False), bool),
        compile=_compile(ctx, where, raw.get("compile")),
        grad_clip=_want(ctx, where, "grad_clip", raw.get("grad_clip"), float, optional=True, low=0, low_ok=False),
        max_steps_per_epoch=_want(
            ctx, where, "max_steps_per_epoch", raw.get("max_steps_per_epoch"), int, optional=True, low=1
        ),
        batch_size=_want(ctx, where, "batch_size", raw.get("batch_size"), int, optional=True, low=1),
        eval_batches=_want(ctx, where, "eval_batches", raw.get("eval_batches"), int, optional=True, low=1),
        log_format=_want(ctx, where, "log_format", raw.get("log_format", "csv"), str, choices=LOG_FORMATS),
        formats=_formats(ctx, where, raw.get("formats")),
        fold_bn=_want(ctx, where, "fold_bn", raw.get("fold_bn"), bool, optional=True),
        batches=_want(ctx, where, "batches", raw.get("batches"), int, optional=True, low=1),
        rounds=_want(ctx, where, "rounds", raw.get("rounds"), int, optional=True, low=1),
        train_only=_regex_list(ctx, where, "train_only", raw.get("train_only")),
    )
    _stage_semantics(ctx, where, s, raw)
    return s


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _regex_list(ctx, where, key, value) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ctx.fail(where, f"{key!r} must be a non-empty list of regexes, got {value!r}")
    for v in value:
        try:
            re.compile(v)
        except re.error as exc:
            raise ctx.fail(where, f"{key!r}: {v!r} is not a valid regex ({exc})") from None
    return list(value)


def _compile(ctx, where, value) -> Optional[Dict[str, Any]]:
    """``compile``: false / absent (eager), true (torch.compile's defaults) or a mapping of
    torch.compile's ``mode``, ``fullgraph`` and ``dynamic``."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise ctx.fail(where, f"'compile' must be true, false or a mapping (mode, fullgraph, dynamic), got {value!r}")
    unknown = [k for k in value if k not in ("mode", "fullgraph", "dynamic")]
    if unknown:
        raise ctx.fail(where, f"'compile': unknown key {unknown[0]!r}; known: mode, fullgraph, dynamic")
    out: Dict[str, Any] = {}
    if value.get("mode") is not None:
        out["mode"] = _want(ctx, where, "compile.mode", value["mode"], str, choices=COMPILE_MODES)
    for key in ("fullgraph", "dynamic"):
        if value.get(key) is not None:
            out[key] = _want(ctx, where, f"compile.{key}", value[key], bool)
    return out


def _formats(ctx, where, value) -> Optional[List[str]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ctx.fail(where, f"'formats' must be a non-empty list of {', '.join(EXPORT_FORMATS)}, got {value!r}")
    for v in value:
        if v not in EXPORT_FORMATS:
            raise ctx.fail(
                where,
                f"'formats': unknown format {v!r}{_suggest(v, EXPORT_FORMATS)}; known: {', '.join(EXPORT_FORMATS)}",
            )
    if len(set(value)) != len(value):
        raise ctx.fail(where, f"'formats' lists a format twice: {value}")
    return list(value)


def _stage_semantics(ctx, where, s: StageSpec, raw) -> None:
    training = s.kind in TRAINING_KINDS
    defaults = {f.name: f.default for f in dataclasses.fields(StageSpec)}
    # (a resolved recipe spells the defaults out; only a set value is an error)
    given = [
        k
        for k in raw
        if k not in ("name", "kind", "target")
        and raw[k] is not None
        and raw[k] != defaults[k]
        and not (k == "compile" and raw[k] is False)
    ]
    if not training:
        allowed = _NON_TRAINING_KEYS[s.kind]
        extra = [k for k in given if k not in allowed]
        if extra:
            raise ctx.fail(
                where,
                f"{extra[0]!r} does not apply to a {s.kind!r} stage"
                + (f" (it takes: {', '.join(allowed)})" if allowed else ""),
            )
        if s.kind in ("export", "ptq") and s.target != "student":
            raise ctx.fail(where, f"a {s.kind!r} stage works on the student (target: student)")
        if s.kind == "ptq":
            if s.quantize is None:
                raise ctx.fail(where, "missing required key 'quantize' (the settings of a 'ptq' stage)")
            from ..quant import QuantSpec

            try:
                QuantSpec.from_dict(s.quantize)
            except (TypeError, ValueError) as exc:
                raise ctx.fail(f"{where}: quantize", str(exc)) from None
        return
    extra = [k for k in given if k in _KIND_ONLY_KEYS]
    if extra:
        raise ctx.fail(where, f"{extra[0]!r} does not apply to a {s.kind!r} stage")
    if s.epochs is None:
        raise ctx.fail(where, f"missing required key 'epochs' (a {s.kind!r} stage trains)")
    if s.optimizer is None:
        raise ctx.fail(where, f"missing required key 'optimizer' (a {s.kind!r} stage trains)")
    from ..train.trainer import validate_optimizer_spec

    try:
        s.optimizer = validate_optimizer_spec(s.optimizer)
    except ValueError as exc:
        raise ctx.fail(where, str(exc)) from None
    if s.schedule is not None:
        _check_schedule(ctx, where, s)
    if s.kind == "distill" and s.distill is None:
        raise ctx.fail(where, "missing required key 'distill' (the KD loss of a 'distill' stage)")
    if s.kind == "quantize" and s.quantize is None:
        raise ctx.fail(where, "missing required key 'quantize' (the QAT settings of a 'quantize' stage)")
    if s.kind == "prune" and s.prune is None:
        raise ctx.fail(where, "missing required key 'prune' (the pruning settings of a 'prune' stage)")
    if s.kind == "slim" and s.slim is None:
        raise ctx.fail(where, "missing required key 'slim' (the channel-removal settings of a 'slim' stage)")
    if s.slim is not None:
        if s.target != "student":
            raise ctx.fail(where, "'slim' works on the student (target: student)")
        for other in ("quantize", "prune"):
            if getattr(s, other) is not None:
                raise ctx.fail(
                    where,
                    f"'slim' and {other!r} in one stage: slim the float network first, then "
                    f"{'quantize' if other == 'quantize' else 'prune'} it in a later stage "
                    f"(masks of earlier stages are carried over)",
                )
        from ..prune.structured import SlimSpec

        try:
            s.slim = SlimSpec.from_dict(s.slim).to_dict()
        except (TypeError, ValueError) as exc:
            raise ctx.fail(f"{where}: slim", str(exc)) from None
    if s.target == "teacher" and (s.distill is not None or s.quantize is not None or s.prune is not None):
        key = "distill" if s.distill is not None else "quantize" if s.quantize is not None else "prune"
        raise ctx.fail(where, f"{key!r} is not supported on a stage with target 'teacher'")
    if s.distill is not None:
        from ..distill import build_loss

        try:
            build_loss(s.distill)
        except (TypeError, ValueError) as exc:
            raise ctx.fail(f"{where}: distill", str(exc)) from None
    if s.quantize is not None:
        from ..quant import QuantSpec

        try:
            QuantSpec.from_dict(s.quantize)
        except (TypeError, ValueError) as exc:
            raise ctx.fail(f"{where}: quantize", str(exc)) from None
    if s.prune is not None:
        from ..prune import PruneSpec

        try:
            s.prune = PruneSpec.from_dict(s.prune).to_dict()  # resolved: defaults spelled out
        except (TypeError, ValueError) as exc:
            raise ctx.fail(f"{where}: prune", str(exc)) from None


def _check_schedule(ctx, where, s: StageSpec) -> None:
    import torch

    from ..train.schedules import build_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        # 1000 iterations per epoch: fine enough that fractional warm-up epochs resolve
        build_scheduler(opt, s.schedule, iters_per_epoch=1000, default_epochs=s.epochs)
    except (TypeError, ValueError) as exc:
        raise ctx.fail(f"{where}: schedule", str(exc)) from None


def _recipe(ctx, raw) -> Recipe:
    if not isinstance(raw, dict):
        raise ctx.fail("", f"a recipe must be a YAML mapping at the top level, got {_type_name(raw)}")
    _check_keys(ctx, "", raw, Recipe)
    from ..backends import BACKENDS

    name = _want(ctx, "", "name", raw.get("name"), str, optional=True)
    if name is not None and not _NAME_RE.match(name):
        raise ctx.fail("", f"'name' must match [A-Za-z0-9][A-Za-z0-9_-]*, got {name!r}")
    stages_raw = raw["stages"]
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ctx.fail("stages", "must be a non-empty list of stages")
    r = Recipe(
        name=name,
        description=_want(ctx, "", "description", raw.get("description", ""), str),
        seed=_want(ctx, "", "seed", raw.get("seed", 0), int, low=0),
        kernel_backend=_want(
            ctx, "", "kernel_backend", raw.get("kernel_backend", "auto"), str, choices=("auto",) + tuple(BACKENDS)
        ),
        device=_want(ctx, "", "device", raw.get("device", "auto"), str, choices=DEVICES),
        data=_data(ctx, raw["data"]),
        model=_model(ctx, raw["model"], ModelSpec, "model"),
        teacher=None if raw.get("teacher") is None else _model(ctx, raw["teacher"], TeacherSpec, "teacher"),
        stages=[_stage(ctx, s, i) for i, s in enumerate(stages_raw)],
        auto_export=_want(ctx, "", "auto_export", raw.get("auto_export", True), bool),
        distributed=_distributed(ctx, raw.get("distributed")),
    )
    seen = {}
    for i, s in enumerate(r.stages):
        if s.name in seen:
            raise ctx.fail(f"stages[{i}] {s.name!r}", f"duplicate stage name (also stages[{seen[s.name]}])")
        seen[s.name] = i
    teacher_ready = r.teacher is not None and (r.teacher.checkpoint is not None or r.teacher.weights is not None)
    quantized = None
    for i, s in enumerate(r.stages):
        where = f"stages[{i}] {s.name!r}"
        if s.slim is not None and quantized is not None:
            raise ctx.fail(
                where,
                f"'slim' after the student was quantized in stage {quantized!r}: slim the float "
                f"network first, then quantize it",
            )
        if s.target == "student" and (s.quantize is not None or s.kind == "ptq"):
            quantized = quantized or s.name
        if s.target == "teacher":
            if r.teacher is None:
                raise ctx.fail(where, "target 'teacher' but the recipe has no 'teacher' section")
            if s.kind in TRAINING_KINDS:
                teacher_ready = True
        if s.prune is not None:
            _check_prune_layers(ctx, where, r.model, s.prune)
        if s.kind in ("export", "ptq") and not any(
            p.target == "student" and p.kind in CHECKPOINT_KINDS for p in r.stages[:i]
        ):
            raise ctx.fail(
                where,
                f"a {s.kind!r} stage needs an earlier stage that trains the student "
                f"(there is no trained model to {'export' if s.kind == 'export' else 'quantize'} yet)",
            )
        if s.distill is not None and not teacher_ready:
            raise ctx.fail(
                where,
                "'distill' needs a trained teacher: add a 'teacher' section and "
                "either train it in an earlier stage (target: teacher) or set "
                "teacher.checkpoint (or teacher.weights)",
            )
    compresses = any(
        s.target == "student" and (s.quantize is not None or s.prune is not None or s.slim is not None)
        for s in r.stages
    )
    if r.auto_export and compresses and not any(s.kind == "export" for s in r.stages):
        name = "export"
        while name in seen:
            name += "_"
        r.stages.append(StageSpec(name=name, kind="export"))
    return r


def _check_prune_layers(ctx, where, model: "ModelSpec", prune: Dict[str, Any]) -> None:
    """A prune section must select at least one layer of the student (names do not depend on the
    dataset's channels and classes, and QAT keeps them)."""
    from ..models import build
    from ..models.external import check_device
    from ..prune import PruneSpec

    spec = PruneSpec.from_dict(prune)
    with check_device(model.name):
        net = build(model.name, in_channels=3, num_classes=10, **model.args)
    if not spec.select_layers(net):
        raise ctx.fail(
            f"{where}: prune",
            f"selects no layer of model {model.name!r} (types={spec.types}, "
            f"include={spec.include}, exclude={spec.exclude}, first={spec.first}, "
            f"last={spec.last})",
        )


# ------------------------------------------------------------------------------ overrides, loading
def apply_overrides(raw: Dict[str, Any], overrides, file: Optional[str] = None) -> Dict[str, Any]:
    """Apply ``--set`` overrides (``"key.sub=value"``) to a raw recipe dict (a deep copy is
    returned). The first key is a top-level key (``seed``, ``data``, ``model``, ``teacher``, ...)
    or a stage name; values are parsed as YAML (``3``, ``0.1``, ``true``, ``[1, 2]``, ``{a: 1}``)."""
    ctx = _Ctx(file)
    raw = copy.deepcopy(raw)
    top = [f.name for f in dataclasses.fields(Recipe) if not f.metadata.get("internal")]
    for ov in overrides or ():
        if "=" not in ov:
            raise RecipeError(f"--set {ov!r}: expected KEY=VALUE, e.g. qat4.epochs=2")
        path, _, text = ov.partition("=")
        keys = [k.strip() for k in path.split(".")]
        if not all(keys):
            raise RecipeError(f"--set {ov!r}: empty key in {path!r}")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {ov!r}: the value is not valid YAML: {exc}") from None
        stages = raw.get("stages") if isinstance(raw.get("stages"), list) else []
        stage_names = [s.get("name") for s in stages if isinstance(s, dict)]
        if keys[0] in stage_names:
            node = stages[stage_names.index(keys[0])]
            rest = keys[1:]
            if not rest:
                raise RecipeError(f"--set {ov!r}: name a key of stage {keys[0]!r}, e.g. {keys[0]}.epochs=2")
        elif keys[0] in top:
            node, rest = raw, keys
        else:
            raise ctx.fail(
                "",
                f"--set {ov!r}: {keys[0]!r} is neither a top-level key ({', '.join(top)}) "
                f"nor a stage name ({', '.join(map(str, stage_names))})"
                f"{_suggest(keys[0], top + [str(n) for n in stage_names])}",
            )
        for k in rest[:-1]:
            nxt = node.get(k) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[k] = nxt
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {ov!r}: {k!r} is not a mapping")
            node = nxt
        node[rest[-1]] = value
    return raw


def validate(raw: Any, file: Optional[str] = None) -> Recipe:
    """Validate a raw recipe (a dict as loaded from YAML) and return the :class:`Recipe`."""
    r = _recipe(_Ctx(file), raw)
    r.source = file
    if r.name is None:
        r.name = os.path.splitext(os.path.basename(file))[0] if file else "recipe"
        if not _NAME_RE.match(r.name):
            r.name = re.sub(r"[^A-Za-z0-9_-]", "_", r.name).lstrip("_-") or "recipe"
    return r


def load_recipe_dict(path: str) -> Dict[str, Any]:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RecipeError(f"{path}: recipe file not found")
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if raw is None:
        raise RecipeError(f"{path}: the file is empty")
    return raw


def load_recipe(path: str, overrides=()) -> Recipe:
    """Load, apply ``--set`` overrides and validate a recipe file."""
    raw = load_recipe_dict(path)
    return validate(apply_overrides(raw, overrides, file=path), file=os.fspath(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (defaults filled in): what a run directory stores."""
    return yaml.safe_dump(recipe.to_dict(), sort_keys=False)


__all__ = [
    "RecipeError",
    "Recipe",
    "DataSpec",
    "ModelSpec",
    "TeacherSpec",
    "DistributedSpec",
    "StageSpec",
    "STAGE_KINDS",
    "TRAINING_KINDS",
    "CHECKPOINT_KINDS",
    "EXPORT_FORMATS",
    "load_recipe",
    "load_recipe_dict",
    "validate",
    "apply_overrides",
    "dump_recipe",
]
