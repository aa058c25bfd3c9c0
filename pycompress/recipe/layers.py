"""What the run did to each layer of the final student: quantized (bits), pruned (sparsity), or left
float and why. ``layer_treatments`` computes the rows (``report.json``'s ``layers``) and
``treatment_lines`` writes them as report.md's "## Layers" section."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["layer_treatments", "treatment_lines"]


def _own_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m._parameters.values() if p is not None)


def layer_treatments(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> List[Dict[str, Any]]:
    """One row per module holding parameters of its own (quantizers excluded), in module order:
    ``{"layer", "type", "params", "weight_bits", "act_bits", "sparsity", "float"}``; ``weight_bits`` /
    ``act_bits`` are set for a quantized layer, ``sparsity`` (fraction of zero weights) for a pruned
    one, ``float`` says why what is float stayed float. ``example_input`` (a batch the model takes)
    finds the conv / linear layers whose forward does not run (see
    :func:`pycompress.quant.qat.unquantizable_layers`)."""
    from ..prune import masked_layers
    from ..quant import QAT_LAYERS, FakeQuantizer, is_qat
    from ..quant.modules import layer_type
    from ..quant.qat import unquantizable_layers

    quantized = is_qat(model)
    left = unquantizable_layers(model, example_input)
    masked = masked_layers(model)
    rows = []
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            continue
        params = _own_params(m)
        if not params:
            continue
        row: Dict[str, Any] = {
            "layer": name or "(model)",
            "type": type(m).__name__,
            "params": params,
            "weight_bits": None,
            "act_bits": None,
            "sparsity": None,
            "float": None,
        }
        if name in masked and isinstance(getattr(m, "weight", None), torch.Tensor):
            w = m.weight.detach()
            row["sparsity"] = 1.0 - int(torch.count_nonzero(w)) / max(w.numel(), 1)
        t = layer_type(m)
        if isinstance(m, QAT_LAYERS):
            row["weight_bits"] = m.weight_quant.bits if m.weight_quant is not None else None
            row["act_bits"] = m.act_quant.bits if m.act_quant is not None else None
            if m.weight_quant is None:
                row["float"] = "float weights (the quantize settings give this layer no weight_bits)"
        elif t is not None:
            if name in left:
                row["float"] = f"left float: {left[name]}"
            elif quantized:
                row["float"] = "not selected by the quantize settings (types / include / exclude / first / last)"
            else:
                row["float"] = "no quantization stage"
        elif isinstance(m, _BatchNorm):
            row["float"] = "BatchNorm: float (folded into the conv / linear before it at export where it can be)"
        elif any(True for _ in m.children()):
            row["float"] = f"left float: parameters held by the {type(m).__name__} itself, not by a layer"
        else:
            row["float"] = (
                f"left float: {type(m).__name__} is not a layer type the engine quantizes or prunes "
                f"(plain nn.Conv2d / nn.Linear)"
            )
        rows.append(row)
    return rows


def _treatment(row: Mapping[str, Any]) -> str:
    parts = []
    if row.get("weight_bits") is not None or row.get("act_bits") is not None:
        wb, ab = row.get("weight_bits"), row.get("act_bits")
        parts.append(
            "quantized: "
            + ", ".join(
                x
                for x in (
                    f"{wb}-bit weights (per channel)" if wb is not None else "",
                    f"{ab}-bit input" if ab is not None else "float input",
                )
                if x
            )
        )
    if row.get("sparsity") is not None:
        parts.append(f"pruned: {100 * row['sparsity']:.1f}% of the weights are 0")
    if row.get("float"):
        parts.append(row["float"] if not parts else row["float"].replace("left float: ", "float: "))
    return "; ".join(parts)


def treatment_lines(layers: Optional[Mapping[str, Any]]) -> List[str]:
    """report.md's "## Layers" section (no lines without ``layers``)."""
    if not layers or not layers.get("rows"):
        return []
    rows = layers["rows"]
    n_q = sum(1 for r in rows if r.get("weight_bits") is not None or r.get("act_bits") is not None)
    n_p = sum(1 for r in rows if r.get("sparsity") is not None)
    lines = [
        "## Layers",
        "",
        f"Every layer with parameters of the final student ({layers.get('stage') or 'student'}): "
        f"{n_q} quantized, {n_p} pruned, {len(rows) - n_q} with float weights or no weights to quantize. "
        "Layers the engine does not know are left float, never quantized.",
        "",
        "| layer | type | parameters | treatment |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['layer']}` | {r['type']} | {r['params']:,} | {_treatment(r)} |")
    lines.append("")
    return lines
