"""`pycompress bench model FILE`: how fast a ``.pcz`` artifact runs, against an fp32 baseline.

Variants (each at every batch size; a row is skipped with a note when its engine is missing):

* ``torch fp32``: the artifact's architecture with its dequantized weights as plain fp32 conv /
  linear layers and no activation fake-quantization (:func:`fp32_model`): the honest baseline.
  Folded BatchNorms stay folded (Identity), so it does exactly the float work of the artifact.
* ``torch artifact``: the loaded artifact module itself (pycompress eager: fake-quantized layer
  inputs on pycompress's ops, fp32 convs on the dequantized weights).
* ``ort fp32``: the fp32 model exported to ONNX (``pycompress.export.onnx``), run by ONNX
  Runtime's CPU provider at its default optimization level.
* ``ort int8``: the artifact exported as a QDQ graph (int8 weight codes + DequantizeLinear,
  activation QuantizeLinear/DequantizeLinear), which ORT fuses into QLinearConv where it can
  (``ort_fused`` in the row's note: the count of fused convs).
* with ``device="cuda"``, the two torch variants again on the GPU (ORT rows are CPU only).

Timing: the input is one synthetic batch per batch size, ``randn`` from a fixed seed (never zeros:
zeros would make sparse / quantized paths look unrealistically cheap), created once and reused.
Each variant runs ``warmup`` untimed calls, then ``repeats`` calls each timed on its own with
``time.perf_counter`` (on CUDA after ``torch.cuda.synchronize()`` before and after the call), in
``torch.inference_mode()`` for torch; ORT's ``session.run`` is timed the same way on a numpy copy
of the same input. ``ms`` is the median per call (per batch); ``images_per_s = batch / ms * 1000``;
``speedup`` is the torch fp32 median on the same device and batch divided by this one. Threads:
``threads`` sets both torch's intra-op threads (restored afterwards) and ORT's
``intra_op_num_threads``; None uses torch's current setting for both, so they compare on equal
cores. Each ORT row also records ``agree``: the argmax agreement of its outputs with its torch
counterpart on the benchmark batch (a check that the export is right): ort fp32 vs torch fp32;
ort int8 vs the artifact with its conv biases rounded to int32 as ORT's integer kernels round
them (``pycompress.export.onnx.integer_bias_reference``; against the float-bias module, random
inputs of a quantized net agree less: near-ties flip when one activation rounds differently).

Two things to know when reading the numbers. On x86, ORT fuses the QDQ convs into QLinearConv
(uint8 activations x int8 weights, VNNI where the CPU has it): the pointwise (1x1) convs run
faster than fp32, but the stem conv (3 input channels: a 27-deep dot product) and the depthwise
convs are slower in int8 than ORT's fp32 NCHWc kernels, and at full resolution they dominate a
MobileNet-style student, so "ort int8" can be slower than "ort fp32"; weights below 8 bits gain
nothing at run time (no int4 conv exists), only file size. And measure on an otherwise idle
machine: another busy process competes with OpenMP's spinning threads on a 2-core VM and small
kernels then take up to 100x longer (on an idle machine the default wait policy is the fastest).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = ["run", "format_table", "write_json", "fp32_model", "input_shape_of", "VARIANTS"]

VARIANTS = ("torch fp32", "torch artifact", "ort fp32", "ort int8")


def fp32_model(artifact_module: nn.Module) -> nn.Module:
    """A float copy of a loaded artifact: each ``QuantizedConv2d`` / ``QuantizedLinear`` becomes a
    plain conv / linear holding its dequantized fp32 ``weight`` and its ``bias`` (depthwise convs
    the kernels support become ``pycompress.nn.DepthwiseConv2d``, the layer the artifact's conv
    runs on, so only the quantization differs); no activation fake-quantization; folded BatchNorms
    stay ``nn.Identity``. ``artifact_module`` is not modified."""
    from ..export.modules import QuantizedConv2d, QuantizedLinear
    from ..nn import DepthwiseConv2d, depthwise_supported

    m = copy.deepcopy(artifact_module)
    for name, mod in list(m.named_modules()):
        if isinstance(mod, QuantizedConv2d):
            bias = mod.bias is not None
            if mod.padding_mode == "zeros" and depthwise_supported(mod) is None:
                new = DepthwiseConv2d(
                    mod.in_channels,
                    mod.kernel_size,
                    mod.stride,
                    mod.padding,
                    mod.dilation,
                    bias=bias,
                    device=mod.weight.device,
                )
            else:
                new = nn.Conv2d(
                    mod.in_channels,
                    mod.out_channels,
                    mod.kernel_size,
                    mod.stride,
                    mod.padding,
                    mod.dilation,
                    mod.groups,
                    bias,
                    mod.padding_mode,
                    device=mod.weight.device,
                )
        elif isinstance(mod, QuantizedLinear):
            bias = mod.bias is not None
            new = nn.Linear(mod.in_features, mod.out_features, bias, device=mod.weight.device)
        else:
            continue
        with torch.no_grad():
            new.weight.copy_(mod.weight.float())
            if bias:
                new.bias.copy_(mod.bias.float())
        parent_name, _, attr = name.rpartition(".")
        setattr(m.get_submodule(parent_name) if parent_name else m, attr, new)
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def input_shape_of(manifest: Dict[str, Any], input_shape: Optional[Sequence[int]] = None) -> Tuple[int, int, int]:
    """``(C, H, W)`` of an artifact's input: ``input_shape`` when given (``(C, H, W)`` or
    ``(H, W)``, channels then from the manifest), else the manifest's dataset
    (``data.in_channels``, ``data.image_size``)."""
    data = manifest.get("data") or {}
    arch = manifest.get("arch") or {}
    c = data.get("in_channels", arch.get("in_channels"))
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 2 and c is not None:
            shape = (int(c),) + shape
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) or (H, W), got {input_shape!r}")
        if c is not None and shape[0] != int(c):
            raise ValueError(f"input_shape has {shape[0]} channels, the artifact's model takes {c}")
        return shape  # type: ignore[return-value]
    size = data.get("image_size")
    if c is None or not size:
        raise ValueError("the artifact records no input size (no dataset in its manifest): pass input_shape=(C, H, W)")
    size = [int(size)] * 2 if isinstance(size, (int, float)) else [int(s) for s in size]
    return (int(c), size[0], size[1])


def _time(fn: Callable[[], Any], warmup: int, repeats: int, sync: Callable[[], None]) -> Tuple[float, float]:
    """(median ms, min ms) of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(max(0, warmup)):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def _row(
    variant: str,
    device: str,
    batch: int,
    ms: Optional[float] = None,
    ms_min: Optional[float] = None,
    note: str = "",
    agree: Optional[float] = None,
) -> Dict[str, Any]:
    return {
        "variant": variant,
        "device": device,
        "batch": batch,
        "ms": ms,
        "ms_min": ms_min,
        "images_per_s": (batch / ms * 1e3) if ms else None,
        "speedup": None,
        "agree": agree,
        "note": note,
    }


def run(
    path: str,
    *,
    batch_sizes: Sequence[int] = (1, 64),
    threads: Optional[int] = None,
    warmup: int = 5,
    repeats: int = 20,
    device: str = "cpu",
    input_shape: Optional[Sequence[int]] = None,
    seed: int = 0,
    onnx: bool = True,
    meta: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Benchmark the artifact at ``path``; returns one row per (variant, device, batch):
    ``{"variant", "device", "batch", "ms", "ms_min", "images_per_s", "speedup", "agree", "note"}``
    (``ms`` None and a ``note`` for a skipped variant). See the module docstring for how timing is
    done. ``device``: "cpu", or "cuda" to add the torch variants on the GPU. ``input_shape``:
    ``(C, H, W)`` when the manifest records no dataset. ``onnx=False`` skips the ORT variants.
    ``meta``, when a dict, is filled with the run's facts (machine, threads, shapes, file sizes,
    fused op counts) for :func:`write_json`."""
    from .. import export

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA GPU")
    batch_sizes = [int(b) for b in batch_sizes]
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
    art = export.load(path)
    manifest = art.artifact.manifest
    shape = input_shape_of(manifest, input_shape)
    fp32 = fp32_model(art)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    n_threads = torch.get_num_threads()
    info: Dict[str, Any] = {
        "artifact": os.path.abspath(path),
        "model": (manifest.get("arch") or {}).get("model"),
        "input_shape": list(shape),
        "batch_sizes": batch_sizes,
        "threads": n_threads,
        "warmup": warmup,
        "repeats": repeats,
        "seed": seed,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    gen = torch.Generator().manual_seed(seed)
    inputs = {b: torch.randn((b,) + tuple(shape), generator=gen) for b in batch_sizes}
    rows: List[Dict[str, Any]] = []
    outs: Dict[Tuple[str, int], torch.Tensor] = {}
    try:
        devices = ["cpu"] + (["cuda"] if device == "cuda" else [])
        for dev in devices:
            sync = (lambda: torch.cuda.synchronize()) if dev == "cuda" else (lambda: None)
            for variant, model in (("torch fp32", fp32), ("torch artifact", art)):
                mdl = model.to(dev)
                for b in batch_sizes:
                    x = inputs[b].to(dev)
                    with torch.inference_mode():
                        out = mdl(x)
                        if dev == "cpu":
                            outs[(variant, b)] = out.float().cpu()
                        ms, mn = _time(lambda: mdl(x), warmup, repeats, sync)
                    rows.append(_row(variant, dev, b, ms, mn))
                model.to("cpu")
        rows += _ort_rows(art, fp32, shape, batch_sizes, inputs, outs, n_threads, warmup, repeats, onnx, info)
    finally:
        torch.set_num_threads(old_threads)
    base = {(r["device"], r["batch"]): r["ms"] for r in rows if r["variant"] == "torch fp32" and r["ms"]}
    for r in rows:
        ref = base.get((r["device"], r["batch"]))
        if ref and r["ms"]:
            r["speedup"] = ref / r["ms"]
    if meta is not None:
        meta.update(info)
    return rows


def _ort_rows(
    art: nn.Module,
    fp32: nn.Module,
    shape,
    batch_sizes,
    inputs,
    outs,
    n_threads: int,
    warmup: int,
    repeats: int,
    enabled: bool,
    info: Dict[str, Any],
) -> List[Dict[str, Any]]:
    names = (("ort fp32", "torch fp32"), ("ort int8", "torch artifact"))
    if not enabled:
        return [_row(v, "cpu", b, note="skipped (onnx=False)") for v, _ in names for b in batch_sizes]
    try:
        from ..export import onnx as ponnx

        ponnx._require("onnx")
        ponnx._require("onnxruntime")
    except ImportError as exc:
        return [_row(v, "cpu", b, note=f"skipped: {exc}") for v, _ in names for b in batch_sizes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pycompress-bench-") as tmp:
        for (variant, ref), model in zip(names, (fp32, art)):
            path = os.path.join(tmp, variant.replace(" ", "_") + ".onnx")
            try:
                facts = ponnx.export_onnx(model, path, shape)
                fused = ponnx.count_fused(path, threads=n_threads)
                sess = ponnx.ort_session(path, threads=n_threads)
            except Exception as exc:  # noqa: BLE001 - an export failure skips the row, with its reason
                rows += [
                    _row(variant, "cpu", b, note=f"skipped: ONNX export failed: {type(exc).__name__}: {str(exc)[:300]}")
                    for b in batch_sizes
                ]
                continue
            info[variant.replace(" ", "_")] = {
                "onnx_bytes": facts["file_bytes"],
                "opset": facts["opset"],
                "fused_ops": {k: v for k, v in fused.items() if v},
            }
            note = (
                f"{fused['QLinearConv']} QLinearConv, {fused['Conv']} fp32 Conv"
                if variant == "ort int8"
                else f"{fused['Conv']} Conv"
            )
            iname = sess.get_inputs()[0].name
            ref_model = ponnx.integer_bias_reference(art) if variant == "ort int8" else None
            for b in batch_sizes:
                feed = {iname: inputs[b].numpy()}
                y = torch.from_numpy(sess.run(None, feed)[0])
                if ref_model is not None:
                    with torch.inference_mode():
                        want = ref_model(inputs[b])
                else:
                    want = outs[(ref, b)]
                agree = float((y.argmax(1) == want.argmax(1)).float().mean())
                ms, mn = _time(lambda: sess.run(None, feed), warmup, repeats, lambda: None)
                rows.append(_row(variant, "cpu", b, ms, mn, note=note, agree=agree))
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    """An aligned plain-text / markdown table: variant, device, batch, ms, images/s, speed-up vs
    torch fp32 (same device and batch), argmax agreement of ORT with torch, note."""
    head = ["variant", "device", "batch", "ms", "images/s", "speed-up", "agree", "note"]
    body = []
    for r in rows:
        body.append(
            [
                r["variant"],
                r["device"],
                str(r["batch"]),
                "-" if r["ms"] is None else f"{r['ms']:.3f}",
                "-" if r["images_per_s"] is None else f"{r['images_per_s']:.1f}",
                "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
                "-" if r.get("agree") is None else f"{100 * r['agree']:.1f}%",
                r.get("note") or "",
            ]
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    right = {2, 3, 4, 5, 6}

    def line(cells):
        return (
            "| "
            + " | ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            + " |"
        )

    sep = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), sep] + [line(b) for b in body])


def write_json(path: str, rows: List[Dict[str, Any]], meta: Optional[Dict[str, Any]] = None) -> None:
    """Write ``{"meta": meta, "rows": rows}`` as JSON (atomically: a temp file, then rename)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"meta": meta or {}, "rows": rows}, f, indent=2, default=str)
            f.write("\n")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
