"""Compressed artifacts: encode a trained (QAT, pruned or float) model into a ``.pcz`` file, and
rebuild a ready-to-run module from one.

What is stored, per tensor (the manifest's ``tensors`` list records each choice):

* QAT weights: their integer codes at their bit width (``format.pack_codes``), with one fp32
  scale per output channel (``<layer>.weight_scale``). The codes are exactly the ones the QAT
  layer's fake-quantization produces, ``clamp(rint(w * (1 / s_c)), qmin, qmax)``.
* BatchNorm folded into the layer before it (``pycompress.export.fold``): into a QAT layer's
  per-channel scale (codes unchanged) or a float layer's weight, plus a bias.
* Conv / linear weights (codes or float values) are stored sparse, as the project's 1-bit packed
  mask of the nonzero entries followed by only the nonzero entries, whenever that is smaller than
  dense (MicroNet's rule: ``numel + nonzero * bits < numel * bits``); pruned layers end up sparse.
* Activation scales of quantized layer inputs: one fp32 value each.
* Everything else (biases, unfolded BatchNorm, layers left float): by the artifact's float
  encoding: ``pcz`` fp32, ``fp16`` IEEE half, ``uint8`` hw7's per-tensor min-max
  (``q = round((w - min) / (max - min) * 255)``, min and max in the manifest; a constant tensor
  stores q = 0 and its value as min, no division by zero). Quantization scales are fp32 always.

The manifest also records the format version, the pycompress and torch versions, the model's
registry name and arguments, its dataset (for ``pycompress eval``), the layer plan, where it came
from, and an evaluation result when one was given. Loading rebuilds the registry model, applies
the layer plan (QAT layers become ``QuantizedConv2d`` / ``QuantizedLinear``, folded BatchNorms
``nn.Identity``), decodes the tensors and loads them strictly.

Size accounting: each record's ``nbits`` counts its information bits the way
``pycompress.quant.model_size(model, fold_bn=True)`` counts the model (a mask bit per element plus
``bits`` per stored value; fp32 = 32 bits; uint8 adds 64 bits for min and max). The payload rounds
each record up to whole bytes (a mask to whole 32-bit words), and the file adds the 56-byte header
and trailer plus the compressed manifest: ``file_bytes = 56 + manifest_bytes + payload_bytes``.
"""

from __future__ import annotations

import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .fold import bn_affine, bn_fold_pairs
from .format import (
    FORMAT_VERSION,
    ArtifactError,
    code_bytes,
    mask_bytes,
    pack_bool,
    pack_codes,
    read_container,
    unpack_bool,
    unpack_codes,
    write_container,
)
from .modules import QUANTIZED_LAYERS, QuantizedConv2d, QuantizedLinear

__all__ = ["ENCODINGS", "Artifact", "encode", "decode", "save", "load", "read", "arch_of", "layer_table", "ExportError"]

ARTIFACT_FORMAT = "pycompress-artifact"
ENCODINGS = ("pcz", "fp16", "uint8")
_FLOAT_ENC = {"pcz": "f32", "fp16": "f16", "uint8": "u8mm"}
_SKIP_BUFFERS = ("weight_mask", "weight_shadow")  # pruning bookkeeping: the codes carry the zeros


class ExportError(ValueError):
    """The model cannot be exported as asked (no recorded architecture, an unsupported layer...)."""


@dataclass
class Artifact:
    """A read artifact: its manifest and file facts (``file_bytes``, ``manifest_bytes``,
    ``payload_bytes``, ``overhead_bytes``, ``format_version``, ``sha256``)."""

    path: str
    manifest: Dict[str, Any]
    facts: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------ helpers
def arch_of(model: nn.Module) -> Dict[str, Any]:
    """How to rebuild ``model``: ``{"model", "args", "in_channels", "num_classes"}``, recorded by
    ``pycompress.models.build`` on the models it builds."""
    arch = getattr(model, "_pycompress_build", None)
    if not isinstance(arch, dict):
        raise ExportError(
            f"cannot record how to rebuild this {type(model).__name__}: it was not built by "
            f"pycompress.models.build; pass arch={{'model': <registry name, torchvision:<name>, "
            f"timm:<name> or import:<module>:<function>>, 'args': {{...}}, 'in_channels': C, 'num_classes': K}}"
        )
    out = {k: arch[k] for k in ("model", "args", "in_channels", "num_classes")}
    if arch.get("slim"):
        out["slim"] = arch["slim"]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


class _Writer:
    """Collects tensor records and the payload bytes."""

    def __init__(self, float_enc: str):
        self.float_enc = float_enc
        self.records: List[Dict[str, Any]] = []
        self.chunks: List[bytes] = []
        self.offset = 0

    def _add(self, rec: Dict[str, Any], data: bytes) -> None:
        rec["off"], rec["len"] = self.offset, len(data)
        self.records.append(rec)
        self.chunks.append(data)
        self.offset += len(data)

    @staticmethod
    def _float_values(values: torch.Tensor, enc: str) -> Tuple[bytes, Dict[str, Any], int]:
        """(bytes, record params, information bits) of float values in encoding enc."""
        v = values.detach().float().reshape(-1).cpu()
        if not bool(torch.isfinite(v).all()):
            raise ExportError("a tensor holds NaN or inf; refusing to export a diverged model")
        if enc == "f32":
            return _np(v).astype("<f4").tobytes(), {}, 32 * v.numel()
        if enc == "f16":
            h = v.half()
            if not bool(torch.isfinite(h).all()):
                raise ExportError("a value overflows fp16 (|x| > 65504); use the pcz (fp32) encoding")
            return _np(h).astype("<f2").tobytes(), {}, 16 * v.numel()
        # u8mm: hw7's per-tensor min-max
        if v.numel() == 0:
            return b"", {"min": 0.0, "max": 0.0}, 64
        mn, mx = v.min(), v.max()
        rng = mx - mn
        if float(rng) > 0:
            q = torch.round((v - mn) / rng * 255).clamp(0, 255).to(torch.uint8)
        else:
            q = torch.zeros_like(v, dtype=torch.uint8)
        return _np(q).tobytes(), {"min": float(mn), "max": float(mx)}, 8 * v.numel() + 64

    def put_float(self, name: str, t: torch.Tensor, *, sparse_ok: bool = False, enc: Optional[str] = None) -> None:
        enc = enc or self.float_enc
        flat = t.detach().float().reshape(-1).cpu()
        rec: Dict[str, Any] = {"name": name, "shape": list(t.shape), "enc": enc}
        data, params, nbits = self._float_values(flat, enc)
        if sparse_ok and flat.numel():
            keep = flat != 0
            nnz = int(keep.sum())
            vdata, vparams, vbits = self._float_values(flat[keep], enc)
            sbits = flat.numel() + vbits
            if sbits < nbits:
                rec.update(vparams, sparse=True, nnz=nnz, nbits=sbits)
                self._add(rec, pack_bool(_np(keep)) + vdata)
                return
        rec.update(params, nbits=nbits)
        self._add(rec, data)

    def put_codes(self, name: str, codes: torch.Tensor, bits: int, qmin: int) -> None:
        flat = codes.reshape(-1).cpu().to(torch.int64)
        n = flat.numel()
        rec: Dict[str, Any] = {"name": name, "shape": list(codes.shape), "enc": "int", "bits": bits, "qmin": qmin}
        keep = flat != 0
        nnz = int(keep.sum())
        if n + nnz * bits < n * bits:
            rec.update(sparse=True, nnz=nnz, nbits=n + nnz * bits)
            self._add(rec, pack_bool(_np(keep)) + pack_codes(_np(flat[keep]), bits, qmin))
        else:
            rec.update(nbits=n * bits)
            self._add(rec, pack_codes(_np(flat), bits, qmin))

    def put_raw(self, name: str, t: torch.Tensor) -> None:
        arr = _np(t)
        dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "<") else arr.dtype
        self._add(
            {
                "name": name,
                "shape": list(t.shape),
                "enc": "raw",
                "dtype": dt.str,
                "nbits": 8 * arr.dtype.itemsize * arr.size,
            },
            arr.astype(dt).tobytes(),
        )

    def payload(self) -> bytes:
        return b"".join(self.chunks)


def _layer_type(m: nn.Module) -> str:
    return "conv" if isinstance(m, nn.Conv2d) else "linear"


def _weight_codes(layer, name: str) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """(codes int32, scale fp32 [C], bits, qmin) of a QAT layer's weight, checked against the
    layer's own fake-quantization (bit for bit)."""
    from ..ops import fake_quantize
    from ..quant.quantizer import kernel_scale

    wq = layer.weight_quant
    if wq.axis != 0:
        raise ExportError(
            f"layer {name!r}: weight quantizer on axis {wq.axis}; artifacts store per-output-channel (axis 0) codes"
        )
    codes, scale, bits, qmin = layer.weight_codes()
    w = layer.weight.detach().float()
    c = w.shape[0]
    with torch.no_grad():
        ref = fake_quantize(  # kernel_scale: an "als" row pruned to nothing has scale 0 and codes 0
            w, kernel_scale(scale), torch.zeros(c, dtype=torch.int32, device=w.device), qmin, qmin + (1 << bits) - 1, 0
        )
    if not torch.equal(codes.float() * scale.view((c,) + (1,) * (w.dim() - 1)), ref):
        raise ExportError(
            f"layer {name!r}: the integer codes do not reproduce the layer's fake-quantized weight "
            f"(internal error; please report)"
        )
    return codes, scale, bits, qmin


def _act_state(layer) -> Tuple[Optional[int], Optional[bool], Optional[torch.Tensor]]:
    aq = layer.act_quant
    if aq is None:
        return None, None, None
    if not aq.is_calibrated:
        raise ExportError(
            f"activation quantizer {aq.name or ''!r} is not calibrated; calibrate the model "
            f"(pycompress.quant.calibrate) before exporting"
        )
    s = aq.scale.detach().float().reshape(-1)[:1]
    if aq.mode == "lsq":
        s = s.clamp_min(aq.eps)
    return aq.bits, bool(aq.is_signed), s


# ------------------------------------------------------------------------------------ encode
def encode(
    model: nn.Module,
    *,
    arch: Optional[Dict[str, Any]] = None,
    encoding: str = "pcz",
    fold_bn: bool = True,
    data: Optional[Dict[str, Any]] = None,
    source: Optional[Dict[str, Any]] = None,
    eval_result: Optional[Dict[str, Any]] = None,
) -> Tuple[Dict[str, Any], bytes]:
    """``(manifest, payload)`` of ``model`` (not modified). See the module docstring."""
    from ..quant import QAT_LAYERS, model_size
    from ..quant.quantizer import FakeQuantizer

    if encoding not in ENCODINGS:
        raise ExportError(f"encoding must be one of {list(ENCODINGS)}, got {encoding!r}")
    arch = dict(arch) if arch is not None else arch_of(model)
    for k in ("model", "in_channels", "num_classes"):
        if k not in arch:
            raise ExportError(f"arch is missing {k!r} (need model, args, in_channels, num_classes)")
    arch.setdefault("args", {})
    arch.pop("qat", None)  # the layer plan supersedes the training plan
    if any(isinstance(m, QUANTIZED_LAYERS) for m in model.modules()):
        raise ExportError("this model is already a loaded artifact; export its source checkpoint instead")
    pairs, fold_note = bn_fold_pairs(model) if fold_bn else ({}, "fold_bn=False")
    into = {conv: bn for bn, conv in pairs.items()}
    mods = dict(model.named_modules())
    w = _Writer(_FLOAT_ENC[encoding])
    layers: Dict[str, Dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer) or name in pairs:
            if name in pairs:
                layers[name] = {"kind": "folded_bn", "into": pairs[name]}
            continue
        prefix = f"{name}." if name else ""
        bn_name = into.get(name)
        k = mean = beta = None
        if bn_name is not None:
            k, mean, beta = bn_affine(mods[bn_name])
        if isinstance(m, QAT_LAYERS):
            entry: Dict[str, Any] = {
                "kind": "quantized",
                "type": _layer_type(m),
                "weight_bits": m.weight_quant.bits if m.weight_quant is not None else None,
            }
            a_bits, a_signed, a_scale = _act_state(m)
            entry.update(act_bits=a_bits, act_signed=a_signed)
            bias = m.bias.detach().float() if m.bias is not None else None
            if m.weight_quant is not None:
                codes, scale, bits, qmin = _weight_codes(m, name)
                if k is not None:
                    scale = scale * k
                w.put_codes(prefix + "weight_codes", codes, bits, qmin)
                w.put_float(prefix + "weight_scale", scale, enc="f32")
            else:
                wt = m.weight.detach().float()
                if k is not None:
                    wt = wt * k.view((-1,) + (1,) * (wt.dim() - 1))
                w.put_float(prefix + "weight", wt, sparse_ok=True)
            if k is not None:
                bias = ((bias if bias is not None else torch.zeros_like(k)) - mean) * k + beta
                entry["fold"] = bn_name
            entry["bias"] = bias is not None
            if bias is not None:
                w.put_float(prefix + "bias", bias)
            if a_scale is not None:
                w.put_float(prefix + "act_scale", a_scale, enc="f32")
            layers[name] = entry
            continue
        if bn_name is not None:  # a float conv / linear with its BatchNorm folded in
            wt = m.weight.detach().float() * k.view((-1,) + (1,) * (m.weight.dim() - 1))
            b0 = m.bias.detach().float() if m.bias is not None else torch.zeros_like(k)
            layers[name] = {"kind": "folded", "type": _layer_type(m), "fold": bn_name}
            w.put_float(prefix + "weight", wt, sparse_ok=True)
            w.put_float(prefix + "bias", (b0 - mean) * k + beta)
            _put_rest(w, m, prefix, skip=("weight", "bias"))
            continue
        _put_rest(w, m, prefix, skip=(), weights_sparse=isinstance(m, (nn.Conv2d, nn.Linear)))
    import pycompress

    manifest: Dict[str, Any] = {
        "format": ARTIFACT_FORMAT,
        "format_version": FORMAT_VERSION,
        "pycompress": pycompress.__version__,
        "torch": torch.__version__,
        "encoding": encoding,
        "arch": arch,
        "data": data,
        "source": source,
        "eval": eval_result,
        "bn_folding": {"folded": len(pairs), "note": fold_note},
        "layers": layers,
        "tensors": w.records,
        # bits: what the payload encodes (see the module docstring); fp32_bytes: the source model
        # with every parameter and float buffer at 32 bits (pycompress.quant.model_size)
        "size": {"bits": sum(r["nbits"] for r in w.records), "fp32_bytes": int(model_size(model)["fp32_bytes"])},
    }
    return manifest, w.payload()


def _put_rest(w: _Writer, m: nn.Module, prefix: str, skip: Tuple[str, ...], weights_sparse: bool = False) -> None:
    """A module's own parameters and persistent buffers, by the float encoding (integers raw)."""
    for pname, p in m._parameters.items():
        if p is None or pname in skip:
            continue
        w.put_float(prefix + pname, p, sparse_ok=weights_sparse and pname == "weight")
    for bname, b in m._buffers.items():
        if b is None or bname in skip or bname in _SKIP_BUFFERS or bname in m._non_persistent_buffers_set:
            continue
        if b.is_floating_point():
            w.put_float(prefix + bname, b)
        elif isinstance(m, _BatchNorm) and bname == "num_batches_tracked":
            continue  # training bookkeeping, not needed to run
        else:
            w.put_raw(prefix + bname, b)


# ------------------------------------------------------------------------------------ decode
def _fail(path: str, msg: str) -> ArtifactError:
    return ArtifactError(f"{path}: {msg}")


def _decode_float(data: bytes, n: int, rec: Dict[str, Any], path: str) -> torch.Tensor:
    enc = rec["enc"]
    if enc == "f32":
        want = 4 * n
        arr = np.frombuffer(data, dtype="<f4", count=n) if len(data) == want else None
    elif enc == "f16":
        want = 2 * n
        arr = np.frombuffer(data, dtype="<f2", count=n).astype(np.float32) if len(data) == want else None
    elif enc == "u8mm":
        want = n
        if len(data) == want:
            q = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, count=n).astype(np.float32))
            mn = torch.tensor(float(rec["min"]), dtype=torch.float32)
            mx = torch.tensor(float(rec["max"]), dtype=torch.float32)
            return q / 255 * (mx - mn) + mn
        arr = None
    else:
        raise _fail(path, f"tensor {rec['name']!r}: unknown float encoding {enc!r}")
    if arr is None:
        raise _fail(
            path, f"corrupt manifest: tensor {rec['name']!r} has {len(data)} bytes of {enc} values, expected {want}"
        )
    return torch.from_numpy(arr.astype(np.float32, copy=True))


def _decode_values(data: bytes, n: int, rec: Dict[str, Any], path: str) -> torch.Tensor:
    if rec["enc"] == "int":
        bits, qmin = int(rec["bits"]), int(rec["qmin"])
        if not 1 <= bits <= 16:
            raise _fail(path, f"corrupt manifest: tensor {rec['name']!r} has {bits}-bit codes")
        if len(data) != code_bytes(n, bits):
            raise _fail(
                path,
                f"corrupt manifest: tensor {rec['name']!r} has {len(data)} bytes of {bits}-bit codes, "
                f"expected {code_bytes(n, bits)}",
            )
        return torch.from_numpy(unpack_codes(data, n, bits, qmin).copy())
    if rec["enc"] == "raw":
        try:
            dt = np.dtype(rec["dtype"])
        except TypeError:
            raise _fail(path, f"corrupt manifest: tensor {rec['name']!r} has dtype {rec.get('dtype')!r}") from None
        if len(data) != dt.itemsize * n:
            raise _fail(
                path, f"corrupt manifest: tensor {rec['name']!r} has {len(data)} bytes, expected {dt.itemsize * n}"
            )
        return torch.from_numpy(np.frombuffer(data, dtype=dt, count=n).astype(dt.newbyteorder("="), copy=True))
    return _decode_float(data, n, rec, path)


def _decode_tensor(rec: Dict[str, Any], payload: bytes, path: str) -> torch.Tensor:
    try:
        name, shape, off, ln = rec["name"], [int(s) for s in rec["shape"]], int(rec["off"]), int(rec["len"])
    except (KeyError, TypeError, ValueError):
        raise _fail(path, f"corrupt manifest: bad tensor record {str(rec)[:200]}") from None
    if off < 0 or ln < 0 or off + ln > len(payload):
        raise _fail(path, f"corrupt manifest: tensor {name!r} lies outside the payload")
    data = payload[off : off + ln]
    n = math.prod(shape)
    if rec.get("sparse"):
        mb = mask_bytes(n)
        if ln < mb:
            raise _fail(path, f"corrupt manifest: tensor {name!r} is shorter than its mask")
        keep = torch.from_numpy(unpack_bool(data[:mb], n))
        nnz = int(keep.sum())
        if nnz != int(rec.get("nnz", -1)):
            raise _fail(
                path,
                f"corrupt manifest: tensor {name!r}: the mask has {nnz} nonzeros, the record says {rec.get('nnz')}",
            )
        vals = _decode_values(data[mb:], nnz, rec, path)
        out = torch.zeros(n, dtype=vals.dtype)
        out[keep] = vals
    else:
        out = _decode_values(data, n, rec, path)
    return out.reshape(shape)


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for attr, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, attr, new)


def decode(manifest: Dict[str, Any], payload: bytes, path: str = "<memory>") -> nn.Module:
    """Rebuild the model an artifact describes (eval mode, no gradients)."""
    from .. import models

    if manifest.get("format") != ARTIFACT_FORMAT:
        raise _fail(path, f"the manifest is not a {ARTIFACT_FORMAT} manifest")
    arch = manifest.get("arch") or {}
    name = arch.get("model")
    if models.is_external(name):  # torchvision:, timm:, import: (its module must be importable here)
        try:
            models.check_name(name)
        except ValueError as exc:
            raise _fail(path, f"cannot rebuild the artifact's model: {exc}") from None
    elif name not in models.names():
        raise _fail(
            path,
            f"the artifact's model {name!r} is not known to this pycompress installation "
            f"(known models: {', '.join(models.names())})",
        )
    try:
        model = models.build(
            name,
            in_channels=int(arch["in_channels"]),
            num_classes=int(arch["num_classes"]),
            **dict(arch.get("args") or {}),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _fail(path, f"cannot rebuild model {name!r} with the recorded arguments: {exc}") from None
    if arch.get("slim"):  # a slimmed network: its layers' channel counts
        from ..prune.structured import apply_plan as apply_slim_plan

        try:
            apply_slim_plan(model, arch["slim"])
        except ValueError as exc:
            raise _fail(path, f"cannot rebuild the slimmed {name!r}: {exc}") from None
    mods = dict(model.named_modules())
    layers = manifest.get("layers") or {}
    for lname, entry in layers.items():
        m = mods.get(lname)
        kind = entry.get("kind")
        if m is None:
            raise _fail(
                path,
                f"the layer plan names {lname!r}, which model {name!r} does not have "
                f"(built by another pycompress version?)",
            )
        if kind == "folded_bn":
            if not isinstance(m, _BatchNorm):
                raise _fail(path, f"layer plan: {lname!r} is a {type(m).__name__}, not a BatchNorm")
            _replace(model, m, nn.Identity())
            continue
        want = {"conv": nn.Conv2d, "linear": nn.Linear}.get(entry.get("type"))
        if want is None or not isinstance(m, want):
            raise _fail(path, f"layer plan: {lname!r} is a {type(m).__name__}, the artifact says {entry.get('type')!r}")
        if kind == "quantized":
            cls = QuantizedConv2d if want is nn.Conv2d else QuantizedLinear
            new = cls.like(
                m,
                bias=bool(entry.get("bias")),
                weight_bits=entry.get("weight_bits"),
                act_bits=entry.get("act_bits"),
                act_signed=entry.get("act_signed"),
            )
            _replace(model, m, new)
        elif kind == "folded":
            if m.bias is None:
                m.bias = nn.Parameter(torch.zeros(m.weight.shape[0]))
        else:
            raise _fail(path, f"layer plan: {lname!r} has unknown kind {kind!r}")
    state = {}
    for rec in manifest.get("tensors") or []:
        state[rec.get("name")] = _decode_tensor(rec, payload, path)
    expected = model.state_dict()
    unexpected = [k for k in state if k not in expected]
    missing = [
        k
        for k, v in expected.items()
        if k not in state and (v.is_floating_point() or not k.endswith("num_batches_tracked"))
    ]
    if unexpected or missing:
        raise _fail(
            path,
            f"the stored tensors do not fit model {name!r}: "
            + (f"unexpected {unexpected[:5]}" if unexpected else "")
            + ("; " if unexpected and missing else "")
            + (f"missing {missing[:5]}" if missing else ""),
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise _fail(
                path, f"tensor {k!r} has shape {tuple(v.shape)}, model {name!r} expects {tuple(expected[k].shape)}"
            )
        state[k] = v.to(expected[k].dtype)
    model.load_state_dict(state, strict=False)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------ files
def save(
    model: nn.Module,
    path: str,
    *,
    arch: Optional[Dict[str, Any]] = None,
    encoding: str = "pcz",
    fold_bn: bool = True,
    data: Optional[Dict[str, Any]] = None,
    source: Optional[Dict[str, Any]] = None,
    eval_result: Optional[Dict[str, Any]] = None,
    force: bool = False,
) -> Artifact:
    """Export ``model`` to ``path`` (atomically; an existing file only with ``force``). Returns the
    written :class:`Artifact`. ``arch`` defaults to what ``pycompress.models.build`` recorded;
    ``data`` is the dataset description ``pycompress eval`` uses; ``eval_result`` is stored as the
    manifest's evaluation."""
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True (--force) to overwrite it")
    manifest, payload = encode(
        model, arch=arch, encoding=encoding, fold_bn=fold_bn, data=data, source=source, eval_result=eval_result
    )
    write_container(path, manifest, payload, force=force)
    return read(path)


def read(path: str) -> Artifact:
    """Read and verify an artifact's container and manifest, without building the model."""
    path = os.fspath(path)
    manifest, _, facts = read_container(path)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise _fail(path, f"not a pycompress artifact manifest (format {manifest.get('format')!r})")
    return Artifact(path, manifest, facts)


def load(path: str, device: Any = "cpu") -> nn.Module:
    """Load an artifact as a ready-to-run module in eval mode. ``module.artifact`` is its
    :class:`Artifact` (manifest and file facts)."""
    path = os.fspath(path)
    manifest, payload, facts = read_container(path)
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise _fail(path, f"not a pycompress artifact manifest (format {manifest.get('format')!r})")
    model = decode(manifest, payload, path).to(device)
    model.artifact = Artifact(path, manifest, facts)
    return model


# ------------------------------------------------------------------------------------ info
def layer_table(manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Per stored tensor: name, shape, encoding, bits per value, sparsity, bytes."""
    rows = []
    for rec in manifest.get("tensors") or []:
        n = math.prod(int(s) for s in rec["shape"])
        if rec["enc"] == "int":
            bits = int(rec["bits"])
        elif rec["enc"] == "raw":
            bits = 8 * np.dtype(rec["dtype"]).itemsize
        else:
            bits = {"f32": 32, "f16": 16, "u8mm": 8}.get(rec["enc"], 0)
        nnz = int(rec["nnz"]) if rec.get("sparse") else None
        rows.append(
            {
                "name": rec["name"],
                "shape": list(rec["shape"]),
                "encoding": rec["enc"] + (" sparse" if rec.get("sparse") else ""),
                "bits": bits,
                "numel": n,
                "sparsity": None if nnz is None else 1.0 - nnz / max(n, 1),
                "bytes": int(rec["len"]),
                "nbits": int(rec.get("nbits", 0)),
            }
        )
    return rows


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs"
