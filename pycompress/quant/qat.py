"""Model-level QAT: prepare_qat, qat_plan / apply_plan, calibrate, strip_qat, model_size, and the
once-per-epoch refit of "als" weight scales (refit_als, the trainer hook ALSRefit)."""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Set, Tuple, Union

import torch
import torch.nn as nn

from ..utils import batch_input, model_device
from .modules import QAT_LAYERS, QuantConv2d, QuantLinear, _is_parametrized, layer_type
from .quantizer import DEFAULT_PERCENTILE, OBSERVERS, FakeQuantizer, check_percentile
from .spec import ACT_SCALES, WEIGHT_SCALES, QuantSpec

__all__ = [
    "prepare_qat",
    "qat_plan",
    "apply_plan",
    "calibrate",
    "strip_qat",
    "is_qat",
    "qat_modules",
    "model_size",
    "refit_als",
    "ALSRefit",
    "unquantizable_layers",
    "layers_not_run",
]

_QAT_CLS = {"conv": QuantConv2d, "linear": QuantLinear}
_PLAN_KEYS = (
    "type",
    "weight_bits",
    "act_bits",
    "weight_scale",
    "act_scale",
    "act_signed",
    "act_observer",
    "act_percentile",
    "calib_batches",
)
# Keys added after plans were first saved: an entry without them (an older checkpoint) gets these.
_PLAN_DEFAULTS = {"act_observer": "minmax", "act_percentile": DEFAULT_PERCENTILE}


# ------------------------------------------------------------------------------------- helpers


def qat_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """The QAT layers (QuantConv2d / QuantLinear) of model by qualified name, in named_modules() order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QAT_LAYERS)}


def is_qat(model: nn.Module) -> bool:
    """Whether model holds at least one QAT layer."""
    return any(isinstance(m, QAT_LAYERS) for m in model.modules())


def _name_quantizers(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            m.name = name


def _replace(model: nn.Module, old: nn.Module, new: nn.Module, name: str) -> None:
    """Put new wherever old is registered (a module shared under several names is replaced everywhere)."""
    if old is model:
        raise ValueError(
            f"the model itself is the layer {type(old).__name__}; wrap it (e.g. nn.Sequential(layer)) "
            f"so it can be swapped in place"
        )
    found = False
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)
                found = True
    if not found:  # pragma: no cover - named_modules found it, so a parent holds it
        raise RuntimeError(f"could not find the parent of layer {name!r}")


def _swappable(m: nn.Module) -> bool:
    from ..nn import DepthwiseConv2d

    return type(m) in (nn.Conv2d, nn.Linear, DepthwiseConv2d) or isinstance(m, QAT_LAYERS)


def _check_swappable(name: str, m: nn.Module) -> None:
    if _swappable(m):
        return
    why = (
        "it has torch.nn.utils.parametrize parametrizations; remove them first"
        if _is_parametrized(m)
        else "only plain nn.Conv2d / nn.Linear layers are swapped"
    )
    raise ValueError(
        f"layer {name!r} is a {type(m).__name__} "
        f"(a subclass of {layer_type(m) == 'conv' and 'nn.Conv2d' or 'nn.Linear'}) "
        f"and cannot be made a QAT layer: {why} (or leave it out with exclude: ['^{name}$'])"
    )


def layers_not_run(model: nn.Module, example_input: torch.Tensor) -> List[str]:
    """The conv / linear layers (by qualified name) whose forward does not run when ``model`` (in
    eval mode, without gradients; modes restored) computes ``example_input``: their parent uses
    their weight directly (e.g. torchvision's Swin attention) or they serve training only (an
    auxiliary head), so a QAT layer in their place would not quantize what the model computes."""
    layers = {n: m for n, m in model.named_modules() if layer_type(m) is not None}
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with forwards_run(layers.values()) as ran, torch.no_grad():
            model(example_input.to(model_device(model) or example_input.device))
    finally:
        for m, training in modes:
            m.training = training
    return [n for n, m in layers.items() if id(m) not in ran]


@contextlib.contextmanager
def forwards_run(modules: Iterable[nn.Module]) -> Iterator[Set[int]]:
    """The ids of those of ``modules`` whose forward runs inside the ``with`` block (forward
    pre-hooks, removed on exit)."""
    ran: Set[int] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args: ran.add(id(mod))) for m in modules]
    try:
        yield ran
    finally:
        for h in handles:
            h.remove()


def unquantizable_layers(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> Dict[str, str]:
    """``{name: why}``: the conv / linear layers ``prepare_qat`` leaves float whatever the spec
    says: a subclass of nn.Conv2d / nn.Linear (its own forward, which a QAT layer would replace),
    a layer with torch.nn.utils.parametrize parametrizations, and, given ``example_input``, a layer
    whose forward never runs (:func:`layers_not_run`). Layers of other types (ConvTranspose2d,
    Conv1d, BatchNorm, a custom module with a weight...) are never selected at all."""
    out: Dict[str, str] = {}
    for name, m in model.named_modules():
        t = layer_type(m)
        if t is None or _swappable(m):
            continue
        if _is_parametrized(m):
            out[name] = "it has torch.nn.utils.parametrize parametrizations"
        else:
            base = "nn.Conv2d" if t == "conv" else "nn.Linear"
            out[name] = (
                f"a {type(m).__name__} (a subclass of {base} with its own forward); only plain nn.Conv2d / "
                f"nn.Linear layers are quantized"
            )
    if example_input is not None:
        for name in layers_not_run(model, example_input):
            out.setdefault(
                name,
                "its forward does not run when the model predicts (its parent uses the weight directly, "
                "or it serves training only), so a QAT layer would not quantize what the model computes",
            )
    return out


# ------------------------------------------------------------------------------------- plans


def _resolve(model: nn.Module, spec: QuantSpec, skip: Optional[Mapping[str, str]] = None) -> Dict[str, Dict[str, Any]]:
    selected: List[Tuple[str, str]] = []
    for name, m in model.named_modules():
        t = layer_type(m)
        if t is not None and spec.selects(name, t) and name not in (skip or {}):
            selected.append((name, t))
    if not selected:
        raise ValueError(
            f"prepare_qat: no layer matched the selection (types={spec.types}, include={spec.include}, "
            f"exclude={spec.exclude}); nothing to quantize"
        )
    plan: Dict[str, Dict[str, Any]] = {}
    for i, (name, t) in enumerate(selected):
        bits = spec.bits_for(name, is_first=i == 0, is_last=i == len(selected) - 1)
        if bits is None:
            continue
        plan[name] = {
            "type": t,
            **bits,
            "weight_scale": spec.weight_scale,
            "act_scale": spec.act_scale,
            "act_signed": spec.act_signed,
            "act_observer": spec.act_observer,
            "act_percentile": spec.act_percentile,
            "calib_batches": spec.calib_batches,
        }
    if not plan:
        raise ValueError(
            f"prepare_qat: {len(selected)} layer(s) matched, but every one is skipped or has neither "
            f"weight_bits nor act_bits (first/last/overrides); nothing to quantize"
        )
    return plan


def _check_plan(plan: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    if not isinstance(plan, Mapping):
        raise ValueError(f"apply_plan: plan must be a mapping of layer name -> settings, got {type(plan).__name__}")
    out = {}
    for name, e in plan.items():
        if not isinstance(e, Mapping):
            raise ValueError(f"apply_plan: plan[{name!r}] must be a mapping, got {e!r}")
        unknown = [k for k in e if k not in _PLAN_KEYS]
        missing = [k for k in _PLAN_KEYS if k not in e and k not in _PLAN_DEFAULTS]
        if unknown or missing:
            raise ValueError(
                f"apply_plan: plan[{name!r}] has "
                + (f"unknown keys {unknown}" if unknown else f"missing keys {missing}")
                + f"; expected {list(_PLAN_KEYS)}"
            )
        if e["type"] not in _QAT_CLS:
            raise ValueError(f"apply_plan: plan[{name!r}].type must be 'conv' or 'linear', got {e['type']!r}")
        if e["weight_scale"] not in WEIGHT_SCALES or e["act_scale"] not in ACT_SCALES:
            raise ValueError(f"apply_plan: plan[{name!r}] has a bad weight_scale / act_scale: {dict(e)}")
        e = {**_PLAN_DEFAULTS, **e}
        if e["act_observer"] not in OBSERVERS:
            raise ValueError(
                f"apply_plan: plan[{name!r}].act_observer must be one of {list(OBSERVERS)}, got {e['act_observer']!r}"
            )
        if not check_percentile(e["act_percentile"]):
            raise ValueError(
                f"apply_plan: plan[{name!r}].act_percentile must be a number in (50, 100], got {e['act_percentile']!r}"
            )
        out[str(name)] = {k: e[k] for k in _PLAN_KEYS}
    return out


def qat_plan(model: nn.Module) -> Dict[str, Dict[str, Any]]:
    """The per-layer plan of a prepared model (JSON-serialisable): name -> {type, weight_bits,
    act_bits, weight_scale, act_scale, act_signed, act_observer, act_percentile, calib_batches}.
    ``apply_plan`` rebuilds it (and accepts entries saved without act_observer / act_percentile,
    from before they existed: "minmax" and 99.99 then)."""
    return {name: m.qconfig() for name, m in qat_modules(model).items()}


def apply_plan(model: nn.Module, plan: Mapping[str, Mapping[str, Any]]) -> nn.Module:
    """Make model's QAT structure exactly ``plan`` (in place; returns model).

    Float layers named in the plan are swapped for QAT layers, QAT layers are re-configured, and
    QAT layers not in the plan go back to float. To restore a checkpoint::

        model = build(...); apply_plan(model, saved_plan); model.load_state_dict(saved_state)
    """
    plan = _check_plan(plan)
    modules = dict(model.named_modules())
    for name in plan:
        if name not in modules:
            raise ValueError(f"apply_plan: the plan names layer {name!r}, which this model does not have")
        t = layer_type(modules[name])
        if t != plan[name]["type"]:
            raise ValueError(
                f"apply_plan: layer {name!r} is a {type(modules[name]).__name__}, the plan says {plan[name]['type']!r}"
            )
        _check_swappable(name, modules[name])
    for name, m in qat_modules(model).items():
        if name not in plan:
            _replace(model, m, m.to_float(), name)
    for name, entry in plan.items():
        m = modules[name]
        qconfig = {k: v for k, v in entry.items() if k != "type"}
        if isinstance(m, QAT_LAYERS):
            m.configure(**qconfig)
        else:
            _replace(model, m, _QAT_CLS[entry["type"]].from_float(m, **qconfig), name)
    _name_quantizers(model)
    return model


def prepare_qat(
    model: nn.Module, spec: Union[QuantSpec, Mapping[str, Any]], *, example_input: Optional[torch.Tensor] = None
) -> Dict[str, Dict[str, Any]]:
    """Swap the layers spec selects for QAT layers, in place; returns the plan (see qat_plan).

    On a model that is already QAT the spec describes the new complete state: selected layers are
    re-configured (weights kept; a quantizer whose settings changed is rebuilt, so new activation
    quantizers need ``calibrate`` again), QAT layers the spec no longer selects go back to float.
    LSQ scales are Parameters created here: build the optimizer after prepare_qat.

    Layers that cannot be quantized faithfully stay float, with a warning naming them
    (:func:`unquantizable_layers`: subclasses of nn.Conv2d / nn.Linear, parametrized layers, and,
    given ``example_input`` (a batch the model takes), layers whose forward never runs); they do
    not count as the spec's first / last layer.
    """
    if not isinstance(spec, QuantSpec):
        spec = QuantSpec.from_dict(spec)
    skip = unquantizable_layers(model, example_input)
    left = [n for n, m in model.named_modules() if n in skip and spec.selects(n, layer_type(m))]
    if left:
        warnings.warn(
            "prepare_qat: left float: " + "; ".join(f"{n!r}: {skip[n]}" for n in left),
            stacklevel=2,
        )
    plan = _resolve(model, spec, skip)
    apply_plan(model, plan)
    return qat_plan(model)


def strip_qat(model: nn.Module, bake: bool = False) -> nn.Module:
    """Swap every QAT layer back to its plain float layer, in place (returns model). The state-dict
    keys become exactly the float model's. bake=True stores the fake-quantized weight values."""
    for name, m in qat_modules(model).items():
        _replace(model, m, m.to_float(bake=bake), name)
    return model


# ------------------------------------------------------------------------------------- calibration


def _batch_input(batch) -> torch.Tensor:
    return batch_input(batch, "calibrate")


def calibrate(
    model: nn.Module,
    batches: Iterable,
    num_batches: Optional[int] = None,
    device=None,
    *,
    only_uncalibrated: bool = False,
) -> Dict[str, Dict[str, Any]]:
    """Calibrate the activation quantizers on a few batches; returns name -> {scale, signed, min, max}.

    The quantizers observe (pass data through unchanged, record min / max, or per-batch percentiles
    for the "percentile" observer, see pycompress.quant.quantizer) during forward passes in
    eval mode under torch.no_grad() over up to ``num_batches`` batches (default: the largest
    ``calib_batches`` of the QAT layers, else 4); each batch is a tensor or an (inputs, targets)
    tuple/list, moved to ``device`` (default: the model's). Then each scale is set from the
    observed range (mode "frozen": the buffer; "lsq": the initial value of the Parameter) and
    "auto" signedness is decided. Every module's train/eval mode is restored afterwards. Weight
    quantizers keep computing from the (possibly already quantized) weights meanwhile.

    only_uncalibrated=True leaves quantizers that already have a scale alone (e.g. learned LSQ
    scales kept by a re-prepare). Raises RuntimeError if no batch was seen; a quantizer whose layer
    never ran stays uncalibrated, with a warning.

    Under torchrun (a process group of N > 1) every process observes its own ``num_batches``
    batches (its shard) and the observations are all-reduced before the scales are set
    (:meth:`FakeQuantizer.all_reduce_observation`): every process ends with the same scales,
    computed from all N x ``num_batches`` batches.
    """
    quantizers = [
        (name, q)
        for name, q in model.named_modules()
        if isinstance(q, FakeQuantizer) and q.kind == "act" and not (only_uncalibrated and q.is_calibrated)
    ]
    if not quantizers:
        return {}
    if num_batches is None:
        num_batches = max((m.calib_batches for m in qat_modules(model).values()), default=4)
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"calibrate: num_batches must be an int >= 1 or None, got {num_batches!r}")
    device = torch.device(device) if device is not None else model_device(model)
    modes = [(m, m.training) for m in model.modules()]
    for name, q in quantizers:
        q.name = name
        q.begin_calibration()
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in itertools.islice(iter(batches), num_batches):
                x = _batch_input(batch)
                model(x.to(device) if device is not None else x)
                seen += 1
    except BaseException:
        for _, q in quantizers:
            q.abort_calibration()
        raise
    finally:
        for m, training in modes:
            m.training = training
    from ..train import distributed as D

    if D.is_distributed():
        (seen_all,) = D.all_reduce_sum([seen])
        if seen_all > 0:
            for _, q in quantizers:
                q.all_reduce_observation()
        seen = int(seen_all)
    if seen == 0:
        for _, q in quantizers:
            q.abort_calibration()
        raise RuntimeError(
            "calibrate: no batches were seen (the batch iterable is empty); the quantizers are unchanged"
        )
    out = {}
    for name, q in quantizers:
        if not q.end_calibration():
            warnings.warn(
                f"calibrate: activation quantizer {name!r} saw no data (its layer did not run); it stays uncalibrated"
            )
            continue
        out[name] = {
            "scale": float(q.scale.detach().reshape(-1)[0]),
            "signed": q.is_signed,
            "min": float(q.min_val.min()),
            "max": float(q.max_val.max()),
        }
    return out


# ------------------------------------------------------------------------------------- ALS refit


def refit_als(model: nn.Module) -> int:
    """Refit the scale of every "als" weight quantizer of model's QAT layers from its layer's
    current weight (``FakeQuantizer.refit``: ``als_scale`` of the weight as the layer uses it,
    pruned entries 0); returns how many were refit (0 when there are none). No gradient; the
    result depends on the weights alone, so every process of a DDP run (identical weights) gets
    the same scales without communication. For training loops of one's own: call it once per
    epoch (MicroNet refits once per epoch and keeps the scales frozen in between)."""
    n = 0
    with torch.no_grad():
        for m in qat_modules(model).values():
            wq = m.weight_quant
            if wq is not None and wq.mode == "als" and not m.weight.is_meta:
                wq.refit(m.weight)
                n += 1
    return n


class ALSRefit:
    """Trainer hook (pycompress.train.Hook) that refits the "als" weight scales of
    ``trainer.model`` once per epoch (:func:`refit_als`), frozen in between:

    * ``on_fit_start``: refit, so the first epoch starts from the weights as they are then
      (a Pruner hook placed before this one may just have zeroed pruned entries); skipped when
      the trainer resumed a stage (``trainer.epoch > 0``): the checkpoint holds the scales the
      previous session fit from the very same weights, and a load never refits.
    * ``after_step``: refit right after the last optimizer step of each epoch (the
      ``trainer.steps_per_epoch``-th step since the epoch began), so the epoch's evaluation and
      the checkpoint written at its end use the refit scales, and the next epoch trains with
      them. Place this hook after a Pruner, whose ``after_step`` re-applies the masks.
    * ``on_epoch_end``: refit, unless ``after_step`` already did in this epoch (an epoch that
      ended early, e.g. a loader shorter than its ``len()``).

    ``refits`` counts the refits done (each one refits every "als" quantizer); ``last_count`` is
    the number of quantizers the last one refit. No state of its own goes in the checkpoint.
    """

    def __init__(self) -> None:
        self.refits = 0
        self.last_count = 0
        self._epoch: Optional[int] = None  # the epoch whose steps _steps counts
        self._steps = 0
        self._done_epoch: Optional[int] = None  # the epoch whose last step refit

    def _refit(self, trainer) -> None:
        self.last_count = refit_als(trainer.model)
        self.refits += 1

    def on_fit_start(self, trainer) -> None:
        self._epoch, self._steps, self._done_epoch = None, 0, None
        if trainer.epoch == 0:
            self._refit(trainer)

    def after_step(self, trainer) -> None:
        if self._epoch != trainer.epoch:
            self._epoch, self._steps = trainer.epoch, 0
        self._steps += 1
        if self._steps == trainer.steps_per_epoch:
            self._refit(trainer)
            self._done_epoch = trainer.epoch

    def on_epoch_end(self, trainer, row: Dict[str, Any]) -> None:
        if self._done_epoch != trainer.epoch:
            self._refit(trainer)


# ------------------------------------------------------------------------------------- size


def _counted_tensors(m: nn.Module):
    """(name, tensor) that a stored model needs: parameters and floating-point buffers (BN running
    statistics; not integer bookkeeping such as num_batches_tracked), this module's own only."""
    for name, p in m._parameters.items():
        if p is not None:
            yield name, p
    for name, b in m._buffers.items():
        # weight_shadow: the dense training copy of a pruned layer, not part of the stored model
        if (
            b is not None
            and b.is_floating_point()
            and name not in m._non_persistent_buffers_set
            and name != "weight_shadow"
        ):
            yield name, b


def weight_storage_bits(numel: int, nonzero: int, bits_per_value: int) -> int:
    """Bits of a conv / linear weight: dense, or a 1-bit mask per element plus the nonzero values
    (MicroNet's rule), whichever is smaller. pycompress.export stores weights the same way."""
    return min(bits_per_value * numel, numel + bits_per_value * nonzero)


def _weight_nonzero(m: nn.Module) -> int:
    """Nonzero stored values of a layer's weight: its nonzero integer codes when quantized (a
    kept weight can round to code 0), else its nonzero values."""
    if isinstance(m, QAT_LAYERS) and m.weight_quant is not None:
        return int(torch.count_nonzero(m.weight_codes()[0]))
    return int(torch.count_nonzero(m.weight.detach()))


def model_size(model: nn.Module, fold_bn: bool = False) -> Dict[str, Any]:
    """Bits needed to store the model, quantized and as fp32.

    A quantized weight counts weight_bits per element plus one fp32 scale per output channel; an
    activation quantizer one fp32 scale; every other parameter and floating-point buffer (biases,
    BN, unquantized layers) 32 bits per element. fp32 size: every such tensor at 32 bits, no scales.
    The quantizers' bookkeeping (observed ranges, flags) is not counted. In a QAT layer the weight is
    counted once, whether it is stored as ``weight`` or as torch.nn.utils.prune's
    ``weight_orig`` + ``weight_mask``. Every conv / linear weight counts dense or, when smaller, a
    1-bit mask per element plus its bits per nonzero value (MicroNet's rule for a pruned layer; the
    nonzeros of a quantized weight are its nonzero integer codes); pruning's dense shadow weights
    are training state, not counted.

    ``fold_bn=True`` counts the model as ``pycompress.export`` stores it: a BatchNorm that folds
    into the conv / linear before it (``pycompress.export.bn_fold_pairs``) counts nothing, and that
    layer gains a 32-bit bias per output channel if it had none. The pcz artifact's payload then
    encodes exactly these bits (each tensor rounded up to whole bytes).

    Returns {"bits", "bytes", "mb", "fp32_bits", "fp32_bytes", "fp32_mb", "compression",
    "layers": {name: {"params", "weight_bits", "act_bits", "bits", "fp32_bits"}}}; bytes are
    ceil(bits / 8), MB are 10^6 bytes, compression = fp32_bits / bits. fp32 bits are always those
    of the model as it is (unfolded).
    """
    folded: Dict[str, str] = {}
    if fold_bn:
        from ..export.fold import bn_fold_pairs

        folded, _ = bn_fold_pairs(model)
    gains_bias = set(folded.values())
    layers: Dict[str, Dict[str, Any]] = {}
    total = fp32_total = 0
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            continue  # counted by its layer
        bits = fp32 = numel = 0
        wb = ab = None
        weighted = layer_type(m) is not None and isinstance(getattr(m, "weight", None), torch.Tensor)
        if isinstance(m, QAT_LAYERS):
            w = m.weight
            numel += w.numel()
            fp32 += 32 * w.numel()
            wq = m.weight_quant
            if wq is not None:
                wb = wq.bits
                bits += weight_storage_bits(w.numel(), _weight_nonzero(m), wq.bits) + 32 * wq.num_channels
            else:
                bits += weight_storage_bits(w.numel(), _weight_nonzero(m), 32)
            if m.act_quant is not None:
                ab = m.act_quant.bits
                bits += 32
            tensors = [(n, t) for n, t in _counted_tensors(m) if n not in ("weight", "weight_orig", "weight_mask")]
        elif weighted and isinstance(m._parameters.get("weight"), torch.Tensor):
            w = m.weight
            numel += w.numel()
            fp32 += 32 * w.numel()
            bits += weight_storage_bits(w.numel(), _weight_nonzero(m), 32)
            tensors = [(n, t) for n, t in _counted_tensors(m) if n != "weight"]
        else:
            tensors = list(_counted_tensors(m))
        for _, t in tensors:
            numel += t.numel()
            bits += 32 * t.numel()
            fp32 += 32 * t.numel()
        if name in folded:
            bits = 0  # folded into the layer before it
        elif name in gains_bias and getattr(m, "bias", None) is None:
            bits += 32 * m.weight.shape[0]
        if numel == 0 and bits == 0:
            continue
        layers[name] = {"params": numel, "weight_bits": wb, "act_bits": ab, "bits": bits, "fp32_bits": fp32}
        total += bits
        fp32_total += fp32
    nbytes, fp32_bytes = math.ceil(total / 8), math.ceil(fp32_total / 8)
    return {
        "bits": total,
        "bytes": nbytes,
        "mb": nbytes / 1e6,
        "fp32_bits": fp32_total,
        "fp32_bytes": fp32_bytes,
        "fp32_mb": fp32_bytes / 1e6,
        "compression": fp32_total / total if total else 1.0,
        "layers": layers,
    }
