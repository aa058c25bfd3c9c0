"""Accuracy, metric logs (CSV or JSONL) and loss/accuracy curves (PNG)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Dict, List, Sequence

import torch

from ..utils import atomic_write_bytes, atomic_write_text


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)) -> List[int]:
    """Number of samples whose target is among the top-k logits, for each k (k is capped at the
    number of classes, so top-5 on a 3-class problem counts like top-3)."""
    if logits.dim() != 2:
        raise ValueError(f"topk_correct: logits must be (batch, classes), got shape {tuple(logits.shape)}")
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets.view(-1, 1))
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


class Average:
    """Running sum / count, weighted by batch size."""

    def __init__(self) -> None:
        self.total = 0.0
        self.count = 0

    def add(self, value: float, n: int = 1) -> None:
        self.total += float(value) * n
        self.count += n

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else float("nan")


LOG_FORMATS = ("csv", "jsonl")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else v
    return v


def write_metrics(path: str, rows: Sequence[Dict], fmt: str) -> None:
    """(Re)write the whole metrics log atomically: one row per epoch. Rewriting from the history
    kept in the checkpoint keeps the log consistent with it after a resume."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"metrics log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if fmt == "jsonl":
        atomic_write_text(path, "".join(json.dumps({k: _clean(v) for k, v in r.items()}) + "\n" for r in rows))
        return
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    atomic_write_text(path, buf.getvalue())


def plot_curves(path: str, rows: Sequence[Dict], title: str = "") -> bool:
    """Loss and top-1 curves (train and eval per epoch) as a PNG. Returns False (and writes
    nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    panels = (
        (ax1, "loss", (("train_loss", "train"), ("eval_loss", "eval"))),
        (
            ax2,
            "accuracy (%)",
            (("train_top1", "train top-1"), ("eval_top1", "eval top-1"), ("eval_top5", "eval top-5")),
        ),
    )
    for ax, ylabel, curves in panels:
        for key, label in curves:
            ys = [r.get(key) for r in rows]
            if any(y is not None for y in ys):
                ax.plot(epochs, [math.nan if y is None else y for y in ys], marker="o", label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    save_png(fig, path)
    return True


def save_png(fig, path, dpi=None) -> None:
    """Write a matplotlib figure as PNG, atomically (temp file + rename)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(os.fspath(path), buf.getvalue())
