"""MicroNet challenge scoring: the parameter storage and the math operations of a model, counted
under the challenge's rules, and its score ``params / ref_params + ops / ref_ops``.

``pycompress score MODEL|CHECKPOINT|ARTIFACT`` resolves its argument like ``pycompress profile``
(:func:`pycompress.profile.load_for_profile`: a registry model name, counted in fp32; a checkpoint,
with its QAT layers and pruning masks; a ``.pcz`` artifact). :func:`score_model` runs the model
once in eval mode on one fixed-seed input of shape ``1 x C x H x W`` with a forward hook on every
leaf module (as ``profile`` does) and a torch function mode that sees the tensor arithmetic done
outside leaf modules (residual adds, functional pooling and activations); every count is per
image. The rules (the challenge's ``scoring_and_submission.md`` and its public counting code,
``micronet_challenge/counting.py``, quoted in ../shared/REFERENCES.md section 3):

Bit widths. A conv / linear layer's weight bits ``w`` are its weight quantizer's (QAT layer) or its
stored codes' (artifact layer) width, else 32; its input bits ``a`` are its activation quantizer's
width, else 32. A b-bit value counts b/32 of a parameter, an operation on b-bit inputs
max(b)/32 of an operation. The **16-bit freebie**: when no weight and no activation of the
model is quantized below 16 bits (``freebie=True``, the default, and nothing below 16), every
32-bit parameter and every multiplication counts at 16 bits; additions never take it.
Additions count at ``acc_bits`` (default 32: accumulation in fp32 / int32, the conservative
choice; the entries that won counted 16-bit or adder-tree accumulators, which is an explicit
choice here, never a default).

Parameters (in units of 32-bit parameters: bits / 32):

* conv / linear weight: ``numel * w`` bits dense; when the weight has zeros, ``nnz * w + numel``
  bits (the nonzero values and a 1-bit mask of the whole tensor), whichever is smaller (the rule
  of ``pycompress.quant.model_size`` and of the .pcz format);
* a bias: ``C_out * 32``; a quantized layer (``w`` or ``a`` below 32): also its per-output-channel
  scale, ``C_out * 32`` bits (the scale layer that BatchNorm, the weight scales and the activation
  scale fold into, as in the MicroNet entry's export);
* BatchNorm: ``C * 32`` bits (its bias; its scale merges into the neighbouring layer: "batchnorm
  scales are not counted since they can be merged. Bias added for each batch norm", the public
  counting notebook). A pre-activation BatchNorm (DenseNet's BN-ReLU-conv) cannot always merge
  into a conv; an export with explicit per-channel scale layers there (as the MicroNet entry's)
  would count ``C * 32`` more bits and ``n`` more multiplications for each: not counted here;
* any other leaf's parameters at 32 bits (listed in ``uncounted`` when its type has no rule).

Operations (``mults`` and ``adds`` counted separately, then weighted by bits / 32):

* conv (any ``nn.Conv2d``, grouped and depthwise included; ``K = C_in / groups * kh * kw``, ``d``
  the density of the weight it computes with, ``n`` output elements): ``d * K * n``
  multiplications at max(w, a) and ``(d * K - 1) * n`` additions; ``+ n`` additions for a bias;
  ``+ n`` multiplications at 32 bits for a quantized layer's output scale;
* linear: the same with ``K = in_features``;
* BatchNorm: ``n`` additions (its bias); its multiplications merge into the layer before it;
* ReLU, ReLU6, Hardtanh, LeakyReLU (and ``F.relu``): 1 multiplication per element, at 32 bits (as
  counting.py does, "so the 16-bit freebie applies"); SiLU / Swish / Hardswish / GELU: 3
  multiplications + 1 addition; Sigmoid / Hardsigmoid: 2 + 1;
* max pooling: ``window - 1`` comparisons per output, counted as additions; average pooling
  (modules and ``F.avg_pool2d`` / ``F.adaptive_avg_pool2d`` / ``mean``): ``window - 1`` additions
  and 1 multiplication per output;
* elementwise tensor additions outside leaf modules (residual connections): 1 addition per output
  element; concatenation, flatten, reshape, dropout (eval) and identity: free.

Which convention gives the reference figure: WideResNet-28-10 on a 32x32 CIFAR-100 image counts
36.5M parameters (all weights, biases and BatchNorm scales and biases at 32 bits: 36,536,884) and
10.49B operations (multiplications = MACs of the convolutions and the classifier, additions =
``(K - 1) * n`` per layer plus the BatchNorm bias and residual adds, ReLUs and pooling: see
tests/test_score.py, which checks both within 1%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# WideResNet-28-10 on CIFAR-100, the challenge's reference (scoring_and_submission.md).
CIFAR100_PARAMS = 36.5e6
CIFAR100_OPS = 10.49e9

__all__ = ["score_model", "format_report", "add_arguments", "cli_main", "CIFAR100_PARAMS", "CIFAR100_OPS"]

_RELU_LIKE = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.PReLU)
_SWISH_LIKE = (nn.SiLU, nn.Hardswish, nn.GELU, nn.Mish)
_SIGMOID_LIKE = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)
_FREE = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Flatten, nn.Unflatten)


def _bits_of(m: nn.Module) -> Tuple[int, int]:
    """(weight bits, input activation bits) of a conv / linear (32 when not quantized)."""
    wq, aq = getattr(m, "weight_quant", None), getattr(m, "act_quant", None)
    wb = getattr(wq, "bits", None) if wq is not None else None
    ab = getattr(aq, "bits", None) if aq is not None else None
    if wb is None and "weight_codes" in getattr(m, "_buffers", {}):  # an artifact layer
        wb = getattr(m, "weight_bits", None)
    if ab is None and "act_scale" in getattr(m, "_buffers", {}):
        ab = getattr(m, "act_bits", None)
    return int(wb or 32), int(ab or 32)


def _window(kernel_size: Any) -> int:
    if isinstance(kernel_size, int):
        return kernel_size * kernel_size
    return int(math.prod(kernel_size))


class _Counter(TorchFunctionMode):
    """Counts the arithmetic done outside leaf modules (``depth`` 0)."""

    def __init__(self, rows: List[Dict[str, Any]]):
        super().__init__()
        self.rows, self.depth = rows, 0

    def _add(self, name: str, mults: float = 0.0, adds: float = 0.0) -> None:
        if mults or adds:
            self.rows.append({"name": name, "type": "functional", "mults": mults, "adds": adds, "_mb": 32})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth == 0 and isinstance(out, torch.Tensor):
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out: torch.Tensor) -> None:
        name = getattr(func, "__name__", str(func))
        n = out.numel()
        if name in ("__add__", "__radd__", "__iadd__", "add", "add_", "__sub__", "sub", "__rsub__"):
            if len(args) >= 2 and all(isinstance(a, torch.Tensor) for a in args[:2]):
                self._add(f"{name} {tuple(out.shape[1:])}", adds=float(n))
        elif func in (F.relu, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.leaky_relu) or name in ("relu", "relu_"):
            self._add(f"{name} {tuple(out.shape[1:])}", mults=float(n))
        elif func in (F.avg_pool2d, torch._C._nn.avg_pool2d) or name == "avg_pool2d":
            k = kwargs.get("kernel_size", args[1] if len(args) > 1 else 1)
            w = _window(k)
            self._add(f"avg_pool2d {tuple(out.shape[1:])}", mults=float(n), adds=float((w - 1) * n))
        elif name in ("adaptive_avg_pool2d", "mean"):
            x = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if x is not None and n:
                w = x.numel() // n
                self._add(f"{name} {tuple(out.shape[1:])}", mults=float(n), adds=float((w - 1) * n))
        elif func in (F.max_pool2d,) or name in ("max_pool2d", "max_pool2d_with_indices"):
            k = kwargs.get("kernel_size", args[1] if len(args) > 1 else 1)
            self._add(f"max_pool2d {tuple(out.shape[1:])}", adds=float((_window(k) - 1) * n))


def _leaf_row(name: str, m: nn.Module, inputs: Tuple[Any, ...], out: Any) -> Optional[Dict[str, Any]]:
    """The counts of one call of a leaf module (per image: the input has batch 1)."""
    from .profile import _module_params, _weight_nnz

    y = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(y, torch.Tensor):
        return None
    n = y.numel()
    row: Dict[str, Any] = {"name": name, "type": type(m).__name__, "output_shape": list(y.shape[1:])}
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        wb, ab = _bits_of(m)
        nnz, total = _weight_nnz(m) or (0, 0)
        d = nnz / total if total else 0.0
        if isinstance(m, nn.Conv2d):
            k = (m.in_channels // m.groups) * _window(m.kernel_size)
            c_out = m.out_channels
        else:
            k, c_out = m.in_features, m.out_features
        has_bias = getattr(m, "bias", None) is not None
        quantized = wb < 32 or ab < 32
        dense_bits, sparse_bits = total * wb, nnz * wb + total
        row.update(
            w_bits=wb,
            a_bits=ab,
            density=d,
            weight_bits_stored=min(dense_bits, sparse_bits) if nnz < total else dense_bits,
            sparse=nnz < total and sparse_bits < dense_bits,
            fp_bits=(c_out if has_bias else 0) * 32 + (c_out * 32 if quantized else 0),
            mults=d * k * n,
            _mb=max(wb, ab),
            adds=max(d * k - 1.0, 0.0) * n + (n if has_bias else 0),
            scale_mults=float(n) if quantized else 0.0,
        )
        return row
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        row.update(fp_bits=m.num_features * 32, adds=float(n), mults=0.0, _mb=32)
        return row
    params = _module_params(m)
    if isinstance(m, _RELU_LIKE):
        row.update(mults=float(n), _mb=32)
    elif isinstance(m, _SWISH_LIKE):
        row.update(mults=3.0 * n, adds=float(n), _mb=32)
    elif isinstance(m, _SIGMOID_LIKE):
        row.update(mults=2.0 * n, adds=float(n), _mb=32)
    elif isinstance(m, (nn.MaxPool2d, nn.MaxPool1d)):
        row.update(adds=float((_window(m.kernel_size) - 1) * n))
    elif isinstance(m, (nn.AvgPool2d, nn.AvgPool1d)):
        row.update(mults=float(n), adds=float((_window(m.kernel_size) - 1) * n), _mb=32)
    elif isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool1d)):
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        w = x.numel() // n if x is not None and n else 1
        row.update(mults=float(n), adds=float((w - 1) * n), _mb=32)
    elif isinstance(m, _FREE) or (params == 0 and not list(m.parameters())):
        if not isinstance(m, _FREE) and type(m).__name__ not in ("FakeQuantizer",):
            row["uncounted"] = True  # no rule: its arithmetic (if any) is not counted
        else:
            return None
    else:
        row.update(uncounted=True)
    if params:
        row["fp_bits"] = params * 32
    return row


def score_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    acc_bits: int = 32,
    freebie: bool = True,
    ref_params: float = CIFAR100_PARAMS,
    ref_ops: float = CIFAR100_OPS,
) -> Dict[str, Any]:
    """Count ``model`` on one ``input_shape`` (C, H, W) image under the MicroNet rules (module
    docstring). Returns ``params`` and ``ops`` (32-bit units), ``mults`` / ``adds`` (raw counts and
    weighted), ``score``, the settings, the per-layer ``layers`` list and ``uncounted`` (leaf types
    without a rule)."""
    from .profile import _leaf_modules

    for key, v in (("acc_bits", acc_bits),):
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 64:
            raise ValueError(f"score: {key} must be an integer in 1..64, got {v!r}")
    for key, v in (("ref_params", ref_params), ("ref_ops", ref_ops)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"score: {key} must be a positive number, got {v!r}")
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"score: input_shape must be (C, H, W) of positive sizes, got {input_shape!r}")
    rows: List[Dict[str, Any]] = []
    counter = _Counter(rows)
    handles = []

    def pre(_m, _inp):
        counter.depth += 1

    def make_post(name: str) -> Callable:
        def post(m, inp, out):
            counter.depth -= 1
            r = _leaf_row(name, m, inp, out)
            if r is not None:
                rows.append(r)

        return post

    leaves = _leaf_modules(model)
    for name, m in leaves:
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(make_post(name)))
    modes = [(m, m.training) for m in model.modules()]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1,) + shape, generator=gen).to(device)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, t in modes:
            m.training = t
    # the 16-bit freebie: only when nothing is quantized below 16 bits
    low = [r for r in rows if r.get("w_bits", 32) < 16 or r.get("a_bits", 32) < 16]
    free = bool(freebie) and not low
    fp = 16 if free else 32
    params_bits = mults_w = adds_w = mults = adds = 0.0
    for r in rows:
        wbits = r.get("weight_bits_stored", 0.0)
        if free and r.get("w_bits", 32) >= 32:
            wbits = wbits * fp / 32
        r_bits = wbits + r.get("fp_bits", 0) * fp / 32
        mb = min(r.get("_mb", 32), fp) if free else r.get("_mb", 32)
        rm = r.get("mults", 0.0)
        sm = r.pop("scale_mults", 0.0)
        r_mults_w = rm * mb / 32 + sm * fp / 32
        r_adds_w = r.get("adds", 0.0) * acc_bits / 32
        r["params"] = r_bits / 32
        r["mults"], r["adds"] = rm + sm, r.get("adds", 0.0)
        r["ops"] = r_mults_w + r_adds_w
        r["mult_bits"] = mb
        r.pop("_mb", None)
        params_bits += r_bits
        mults += r["mults"]
        adds += r["adds"]
        mults_w += r_mults_w
        adds_w += r_adds_w
    params, ops = params_bits / 32, mults_w + adds_w
    return {
        "params": params,
        "ops": ops,
        "mults": mults,
        "adds": adds,
        "weighted_mults": mults_w,
        "weighted_adds": adds_w,
        "score": params / ref_params + ops / ref_ops,
        "param_score": params / ref_params,
        "op_score": ops / ref_ops,
        "ref_params": float(ref_params),
        "ref_ops": float(ref_ops),
        "acc_bits": acc_bits,
        "freebie": free,
        "input_shape": list(shape),
        "uncounted": sorted({r["type"] for r in rows if r.get("uncounted")}),
        "layers": rows,
    }


def _num(v: float) -> str:
    if v >= 1e9:
        return f"{v / 1e9:.4g}G"
    if v >= 1e6:
        return f"{v / 1e6:.4g}M"
    if v >= 1e3:
        return f"{v / 1e3:.4g}k"
    return f"{v:.4g}"


def format_report(res: Dict[str, Any], title: str = "") -> str:
    """The per-layer table and the totals as text."""
    head = (
        f"{'layer':<32} {'type':<16} {'w/a bits':>9} {'density':>8} {'params':>10} {'mults':>10} {'adds':>10} "
        f"{'ops':>10}"
    )
    lines = [title] if title else []
    lines += [head, "-" * len(head)]
    for r in res["layers"]:
        bits = f"{r['w_bits']}/{r['a_bits']}" if "w_bits" in r else "-"
        dens = f"{100 * r['density']:.1f}%" if "density" in r else "-"
        lines.append(
            f"{r['name'][:32]:<32} {r['type'][:16]:<16} {bits:>9} {dens:>8} {_num(r['params']):>10} "
            f"{_num(r['mults']):>10} {_num(r['adds']):>10} {_num(r['ops']):>10}"
        )
    lines += [
        "",
        f"parameters {res['params']:,.0f} (32-bit units), operations {res['ops']:,.0f} "
        f"({res['mults']:,.0f} multiplications, {res['adds']:,.0f} additions before the bit weighting)",
        f"score = {res['params']:,.0f} / {res['ref_params']:,.0f} + {res['ops']:,.0f} / {res['ref_ops']:,.0f} "
        f"= {res['param_score']:.6f} + {res['op_score']:.6f} = {res['score']:.6f}",
        f"additions at {res['acc_bits']} bits; 16-bit freebie {'applied' if res['freebie'] else 'not applied'}",
    ]
    if res["uncounted"]:
        lines.append(f"no counting rule for {', '.join(res['uncounted'])}: their arithmetic is not counted")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .profile import _positive_int

    p.add_argument("model", help="a registry model name, a checkpoint (best.pt) or a .pcz artifact")
    p.add_argument("--model-args", action="append", metavar="K=V,...", help="a model name's arguments")
    p.add_argument("--num-classes", type=_positive_int, help="a model name's classes (default 10)")
    p.add_argument("--input-size", metavar="CxHxW", help="input shape (default: the file's dataset, or 3x32x32)")
    p.add_argument("--acc-bits", type=_positive_int, default=32, help="bits of every addition (default 32)")
    p.add_argument("--no-freebie", action="store_true", help="never count 32-bit values at 16 bits")
    p.add_argument(
        "--ref-params", type=float, default=CIFAR100_PARAMS, help="reference parameters (default 36.5e6: CIFAR-100)"
    )
    p.add_argument("--ref-ops", type=float, default=CIFAR100_OPS, help="reference operations (default 10.49e9)")
    p.add_argument("--data-root", metavar="DIR", help="only to read a file's dataset image size")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    return p


def cli_main(args: argparse.Namespace) -> int:
    import sys

    from .profile import load_for_profile, parse_model_args

    try:
        model, shape, info = load_for_profile(
            args.model,
            model_args=parse_model_args(args.model_args),
            num_classes=args.num_classes,
            input_size=args.input_size,
            data_root=args.data_root,
        )
        res = score_model(
            model,
            shape,
            acc_bits=args.acc_bits,
            freebie=not args.no_freebie,
            ref_params=args.ref_params,
            ref_ops=args.ref_ops,
        )
    except (ValueError, OSError) as exc:
        print(f"pycompress score: error: {exc}", file=sys.stderr)
        return 2
    res["model"] = {k: info.get(k) for k in ("spec", "kind", "model", "args", "num_classes")}
    print(format_report(res, f"MicroNet count of {args.model} on a {'x'.join(map(str, shape))} input"))
    if args.json:
        from .utils import atomic_write_text

        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic_write_text(args.json, json.dumps(res, indent=1) + "\n")
    return 0
