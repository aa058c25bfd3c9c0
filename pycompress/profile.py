"""`pycompress profile MODEL`: what a model costs (parameters, MACs, activation memory per layer) and
how fast it runs.

``MODEL`` (a "model spec", :func:`load_for_profile`) is a registry model name
(``pycompress.models.names()``, built in fp32 with ``--model-args``, ``--num-classes`` and
``--input-size``), a pycompress checkpoint (``best.pt``: the model rebuilt with its QAT layers and
pruning masks, input shape from the dataset it records) or a ``.pcz`` artifact (its quantized
layers, input shape from its manifest).

Counting (:func:`profile_model`) runs the model once, in eval mode under ``torch.no_grad()``, on a
batch of one fixed-seed ``randn`` input, with a forward hook on every *leaf* module, and reads each
leaf's real input / output shapes; nothing is computed from per-model formulas. Leaves are the
modules without children, plus every ``nn.Conv2d`` / ``nn.Linear`` (subclasses included:
``pycompress.nn.DepthwiseConv2d``, the QAT ``QuantConv2d`` / ``QuantLinear``, the artifact's
``QuantizedConv2d`` / ``QuantizedLinear``), whose children (fake quantizers, parametrizations) are
not visited again. The hooks are removed afterwards, also when the forward fails, and each module's
train / eval mode is restored. Rules, per sample:

* MACs of a conv (any ``nn.Conv2d``): ``out_elements * (in_channels / groups) * kh * kw`` (the
  bias add is not counted; zero padding counts as if it were data).
* MACs of a linear (any ``nn.Linear``): ``out_features * in_features`` per input row, i.e. times the
  product of the input's leading dimensions except the batch.
* Every other module: 0 MACs (BatchNorm, activations, pools, dropout, identity), and so is work
  done outside leaf modules (``torch.flatten``, residual adds, functional calls in ``forward``).
* Nonzero MACs: a layer's MACs times its weight's density, ``nnz(weight) / numel(weight)`` (for a
  conv exactly ``nnz(weight) * out_H * out_W``): what a kernel skipping zero weights would need.
  The weight counted is the one the layer computes with: a QAT layer's integer codes
  (``QuantConv2d.weight_codes()``, so weights that round to 0 at a low bit width count as zero), an
  artifact layer's ``weight_codes`` (its ``weight`` when stored as float), else ``weight``.
* Parameters: every parameter of the model except the quantizer scales of QAT layers (a parameter
  whose qualified name has a ``weight_quant`` or ``act_quant`` component), plus, in a loaded
  artifact, the weights and biases of its ``QuantizedConv2d`` / ``QuantizedLinear`` layers (stored
  there as buffers: integer codes and their dequantized fp32 copy count once). An artifact has its
  BatchNorms folded, so it has fewer parameters than the model it came from, and the same MACs.
* Activation memory: the bytes of every leaf module's output tensors at fp32 (4 bytes per element,
  whatever the dtype), summed over leaves and over calls (a module called twice counts twice; an
  in-place ReLU's output counts too): the memory all intermediate results would take if none were
  freed, an upper bound of the peak.

A layer row (``layers``) is kept for each leaf with parameters or MACs, in the order the leaves first
ran: ``name``, ``type``, ``params``, ``macs``, ``nonzero_macs``, ``density``, ``output_shape`` (per
sample: without the batch dimension; the first call's), ``activation_bytes``, ``calls``.

Latency (:func:`measure_latency`): eval mode, ``torch.inference_mode()``, one fixed-seed ``randn``
batch per batch size (never zeros: zeros would make sparse and quantized paths look cheap),
``warmup`` untimed calls then ``repeats`` calls each timed alone with ``time.perf_counter`` (on
CUDA with ``torch.cuda.synchronize()`` before and after each); ``ms`` is the median, ``ms_min`` the
fastest, ``images_per_s = batch / ms * 1000``. Measure on an otherwise idle machine: with another
busy process on a 2-core VM, OpenMP's spinning worker threads compete with it and small kernels
were measured up to 100x slower (on an idle machine the default wait policy is the fastest:
1.07 ms against 2.82 ms with ``OMP_WAIT_POLICY=PASSIVE`` for the student at batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    "load_for_profile",
    "profile_model",
    "measure_latency",
    "parse_input_size",
    "parse_model_args",
    "format_report",
    "add_arguments",
    "cli_main",
    "DEFAULT_INPUT_SIZE",
    "DEFAULT_NUM_CLASSES",
]

DEFAULT_INPUT_SIZE = (3, 32, 32)
DEFAULT_NUM_CLASSES = 10
_QUANTIZER_PARTS = ("weight_quant", "act_quant")
_FP32_BYTES = 4


# ------------------------------------------------------------------------------------ parsing
def parse_input_size(value: Union[str, Sequence[int]]) -> Tuple[int, int, int]:
    """``"1x28x28"`` or ``(1, 28, 28)`` -> ``(C, H, W)`` (positive ints); ValueError otherwise."""
    try:
        if isinstance(value, str):
            parts = tuple(int(p) for p in value.lower().replace(" ", "").split("x"))
        else:
            parts = tuple(int(v) for v in value)
            if any(isinstance(v, bool) for v in value):
                parts = ()
    except (TypeError, ValueError):
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"input size must be channels x height x width like 1x32x32, got {value!r}")
    return parts  # type: ignore[return-value]


# a comma starts a new item only when a `key=` follows, so list values like `widths=[1, 2]` survive
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def parse_model_args(text: Union[None, str, Iterable[str]]) -> Dict[str, Any]:
    """``"width_mult=0.5,depth=20"`` (or several such strings) -> ``{"width_mult": 0.5, "depth": 20}``;
    values are parsed as YAML (``true``, ``null``, ``[1, 2]``, numbers, strings)."""
    import yaml

    if text is None:
        return {}
    texts = [text] if isinstance(text, str) else list(text)
    out: Dict[str, Any] = {}
    for t in texts:
        for item in _ITEM_SPLIT.split(t.strip()):
            item = item.strip()
            if not item:
                continue
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise ValueError(f"--model-args: expected key=value items separated by commas, got {item!r}")
            try:
                out[key] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as exc:
                raise ValueError(f"--model-args: cannot parse the value of {key!r} ({raw!r}): {exc}") from None
    return out


# ------------------------------------------------------------------------------------ model specs
def _shape_from_data(
    data: Optional[Dict[str, Any]], in_channels: Optional[int], data_root
) -> Optional[Tuple[int, int, int]]:
    """(C, H, W) from a recorded dataset description; builds the dataset (test split) only when it
    names a dataset but no image size."""
    data = data or {}
    c = data.get("in_channels", in_channels)
    size = data.get("image_size")
    if not size and data.get("dataset"):
        try:
            from .data import build_dataset

            _, dinfo = build_dataset(
                data["dataset"], "test", data_root=data_root, augment=False, **(data.get("options") or {})
            )
            c, size = dinfo.in_channels, list(dinfo.image_size)
        except Exception:  # noqa: BLE001 - the caller asks for --input-size instead
            return None
    if c is None or not size:
        return None
    size = [int(size)] * 2 if isinstance(size, (int, float)) else [int(s) for s in size]
    if len(size) == 1:
        size = size * 2
    return (int(c), size[0], size[1])


def _known_names() -> str:
    from . import models

    return ", ".join(models.names())


def load_for_profile(
    spec: str,
    *,
    model_args: Optional[Dict[str, Any]] = None,
    num_classes: Optional[int] = None,
    input_size: Union[None, str, Sequence[int]] = None,
    data_root=None,
) -> Tuple[nn.Module, Tuple[int, int, int], Dict[str, Any]]:
    """Resolve a model spec into ``(model, (C, H, W), info)``.

    * a registry model name: ``pycompress.models.build(name, in_channels=C, num_classes=N,
      **model_args)`` in fp32, ``(C, H, W)`` from ``input_size`` (default 3x32x32), N from
      ``num_classes`` (default 10). A model taking an ``input_size`` argument (lenet5, lenet300) gets
      H when H == W and ``model_args`` does not set it.
    * a pycompress checkpoint (``pycompress.recipe.load_model``): the input shape of the dataset it
      records (``data.in_channels`` / ``data.image_size``), or ``input_size``.
    * a ``.pcz`` artifact (``pycompress.export.load``): the input shape in its manifest's ``data``,
      or ``input_size``.

    ``data_root`` is used only when a file records a dataset but no image size (the dataset is
    then opened to read it). ``info``: ``spec``, ``kind`` ("name" | "checkpoint" | "artifact"),
    ``model`` (registry name), ``args``, ``in_channels``, ``num_classes``, ``input_shape``, and for
    files ``path``, ``qat``, ``stage``, ``epoch``, ``dataset`` (artifacts also ``encoding`` and
    ``file_bytes``). The model is on the CPU in eval mode.

    Raises ValueError naming the spec and what was expected: an unknown name (with the known
    names), a missing or unreadable file, arguments that do not fit, or no known input shape.
    """
    from . import models

    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be a registry model name, a checkpoint or a .pcz file, got {spec!r}")
    shape = parse_input_size(input_size) if input_size is not None else None
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")

    if (spec in models.names() and os.sep not in spec) or models.is_external(spec):
        c, h, w = shape or DEFAULT_INPUT_SIZE
        n = DEFAULT_NUM_CLASSES if num_classes is None else num_classes
        args = dict(model_args or {})
        if "input_size" in (models.accepted_kwargs(spec) or {}) and "input_size" not in args and h == w:
            args["input_size"] = h
        try:
            model = models.build(spec, in_channels=c, num_classes=n, **args)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"cannot build model {spec!r} for input {c}x{h}x{w} with {n} classes: {exc}") from None
        model.float().eval()
        info = {
            "spec": spec,
            "kind": "name",
            "model": spec,
            "args": args,
            "in_channels": c,
            "num_classes": n,
            "input_shape": [c, h, w],
        }
        return model, (c, h, w), info

    if not os.path.exists(spec):
        raise ValueError(
            f"{spec!r} is neither a known model name nor an existing file: expected a registry "
            f"model name (known models: {_known_names()}), a pycompress checkpoint (.pt) or a "
            f".pcz artifact"
        )
    if os.path.isdir(spec):
        raise ValueError(
            f"{spec!r} is a directory: expected a registry model name, a pycompress checkpoint file "
            f"(e.g. a run's <stage>/best.pt) or a .pcz artifact"
        )
    if model_args:
        raise ValueError(
            f"{spec!r} is a file, and --model-args applies to a registry model name only "
            f"(a checkpoint or artifact records its own architecture)"
        )

    from .export import is_artifact

    path = os.path.abspath(spec)
    if is_artifact(spec):
        from .export import load as load_artifact

        try:
            model = load_artifact(spec)
        except Exception as exc:  # noqa: BLE001 - ArtifactError, or a model that cannot be rebuilt
            raise ValueError(f"{spec!r} is not a readable .pcz artifact: {exc}") from None
        man = model.artifact.manifest
        arch = man.get("arch") or {}
        data = man.get("data") or {}
        info = {
            "spec": spec,
            "kind": "artifact",
            "path": path,
            "model": arch.get("model"),
            "args": dict(arch.get("args") or {}),
            "in_channels": arch.get("in_channels"),
            "num_classes": arch.get("num_classes"),
            "qat": any((e or {}).get("kind") == "quantized" for e in (man.get("layers") or {}).values()),
            "stage": (man.get("source") or {}).get("stage"),
            "epoch": (man.get("source") or {}).get("epoch"),
            "dataset": data.get("dataset"),
            "encoding": man.get("encoding"),
            "file_bytes": model.artifact.facts.get("file_bytes"),
        }
    else:
        from .recipe import load_model

        try:
            model, ckpt = load_model(spec)
        except Exception as exc:  # noqa: BLE001 - CheckpointError, or an arch / state that does not fit
            hint = " (a .pcz file without the artifact signature)" if spec.lower().endswith(".pcz") else ""
            raise ValueError(
                f"{spec!r} is not a readable pycompress checkpoint or .pcz artifact{hint}: {type(exc).__name__}: {exc}"
            ) from None
        arch = ckpt.get("arch") or {}
        data = ckpt.get("data") or {}
        info = {
            "spec": spec,
            "kind": "checkpoint",
            "path": path,
            "model": arch.get("model"),
            "args": dict(arch.get("args") or {}),
            "in_channels": arch.get("in_channels"),
            "num_classes": arch.get("num_classes"),
            "qat": bool(arch.get("qat")),
            "stage": ckpt.get("stage"),
            "epoch": ckpt.get("epoch"),
            "dataset": data.get("dataset"),
        }
    if num_classes is not None and info["num_classes"] is not None and int(info["num_classes"]) != num_classes:
        raise ValueError(
            f"{spec!r} records a model with {info['num_classes']} classes, not {num_classes} "
            f"(--num-classes applies to a registry model name)"
        )
    rec_c = info["in_channels"]
    if shape is None:
        shape = _shape_from_data(data, rec_c, data_root)
        if shape is None:
            raise ValueError(f"{spec!r} records no input size (no dataset image size): pass --input-size CxHxW")
    elif rec_c is not None and shape[0] != int(rec_c):
        raise ValueError(f"--input-size {'x'.join(map(str, shape))}: {spec!r} takes {rec_c} input channels")
    model.float().eval()
    info["input_shape"] = list(shape)
    return model, tuple(shape), info  # type: ignore[return-value]


# ------------------------------------------------------------------------------------ counting
def _leaf_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Modules without children, plus conv / linear layers (whose children are not visited)."""
    out: List[Tuple[str, nn.Module]] = []

    def walk(prefix: str, m: nn.Module) -> None:
        children = list(m.named_children())
        if not children or isinstance(m, (nn.Conv2d, nn.Linear)):
            out.append((prefix, m))
            return
        for name, child in children:
            if child is not None:
                walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    seen, uniq = set(), []
    for name, m in out:  # a module registered under two names is one layer
        if id(m) not in seen:
            seen.add(id(m))
            uniq.append((name or type(model).__name__, m))
    return uniq


def _is_quantizer_param(name: str) -> bool:
    return any(part in _QUANTIZER_PARTS for part in name.split("."))


def _artifact_layers():
    from .export import QUANTIZED_LAYERS

    return QUANTIZED_LAYERS


def _module_params(m: nn.Module) -> int:
    """A leaf's parameters (quantizer scales excluded; an artifact layer's weight / bias buffers in)."""
    n = sum(p.numel() for name, p in m.named_parameters() if not _is_quantizer_param(name))
    if isinstance(m, _artifact_layers()):
        for b in ("weight", "bias"):
            t = m._buffers.get(b)
            if t is not None:
                n += t.numel()
    return n


def count_params(model: nn.Module) -> int:
    """All parameters except QAT quantizer scales, plus an artifact's quantized layers' weights and
    biases (buffers there)."""
    n = sum(p.numel() for name, p in model.named_parameters() if not _is_quantizer_param(name))
    for m in model.modules():
        if isinstance(m, _artifact_layers()):
            n += sum(m._buffers[b].numel() for b in ("weight", "bias") if m._buffers.get(b) is not None)
    return n


def _weight_nnz(m: nn.Module) -> Optional[Tuple[int, int]]:
    """(nonzero, total) of the weight a conv / linear computes with; None when it has none."""
    codes = getattr(m, "_buffers", {}).get("weight_codes")
    if isinstance(codes, torch.Tensor):
        w = codes
    elif getattr(m, "weight_quant", None) is not None and hasattr(m, "weight_codes"):
        try:
            w = m.weight_codes()[0]
        except Exception:  # noqa: BLE001 - fall back to the float weight
            w = getattr(m, "weight", None)
    else:
        w = getattr(m, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() == 0:
        return None
    with torch.no_grad():
        return int(torch.count_nonzero(w.detach())), w.numel()


def _tensors(out: Any) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def _macs(m: nn.Module, inputs: Tuple[Any, ...], out: Any) -> int:
    """MACs of one call, per sample (see the module docstring)."""
    outs = _tensors(out)
    if not outs:
        return 0
    y = outs[0]
    batch = max(int(y.shape[0]), 1) if y.dim() > 0 else 1
    if isinstance(m, nn.Conv2d):
        kh, kw = m.kernel_size
        return y.numel() // batch * (m.in_channels // m.groups) * kh * kw
    if isinstance(m, nn.Linear):
        return y.numel() // batch * m.in_features
    return 0


def profile_model(
    model: nn.Module, input_shape: Sequence[int], *, device: Union[str, torch.device] = "cpu", seed: int = 0
) -> Dict[str, Any]:
    """Count ``params``, ``macs``, ``nonzero_macs`` and ``activation_bytes`` (all per sample) of
    ``model`` on one input of shape ``input_shape`` (C, H, W), with per-layer rows in ``layers``;
    see the module docstring for the rules. The model runs once on ``device`` (moved there and
    back); its modules' train / eval modes are restored and the hooks removed, also on error. A
    forward that fails raises ValueError naming the input shape."""
    from .utils import model_device

    shape = parse_input_size(input_shape)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda but torch sees no CUDA GPU")
    leaves = _leaf_modules(model)
    stats: Dict[int, Dict[str, Any]] = {}
    order: List[int] = []

    def hook(name: str):
        def fn(mod: nn.Module, inputs, out) -> None:
            st = stats.get(id(mod))
            if st is None:
                outs = _tensors(out)
                st = stats[id(mod)] = {
                    "name": name,
                    "type": type(mod).__name__,
                    "macs": 0,
                    "activation_bytes": 0,
                    "calls": 0,
                    "output_shape": list(outs[0].shape[1:]) if outs and outs[0].dim() else None,
                }
                order.append(id(mod))
            st["calls"] += 1
            st["macs"] += _macs(mod, inputs, out)
            st["activation_bytes"] += sum(t.numel() for t in _tensors(out)) * _FP32_BYTES

        return fn

    modes = {m: m.training for m in model.modules()}
    old_dev = model_device(model)
    handles = []
    try:
        for name, m in leaves:
            handles.append(m.register_forward_hook(hook(name)))
        if old_dev is not None and old_dev != dev:
            model.to(dev)
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((1,) + tuple(shape), generator=gen).to(dev)
        try:
            with torch.no_grad():
                model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            raise ValueError(
                f"the model's forward fails on an input of shape 1x{'x'.join(map(str, shape))}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
        if old_dev is not None and old_dev != dev:
            model.to(old_dev)

    by_id = {id(m): (name, m) for name, m in leaves}
    layers: List[Dict[str, Any]] = []
    ids = order + [i for i in by_id if i not in stats]  # leaves that never ran come last
    for i in ids:
        name, m = by_id[i]
        st = stats.get(i) or {
            "name": name,
            "type": type(m).__name__,
            "macs": 0,
            "activation_bytes": 0,
            "calls": 0,
            "output_shape": None,
        }
        params = _module_params(m)
        if not params and not st["macs"]:
            continue
        nnz = _weight_nnz(m) if st["macs"] else None
        density = 1.0 if nnz is None else nnz[0] / nnz[1]
        nz_macs = st["macs"] if nnz is None else st["macs"] * nnz[0] // nnz[1]
        layers.append(
            {
                "name": st["name"],
                "type": st["type"],
                "params": params,
                "macs": st["macs"],
                "nonzero_macs": nz_macs,
                "density": density,
                "output_shape": st["output_shape"],
                "activation_bytes": st["activation_bytes"],
                "calls": st["calls"],
            }
        )
    total_macs = sum(st["macs"] for st in stats.values())
    return {
        "input_shape": list(shape),
        "params": count_params(model),
        "macs": total_macs,
        "nonzero_macs": sum(r["nonzero_macs"] for r in layers),
        "activation_bytes": sum(st["activation_bytes"] for st in stats.values()),
        "layers": layers,
    }


# ------------------------------------------------------------------------------------ latency
def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 64),
    device: Union[str, torch.device] = "cpu",
    warmup: int = 5,
    repeats: int = 20,
    threads: Optional[int] = None,
    seed: int = 0,
) -> List[Dict[str, Any]]:
    """Inference latency per batch size: ``[{"device", "batch", "ms", "ms_min", "images_per_s",
    "threads"}]`` (``ms`` the median of ``repeats`` individually timed calls after ``warmup``
    untimed ones; see the module docstring). The model runs in eval mode under
    ``torch.inference_mode()`` on ``device`` (moved there and back); its modes and torch's thread
    count (``threads`` sets it for the measurement) are restored afterwards."""
    from .utils import model_device

    shape = parse_input_size(input_shape)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda but torch sees no CUDA GPU")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)!r}")
    if int(repeats) < 1 or int(warmup) < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats!r} and {warmup!r}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    modes = {m: m.training for m in model.modules()}
    old_dev = model_device(model)
    old_threads = torch.get_num_threads()
    rows: List[Dict[str, Any]] = []
    try:
        if threads is not None:
            torch.set_num_threads(int(threads))
        n_threads = torch.get_num_threads()
        if old_dev is not None and old_dev != dev:
            model.to(dev)
        model.eval()
        gen = torch.Generator().manual_seed(seed)
        for b in sizes:
            x = torch.randn((b,) + tuple(shape), generator=gen).to(dev)
            times = []
            with torch.inference_mode():
                for _ in range(int(warmup)):
                    model(x)
                sync()
                for _ in range(int(repeats)):
                    sync()
                    t0 = time.perf_counter()
                    model(x)
                    sync()
                    times.append((time.perf_counter() - t0) * 1e3)
            ms = statistics.median(times)
            rows.append(
                {
                    "device": dev.type,
                    "batch": b,
                    "ms": ms,
                    "ms_min": min(times),
                    "images_per_s": b / ms * 1e3 if ms > 0 else float("inf"),
                    "threads": n_threads,
                }
            )
    finally:
        torch.set_num_threads(old_threads)
        for m, training in modes.items():
            m.training = training
        if old_dev is not None and old_dev != dev:
            model.to(old_dev)
    return rows


# ------------------------------------------------------------------------------------ report
def _shape_text(shape: Optional[Sequence[int]]) -> str:
    return "-" if shape is None else ("x".join(str(s) for s in shape) or "scalar")


def format_report(prof: Dict[str, Any], latency: Sequence[Dict[str, Any]] = (), title: str = "") -> str:
    """The per-layer table, the totals and the latency rows as text."""
    rows = prof["layers"]
    total = prof["macs"] or 1
    w = max([len(r["name"]) for r in rows] + [5])
    tw = max([len(r["type"]) for r in rows] + [4])
    lines = []
    if title:
        lines.append(title)
    lines.append(f"{'layer':{w}s}  {'type':{tw}s}  {'output':14s} {'params':>10s} {'MACs':>13s} {'share':>6s}")
    for r in rows:
        lines.append(
            f"{r['name']:{w}s}  {r['type']:{tw}s}  {_shape_text(r['output_shape']):14s} "
            f"{r['params']:10,d} {r['macs']:13,d} {100 * r['macs'] / total:5.1f}%"
        )
    nz = prof["nonzero_macs"]
    act = prof["activation_bytes"]
    lines.append("")
    lines.append(
        f"input {_shape_text(prof['input_shape'])}: {prof['params']:,} parameters, "
        f"{prof['macs'] / 1e6:.3f} M MACs per image ({prof['macs']:,}), nonzero-weight MACs "
        f"{nz / 1e6:.3f} M ({100 * nz / total:.1f}%), activations {act / 1e3:.1f} KB per image "
        f"({act:,} bytes, fp32, all leaf outputs)"
    )
    for r in latency:
        lines.append(
            f"latency {r['device']:4s} batch {r['batch']:4d}: {r['ms']:9.3f} ms median "
            f"(min {r['ms_min']:.3f}), {r['images_per_s']:12,.1f} images/s, {r.get('threads')} threads"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ command line
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `pycompress profile`'s arguments to ``p`` (a subparser); returns ``p``."""
    p.add_argument(
        "model",
        help="a registry model name (e.g. mobilenet_student), a pycompress checkpoint (best.pt) or a .pcz artifact",
    )
    p.add_argument(
        "--model-args",
        action="append",
        metavar="K=V,...",
        help="with a model name: its arguments, values parsed as YAML, e.g. width_mult=0.5,depth=20 (repeatable)",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help=f"with a model name: output classes (default {DEFAULT_NUM_CLASSES})",
    )
    p.add_argument(
        "--input-size",
        metavar="CxHxW",
        help="input shape (default: the one a checkpoint or artifact records; 3x32x32 for a name)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the profile and latency rows as JSON")
    p.add_argument("--no-latency", action="store_true", help="count only; do not time the model")
    p.add_argument(
        "--batch",
        type=_positive_int,
        action="append",
        metavar="N",
        help="latency batch size (repeatable; default 1 and 64)",
    )
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="latency on the CPU, and also on the GPU with cuda; auto (default): cuda when available",
    )
    p.add_argument(
        "--threads", type=_positive_int, metavar="N", help="torch CPU threads while timing (default: torch's)"
    )
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed calls per row (median reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls before timing")
    p.add_argument(
        "--data-root", metavar="DIR", help="where datasets are, when a file records a dataset but no image size"
    )
    return p


def _err(exc: Any) -> int:
    print(f"pycompress profile: error: {exc}", file=sys.stderr)
    return 2


def cli_main(args: argparse.Namespace) -> int:
    """Run `pycompress profile` for parsed ``args`` (see :func:`add_arguments`): 0 done, 2 error."""
    from .utils import atomic_write_text

    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - a Namespace built by hand works
    device = a("device") or "auto"
    if device not in ("auto", "cpu", "cuda"):
        return _err(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        return _err("--device cuda but no CUDA device is available")
    devices = ["cpu"] + (["cuda"] if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else [])
    try:
        margs = parse_model_args(a("model_args"))
        model, shape, info = load_for_profile(
            a("model"),
            model_args=margs,
            num_classes=a("num_classes"),
            input_size=a("input_size"),
            data_root=a("data_root"),
        )
        prof = profile_model(model, shape)
        latency: List[Dict[str, Any]] = []
        if not a("no_latency", False):
            for dev in devices:
                latency += measure_latency(
                    model,
                    shape,
                    batch_sizes=a("batch") or (1, 64),
                    device=dev,
                    warmup=5 if a("warmup") is None else a("warmup"),
                    repeats=a("repeats") or 20,
                    threads=a("threads"),
                )
    except ValueError as exc:
        return _err(exc)
    except RuntimeError as exc:  # e.g. out of memory at a large batch
        return _err(f"{type(exc).__name__}: {exc}")
    desc = info.get("model") or a("model")
    if info.get("args"):
        desc += " " + ",".join(f"{k}={v}" for k, v in info["args"].items())
    where = "" if info["kind"] == "name" else f" from {info['kind']} {a('model')}"
    print(format_report(prof, latency, title=f"{desc}{where}, input {_shape_text(shape)}"))
    if a("json"):
        res = {
            "model": info,
            **prof,
            "latency": latency,
            "torch": torch.__version__,
            "threads": torch.get_num_threads() if a("threads") is None else a("threads"),
        }
        try:
            atomic_write_text(a("json"), json.dumps(res, indent=1, default=str) + "\n")
        except OSError as exc:
            return _err(f"cannot write {a('json')}: {exc}")
        print(f"\nwrote {a('json')}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pycompress.profile MODEL ...` (the same as `pycompress profile`)."""
    p = add_arguments(argparse.ArgumentParser(prog="pycompress profile", description=__doc__.split("\n")[0]))
    return cli_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
