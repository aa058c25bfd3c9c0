"""`pycompress plot pareto RUN_DIR... [--sweep DIR ...] -o FILE.png`: top-1 against the bytes of the
file a user ships, for finished runs and sweeps, with reference models drawn as markers.

Points:

* a run directory (``pycompress run --out DIR``): its ``report.json``'s final student, ``top1`` and
  ``file_bytes`` (the artifact's real size where the run exported one, else the counted
  ``size_bytes``), labelled with the recipe name (or ``--label``);
* a sweep directory (``pycompress sweep --out DIR``): every finished row of its ``sweep.json``
  (``top1``, ``size_bytes``), one series per sweep.

Reference markers (``--no-reference`` leaves them out): the models of the benchmark table in
Fashion-MNIST's README (``/usr/share/doc/dataset-fashion-mnist/README.md.gz``, the Debian package)
that state a parameter count, at their published test accuracy and the bytes of their parameters
in fp32 (4 bytes each; "<100K" counted as 100K). They are only meaningful next to Fashion-MNIST
runs; the plot says so in its title.

The frontier drawn (a step line) is the Pareto front of the run and sweep points: the points no other
point beats on both top-1 and bytes. ``--json FILE`` writes the points and the front.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

__all__ = ["FASHION_MNIST_REFERENCE", "collect_points", "pareto_front", "plot_pareto", "add_arguments", "cli_main"]

# (model as the table names it, parameters, test accuracy %): rows of the benchmark table in
# Fashion-MNIST's README that give a parameter count.
FASHION_MNIST_REFERENCE = [
    ("2 Conv <100K parameters", 100_000, 92.5),
    ("2 Conv ~113K parameters", 113_000, 92.2),
    ("2 Conv+3 FC ~500K parameters", 500_000, 93.4),
    ("2 Conv+3 FC ~1.8M parameters", 1_800_000, 93.2),
    ("Capsule Network 8M parameters", 8_000_000, 93.6),
    ("VGG16 26M parameters", 26_000_000, 93.5),
]


class PlotError(ValueError):
    """A directory that holds no finished run or sweep."""


def collect_points(runs: Sequence[str] = (), sweeps: Sequence[str] = (), labels: Sequence[str] = ()) -> List[dict]:
    """The points of finished runs and sweep rows: ``{"series", "label", "top1", "bytes", "source"}``."""
    points: List[dict] = []
    for i, d in enumerate(runs):
        path = os.path.join(d, "report.json")
        if not os.path.isfile(path):
            raise PlotError(f"{d}: no report.json (not a finished run directory of pycompress run)")
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
        s = rep.get("student") or {}
        size = s.get("file_bytes") or s.get("size_bytes")
        if s.get("top1") is None or not size:
            raise PlotError(f"{path}: the report has no final student top-1 and size")
        label = labels[i] if i < len(labels) else rep.get("recipe") or os.path.basename(os.path.normpath(d))
        points.append({"series": "runs", "label": label, "top1": float(s["top1"]), "bytes": int(size), "source": d})
    for d in sweeps:
        path = os.path.join(d, "sweep.json")
        if not os.path.isfile(path):
            raise PlotError(f"{d}: no sweep.json (not a directory of pycompress sweep)")
        with open(path, encoding="utf-8") as f:
            rows = json.load(f).get("rows") or []
        name = os.path.basename(os.path.normpath(d))
        n = 0
        for r in rows:
            if r.get("status") == "done" and r.get("top1") is not None and r.get("size_bytes"):
                points.append(
                    {
                        "series": f"sweep {name}",
                        "label": r.get("run_dir", ""),
                        "top1": float(r["top1"]),
                        "bytes": int(r["size_bytes"]),
                        "source": os.path.join(d, r.get("run_dir", "")),
                    }
                )
                n += 1
        if n == 0:
            raise PlotError(f"{path}: no finished run with a top-1 and a size")
    return points


def pareto_front(points: Sequence[dict]) -> List[dict]:
    """The points that no other point beats on both bytes (fewer) and top-1 (higher), by bytes."""
    front: List[dict] = []
    best = -float("inf")
    for p in sorted(points, key=lambda p: (p["bytes"], -p["top1"])):
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def plot_pareto(points: Sequence[dict], path: str, reference: bool = True, title: Optional[str] = None) -> List[dict]:
    """Write the PNG; returns the front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(points)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: Dict[str, List[dict]] = {}
    for p in points:
        series.setdefault(p["series"], []).append(p)
    for name, ps in series.items():
        ax.scatter([p["bytes"] for p in ps], [p["top1"] for p in ps], s=28, label=name, zorder=3)
        if name == "runs":
            for p in ps:
                ax.annotate(p["label"], (p["bytes"], p["top1"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    if front:
        ax.step([p["bytes"] for p in front], [p["top1"] for p in front], where="post", color="0.3", lw=1, label="front")
    if reference:
        for name, params, top1 in FASHION_MNIST_REFERENCE:
            ax.scatter([params * 4], [top1], marker="x", color="k", s=30, zorder=3)
            ax.annotate(name, (params * 4, top1), fontsize=6, xytext=(4, -8), textcoords="offset points")
        ax.scatter([], [], marker="x", color="k", label="Fashion-MNIST table (fp32 bytes)")
    ax.set_xscale("log")
    ax.set_xlabel("bytes of the shipped file (log scale)")
    ax.set_ylabel("top-1 on the test set (%)")
    ax.set_title(title or ("top-1 against bytes" + (" (reference rows: Fashion-MNIST)" if reference else "")))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    from .train.metrics import save_png

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_png(fig, path, dpi=130)
    plt.close(fig)
    return front


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="plot_kind", metavar="KIND")
    pa = sub.add_parser("pareto", help="top-1 against the shipped file's bytes of runs and sweeps (PNG)")
    pa.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run directories (pycompress run --out)")
    pa.add_argument("--sweep", action="append", default=[], metavar="DIR", help="a sweep directory (repeatable)")
    pa.add_argument("--label", action="append", default=[], help="a label per RUN_DIR, in order")
    pa.add_argument("-o", "--out", default="pareto.png", help="the PNG (default pareto.png)")
    pa.add_argument("--no-reference", action="store_true", help="leave out the Fashion-MNIST table's models")
    pa.add_argument("--title")
    pa.add_argument("--json", metavar="FILE", help="also write the points and the front as JSON")
    return p


def cli_main(args: argparse.Namespace) -> int:
    if getattr(args, "plot_kind", None) != "pareto":
        print("pycompress plot: name a kind: pycompress plot pareto RUN_DIR ...", file=sys.stderr)
        return 2
    if not args.runs and not args.sweep:
        print("pycompress plot pareto: give at least one RUN_DIR or --sweep DIR", file=sys.stderr)
        return 2
    try:
        points = collect_points(args.runs, args.sweep, args.label)
    except PlotError as exc:
        print(f"pycompress plot pareto: error: {exc}", file=sys.stderr)
        return 2
    front = plot_pareto(points, args.out, reference=not args.no_reference, title=args.title)
    for p in sorted(points, key=lambda p: p["bytes"]):
        mark = "*" if p in front else " "
        print(f"{mark} {p['bytes']:>12,} bytes  {p['top1']:6.2f}%  {p['series']}: {p['label']}")
    print(f"wrote {args.out} ({len(points)} points, {len(front)} on the front marked *)")
    if args.json:
        from .utils import atomic_write_text

        atomic_write_text(args.json, json.dumps({"points": points, "front": front}, indent=1) + "\n")
    return 0
