"""`pycompress bench data RECIPE`: images per second of a recipe's training loader alone.

The loader is the one ``pycompress run`` builds (the recipe's dataset, augmentation, batch size,
shuffling and workers; pinned memory when the device is CUDA), iterated without a model: after a
few warm-up batches (worker start-up, file caches), the batches of one or more passes are timed,
including the host-to-device copy when the device is CUDA. Compare the result with the training
step's images/s (``pycompress bench step``): a loader slower than the step starves it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, List, Optional, Sequence

import torch

from ..recipe.schema import Recipe

__all__ = ["Row", "run", "format_table"]


@dataclasses.dataclass
class Row:
    dataset: str
    workers: int
    batch: int
    batches: int  # timed batches per repeat
    ms_per_batch: float  # median over the repeats
    images_per_s: float
    pin_memory: bool
    device: str


def run(
    recipe: Recipe,
    *,
    workers: Optional[Sequence[int]] = None,
    batches: int = 20,
    repeats: int = 3,
    warmup: int = 2,
    batch: Optional[int] = None,
    device: Optional[str] = None,
    data_root: Optional[str] = None,
    printer: Optional[Callable[[str], None]] = None,
) -> List[Row]:
    """Time the recipe's training loader for each worker count in ``workers`` (default: the
    recipe's ``data.num_workers``)."""
    from ..data import build_dataset, make_loader

    for key, v, low in (("batches", batches, 1), ("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {v!r}")
    d = recipe.data
    names = list(workers) if workers else [d.num_workers]
    if any(isinstance(w, bool) or not isinstance(w, int) or w < 0 for w in names):
        raise ValueError(f"workers must be integers >= 0, got {names}")
    dev = device or recipe.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    device_t = torch.device(dev)
    train_set, _ = build_dataset(d.dataset, "train", data_root=data_root, augment=d.augment, **d.options)
    bs = batch or d.batch_size
    pin = device_t.type == "cuda"
    rows = []
    for w in names:
        loader = make_loader(
            train_set,
            bs,
            shuffle=True,
            seed=recipe.seed,
            num_workers=w,
            drop_last=len(train_set) > bs,
            pin_memory=pin,
            persistent_workers=True,
        )
        times, it = [], None

        def next_batch():
            nonlocal it
            for _ in range(2):  # a new pass when the previous one is exhausted
                if it is None:
                    it = iter(loader)
                try:
                    return next(it)
                except StopIteration:
                    it = None
            raise ValueError(f"the training set of {d.dataset!r} gives no batch of {bs}")

        def fetch():
            x, y = next_batch()[:2]
            if device_t.type == "cuda":
                x = x.to(device_t, non_blocking=True)
                y = y.to(device_t, non_blocking=True)
                torch.cuda.synchronize(device_t)

        for _ in range(warmup):
            fetch()
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(batches):
                fetch()
            times.append((time.perf_counter() - t0) / batches * 1e3)
        it = None
        med = statistics.median(times)
        row = Row(d.dataset, w, bs, batches, med, bs / (med / 1e3), pin, str(device_t))
        if printer:
            printer(f"{d.dataset}: {w} workers: {med:.2f} ms/batch, {row.images_per_s:.0f} images/s")
        rows.append(row)
    return rows


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| dataset | workers | batch | ms / batch | images/s | pinned | device |",
        "|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.dataset} | {r.workers} | {r.batch} | {r.ms_per_batch:.2f} | {r.images_per_s:.0f} | "
            f"{'yes' if r.pin_memory else 'no'} | {r.device} |"
        )
    return "\n".join(lines)
