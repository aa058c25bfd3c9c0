"""Export a model in several formats and measure each file against its source.

Used by the runner's ``export`` stage and by ``pycompress export``. For every format the artifact
is encoded, decoded in memory and (when a test loader is given) evaluated; the evaluation goes
into the manifest, the file is written atomically, and the written file is loaded back and checked
to give the same outputs as what was evaluated, so the reported accuracy is the file's. Each
result row compares the artifact's predictions with the source model's, image by image.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn

from .artifact import decode, encode, load
from .format import write_container

__all__ = ["export_formats", "artifact_paths", "input_shape_of"]

_SUFFIX = {"pcz": ".pcz", "fp16": "-fp16.pcz", "uint8": "-uint8.pcz", "onnx": ".onnx"}


def artifact_paths(base: str, formats: Iterable[str]) -> Dict[str, str]:
    """``{format: path}``: ``base.pcz``, ``base-fp16.pcz``, ``base-uint8.pcz``, ``base.onnx``."""
    return {f: base + _SUFFIX[f] for f in formats}


def input_shape_of(data: Optional[Dict[str, Any]], arch: Dict[str, Any]) -> Optional[List[int]]:
    """[C, H, W] of one input, from the dataset description (None when unknown)."""
    if data and data.get("image_size"):
        return [int(data.get("in_channels", arch["in_channels"]))] + [int(s) for s in data["image_size"]]
    return None


def _eval(model: nn.Module, loader, device) -> Dict[str, Any]:
    from ..train import evaluate

    return evaluate(model, loader, device, predictions=True)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a == b).float().mean()) if a.numel() else 1.0


def export_formats(
    model: nn.Module,
    paths: Dict[str, str],
    *,
    arch: Dict[str, Any],
    data: Optional[Dict[str, Any]] = None,
    source: Optional[Dict[str, Any]] = None,
    loader: Optional[Iterable] = None,
    device: Any = "cpu",
    fold_bn: bool = True,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Write ``model`` in each format of ``paths`` and evaluate each file on ``loader`` (if given).

    Returns {"source": eval of the model or None, "counted_bytes", "counted_bytes_unfolded",
    "fp32_bytes", "artifacts": [{"format", "path", "file_bytes", "payload_bytes", "manifest_bytes",
    "top1", "top5", "loss", "agreement", ...}]}.
    """
    from ..quant import model_size

    device = torch.device(device)
    for fmt, path in paths.items():
        if os.path.exists(path) and not force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    model = model.to(device).eval()
    src = _eval(model, loader, device) if loader is not None else None
    if src is not None:
        log(f"source model: top-1 {src['top1']:.2f}% on {src['samples']} test images")
    size = model_size(model, fold_bn=fold_bn)
    out: Dict[str, Any] = {
        "source": None if src is None else {k: v for k, v in src.items() if k != "predictions"},
        "counted_bytes": int(size["bytes"]),
        "counted_bytes_unfolded": int(model_size(model)["bytes"]),
        "fp32_bytes": int(size["fp32_bytes"]),
        "artifacts": [],
    }
    decoded_pcz: Optional[nn.Module] = None
    for fmt, path in paths.items():
        if fmt == "onnx":
            continue
        manifest, payload = encode(model, arch=arch, encoding=fmt, fold_bn=fold_bn, data=data, source=source)
        art = decode(manifest, payload).to(device)
        row: Dict[str, Any] = {"format": fmt, "path": path}
        if loader is not None:
            ev = _eval(art, loader, device)
            manifest["eval"] = {
                "split": "test",
                "dataset": (data or {}).get("dataset"),
                **{k: ev[k] for k in ("top1", "top5", "loss", "samples")},
            }
            row.update({k: ev[k] for k in ("top1", "top5", "loss", "samples")})
            row["agreement"] = _agreement(ev["predictions"], src["predictions"])
        write_container(path, manifest, payload, force=True)
        loaded = load(path, device=device)
        _check_same(loaded, art, loader, path, device)
        facts = loaded.artifact.facts
        row.update(
            file_bytes=facts["file_bytes"],
            payload_bytes=facts["payload_bytes"],
            manifest_bytes=facts["manifest_bytes"],
            overhead_bytes=facts["overhead_bytes"],
            counted_bits=manifest["size"]["bits"],
            sha256=facts["sha256"],
        )
        out["artifacts"].append(row)
        log(
            f"{fmt}: {path}: {row['file_bytes']:,} bytes"
            + (
                f", top-1 {row['top1']:.2f}%, same prediction as the source on {100 * row['agreement']:.2f}% "
                f"of {row['samples']} images"
                if loader is not None
                else ""
            )
        )
        if fmt == "pcz":
            decoded_pcz = loaded
    if "onnx" in paths:
        from . import onnx as onnx_export

        if decoded_pcz is None:
            manifest, payload = encode(model, arch=arch, encoding="pcz", fold_bn=fold_bn, data=data, source=source)
            decoded_pcz = decode(manifest, payload)
        shape = input_shape_of(data, arch)
        if shape is None:
            raise ValueError("ONNX export needs the input shape; the dataset description does not give image_size")
        path = paths["onnx"]
        facts = onnx_export.export_onnx(decoded_pcz.cpu(), path, shape, force=True)
        row = {"format": "onnx", "path": path, "file_bytes": facts["file_bytes"], "onnx": facts}
        if loader is not None:
            ev = onnx_export.ort_predict(path, loader)
            row.update({k: ev[k] for k in ("top1", "top5", "samples")})
            row["agreement"] = _agreement(ev["predictions"], src["predictions"])
        out["artifacts"].append(row)
        log(
            f"onnx: {path}: {row['file_bytes']:,} bytes"
            + (
                f", ONNX Runtime top-1 {row['top1']:.2f}%, same prediction as the source on "
                f"{100 * row['agreement']:.2f}%"
                if loader is not None
                else ""
            )
        )
    return out


def _check_same(loaded: nn.Module, art: nn.Module, loader, path: str, device) -> None:
    """The written file decodes to the very module that was evaluated (one batch, exact)."""
    x = None
    if loader is not None:
        for batch in loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            break
    if x is None:
        return
    with torch.no_grad():
        a, b = loaded(x[:8].to(device)), art(x[:8].to(device))
    if not torch.equal(a, b):
        raise RuntimeError(f"{path}: the written artifact does not reproduce the evaluated model (internal error)")
