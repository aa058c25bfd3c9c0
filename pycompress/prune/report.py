"""The sparsity report of SPEC.md section 3 (DeepHoyer's ``print_nonzeros``).

One row per parameter (``model.named_parameters()``; tied parameters once):

    total    = numel(W)
    nonzero  = #{w != 0}
    pruned   = total - nonzero
    density  = nonzero / total            (1.0 for an empty tensor)

and, for tensors with >= 2 dims (conv (out, in, ...) / FC (out, in)):

    alive_out / total_out = #dim-0 slices (filters / FC rows) with any nonzero / W.shape[0]
    alive_in  / total_in  = #dim-1 slices (input channels / FC columns) with any nonzero / W.shape[1]

(None for tensors with fewer dims). Totals over all rows:

    alive = sum nonzero, pruned = sum pruned, total = sum total
    sparsity = pruned / total             (0.0 when total == 0)
    compression_rate = total / alive      (inf when alive == 0 < total, 1.0 when total == 0)

and the same over the ``selected`` rows (the tensors a pruning stage targets), when a selection is
given. Note that a parameter stored dense beside a mask (a shadow weight) is reported as stored:
report the model after the masks are applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
import torch.nn as nn

__all__ = ["TensorRow", "SparsityReport", "sparsity_report"]


@dataclass
class TensorRow:
    """Counts of one tensor (see the module docstring for the definitions)."""

    name: str
    shape: tuple[int, ...]
    total: int
    nonzero: int
    pruned: int
    density: float
    alive_in: Optional[int] = None
    total_in: Optional[int] = None
    alive_out: Optional[int] = None
    total_out: Optional[int] = None
    selected: bool = False

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "total": self.total,
            "nonzero": self.nonzero,
            "pruned": self.pruned,
            "density": self.density,
            "alive_in": self.alive_in,
            "total_in": self.total_in,
            "alive_out": self.alive_out,
            "total_out": self.total_out,
            "selected": self.selected,
        }


def _rate(total: int, alive: int) -> float:
    """total / alive; inf when alive == 0 < total; 1.0 for no elements at all."""
    if total == 0:
        return 1.0
    return total / alive if alive else math.inf


def _fmt_rate(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:.2f}x"


def _json_float(x: Optional[float]) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class SparsityReport:
    """Per-tensor rows plus totals; ``selected_*`` are None when no selection was given."""

    rows: list[TensorRow] = field(default_factory=list)
    total: int = 0
    alive: int = 0
    pruned: int = 0
    sparsity: float = 0.0
    compression_rate: float = 1.0
    selected_total: Optional[int] = None
    selected_alive: Optional[int] = None
    selected_pruned: Optional[int] = None
    selected_sparsity: Optional[float] = None
    selected_compression_rate: Optional[float] = None

    @property
    def has_selection(self) -> bool:
        return self.selected_total is not None

    # ------------------------------------------------------------------------------------ output
    def _footer(self) -> list[str]:
        lines = [
            f"alive: {self.alive}, pruned: {self.pruned}, total: {self.total}, "
            f"compression rate: {_fmt_rate(self.compression_rate)} ({100 * self.sparsity:.2f}% pruned)"
        ]
        if self.has_selection:
            n = sum(r.selected for r in self.rows)
            lines.append(
                f"selected ({n} tensor{'' if n == 1 else 's'}): alive: {self.selected_alive}, "
                f"pruned: {self.selected_pruned}, "
                f"total: {self.selected_total}, compression rate: "
                f"{_fmt_rate(self.selected_compression_rate)} ({100 * self.selected_sparsity:.2f}% pruned)"
            )
        return lines

    def _cells(self) -> tuple[list[str], list[list[str]]]:
        header = ["name", "nonzero / total", "%", "pruned", "shape", "alive in", "alive out"]
        body = []
        for r in self.rows:
            body.append(
                [
                    r.name + (" *" if r.selected else ""),
                    f"{r.nonzero} / {r.total}",
                    f"{100 * r.density:.2f}%",
                    str(r.pruned),
                    str(tuple(r.shape)),
                    f"{r.alive_in}/{r.total_in}" if r.alive_in is not None else "-",
                    f"{r.alive_out}/{r.total_out}" if r.alive_out is not None else "-",
                ]
            )
        return header, body

    def format(self) -> str:
        """A fixed-width text table (one line per tensor, selected tensors marked ``*``) and the footer:

        ``alive: A, pruned: P, total: T, compression rate: X.XXx (Y.YY% pruned)``, then one such
        line for the selected tensors when a selection exists.
        """
        header, body = self._cells()
        widths = [max(len(row[i]) for row in [header] + body) for i in range(len(header))]
        left = {0, 4}  # name and shape left-aligned, numbers right-aligned

        def line(cells: list[str]) -> str:
            return " | ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [line(header), "-+-".join("-" * w for w in widths)]
        out += [line(row) for row in body]
        out += self._footer()
        return "\n".join(out)

    def __str__(self) -> str:
        return self.format()

    def to_markdown(self) -> str:
        """A markdown table (selected tensors marked ``*``) followed by the footer lines."""
        header, body = self._cells()

        def esc(s: str) -> str:
            return s.replace("|", "\\|")

        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * 3 + ["---"] + ["---:"] * 2) + "|"]
        out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
        out.append("")
        out += [ln + "  " for ln in self._footer()]
        return "\n".join(out).rstrip() + "\n"

    def to_dict(self) -> dict:
        """JSON-serialisable: ints, floats, lists, bools and None (an infinite rate is None)."""
        return {
            "rows": [r.to_dict() for r in self.rows],
            "total": self.total,
            "alive": self.alive,
            "pruned": self.pruned,
            "sparsity": self.sparsity,
            "compression_rate": _json_float(self.compression_rate),
            "selected": None
            if not self.has_selection
            else {
                "names": [r.name for r in self.rows if r.selected],
                "total": self.selected_total,
                "alive": self.selected_alive,
                "pruned": self.selected_pruned,
                "sparsity": self.selected_sparsity,
                "compression_rate": _json_float(self.selected_compression_rate),
            },
        }


@torch.no_grad()
def _row(name: str, t: torch.Tensor) -> TensorRow:
    total = t.numel()
    nz = t.detach() != 0
    nonzero = int(torch.count_nonzero(nz).item()) if total else 0
    row = TensorRow(
        name=name,
        shape=tuple(int(s) for s in t.shape),
        total=total,
        nonzero=nonzero,
        pruned=total - nonzero,
        density=nonzero / total if total else 1.0,
    )
    if t.dim() >= 2:
        row.total_out = int(t.shape[0])
        row.total_in = int(t.shape[1])
        row.alive_out = int(nz.flatten(1).any(dim=1).sum().item()) if total else 0
        row.alive_in = int(nz.transpose(0, 1).flatten(1).any(dim=1).sum().item()) if total else 0
    return row


def sparsity_report(
    model: nn.Module, selected: Optional[Iterable[str]] = None, params_only: bool = True
) -> SparsityReport:
    """Count the zeros of every parameter of ``model`` (see the module docstring).

    ``selected``: parameter names (e.g. the conv weights a pruning stage targets) whose rows are
    flagged and totalled separately; a name that is not a reported tensor raises ValueError.
    ``params_only=False`` also reports the floating-point buffers (``named_buffers``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    tensors: list[tuple[str, torch.Tensor]] = list(model.named_parameters())
    if not params_only:
        tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    names = [n for n, _ in tensors]
    if selected is None:
        chosen = None
    else:
        if isinstance(selected, str):
            raise TypeError(f"selected must be an iterable of names, not a single str ({selected!r})")
        chosen = set()
        for s in selected:
            if not isinstance(s, str):
                raise TypeError(f"selected: names must be str, got {s!r} ({type(s).__name__})")
            chosen.add(s)
        unknown = sorted(chosen - set(names))
        if unknown:
            kind = "parameters" if params_only else "parameters or floating-point buffers"
            raise ValueError(f"selected: {unknown} are not {kind} of the model")

    rows = []
    for name, t in tensors:
        row = _row(name, t)
        row.selected = chosen is not None and name in chosen
        rows.append(row)

    total = sum(r.total for r in rows)
    alive = sum(r.nonzero for r in rows)
    rep = SparsityReport(
        rows=rows,
        total=total,
        alive=alive,
        pruned=total - alive,
        sparsity=(total - alive) / total if total else 0.0,
        compression_rate=_rate(total, alive),
    )
    if chosen is not None:
        s_total = sum(r.total for r in rows if r.selected)
        s_alive = sum(r.nonzero for r in rows if r.selected)
        rep.selected_total = s_total
        rep.selected_alive = s_alive
        rep.selected_pruned = s_total - s_alive
        rep.selected_sparsity = (s_total - s_alive) / s_total if s_total else 0.0
        rep.selected_compression_rate = _rate(s_total, s_alive)
    return rep
