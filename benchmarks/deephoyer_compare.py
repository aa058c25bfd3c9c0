"""DeepHoyer's comparison on data we have: magnitude pruning against the L1, Hoyer and Hoyer-Square
regularizers (each followed by the std-ratio threshold prune and a fine-tune with the zeros fixed), at
matched accuracy: the highest sparsity each reaches at most 1 point below the dense model; with
``--methods group_lasso,group_hs`` also the structured regularizers (Group Lasso, Group-HS), whose
table column gives the filters / rows and channels / columns left alive in each pruned layer.

    python benchmarks/deephoyer_compare.py --recipe recipes/deephoyer_lenet300.yaml --out runs/dh300
    python benchmarks/deephoyer_compare.py --recipe recipes/deephoyer_lenet5.yaml --out runs/dh5

Each method is one ``pycompress sweep`` (``<out>/<method>/``: resumable, re-running continues it)
over the recipe: the recipe's first stage ``hoyer`` trains (with the method's regularizer and
strength, or without one for magnitude pruning), its stage ``prune`` prunes (std-ratio threshold for
the regularizers, global magnitude at the swept sparsity for magnitude pruning) and fine-tunes. The
dense model is the first stage of the magnitude runs (no regularizer). Writes ``<out>/compare.md``
(the table), ``<out>/compare.json`` and ``<out>/compare.png`` (top-1 against sparsity, one curve per
method, the dense top-1 and the 1-point band drawn). Top-1 and sparsity are the final student's
(the report's ``student``: sparsity of the pruned layers' weights) on the test set, as the paper
reports them; the strengths are a fixed grid, not tuned on the test set.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

METHODS = {
    # method: (swept key, values, fixed overrides)
    "magnitude": (
        "prune.prune",
        [{"criterion": "global_magnitude", "sparsity": s} for s in (0.8, 0.9, 0.95, 0.97, 0.98)],
        ["hoyer.prune=null"],
    ),
    "l1": ("hoyer.prune.strength", [1.0e-4, 3.0e-4, 1.0e-3], ["hoyer.prune.regularizer=l1"]),
    "hoyer": ("hoyer.prune.strength", [1.0e-3, 3.0e-3, 1.0e-2], ["hoyer.prune.regularizer=hoyer"]),
    "hoyer_square": ("hoyer.prune.strength", [5.0e-6, 2.0e-5, 5.0e-5], ["hoyer.prune.regularizer=hoyer_square"]),
    # structured: groups (conv filters and input channels, FC rows and columns) driven to zero
    "group_lasso": ("hoyer.prune.strength", [3.0e-4, 1.0e-3, 3.0e-3], ["hoyer.prune.regularizer=group_lasso"]),
    "group_hs": ("hoyer.prune.strength", [1.0e-3, 3.0e-3, 1.0e-2], ["hoyer.prune.regularizer=group_hs"]),
}
ELEMENTWISE = ("magnitude", "l1", "hoyer", "hoyer_square")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default=",".join(ELEMENTWISE), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--fixed", action="append", default=[], help="an override for every run (e.g. hoyer.epochs=4)")
    p.add_argument("--data-root")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    import torch

    from pycompress.sweep import sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    results = {}
    for m in methods:
        key, values, fixed = METHODS[m]
        rows = sweep(
            args.recipe,
            {key: values},
            fixed + args.fixed,
            os.path.join(args.out, m),
            data_root=args.data_root,
            progress=False,
        )
        results[m] = rows
    for m in METHODS:  # methods swept by an earlier call into the same --out
        rows_json = os.path.join(args.out, m, "sweep.json")
        if m not in results and os.path.isfile(rows_json):
            results[m] = json.load(open(rows_json))["rows"]
    results = {m: results[m] for m in METHODS if m in results}
    dense = _dense_top1(args.out) if os.path.isdir(os.path.join(args.out, "magnitude")) else None
    write_comparison(args.out, results, dense)
    return 0


def _dense_top1(out: str):
    """The first stage's (no regularizer) best top-1 in the magnitude runs."""
    vals = []
    root = os.path.join(out, "magnitude")
    for d in sorted(os.listdir(root)):
        rep = os.path.join(root, d, "report.json")
        if os.path.isfile(rep):
            st = json.load(open(rep))["stages"][0]
            vals.append(st.get("best_top1"))
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None  # the same run each time (same seed): equal values


def _structure(out: str, row: dict) -> str:
    """Alive output / input groups of each pruned weight of a run's final model (its last
    sparsity.json): conv filters and input channels, FC rows and columns."""
    run = os.path.join(out, row["method_dir"], row["run_dir"]) if "method_dir" in row else None
    if run is None or not os.path.isdir(os.path.join(run, "stages")):
        return ""
    stages = sorted(d for d in os.listdir(os.path.join(run, "stages")))
    for d in reversed(stages):
        f = os.path.join(run, "stages", d, "sparsity.json")
        if os.path.isfile(f):
            rows = [r for r in json.load(open(f))["rows"] if r.get("selected") and r.get("alive_out") is not None]
            return "; ".join(
                f"{r['name'].rsplit('.', 1)[0]} {r['alive_out']}/{r['total_out']}, {r['alive_in']}/{r['total_in']}"
                for r in rows
            )
    return ""


def write_comparison(out: str, results: dict, dense) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = []
    for m, rows in results.items():
        rows = [dict(r, method_dir=m) for r in rows]
        pts = [
            (r["sparsity"], r["top1"], r) for r in rows if r.get("status") == "done" and r.get("sparsity") is not None
        ]
        ok = [t for t in pts if dense is None or t[1] >= dense - 1.0]
        best = max(ok, key=lambda t: t[0]) if ok else None
        table.append(
            {
                "method": m,
                "runs": len(pts),
                "best_sparsity": None if best is None else best[0],
                "top1": None if best is None else best[1],
                "setting": None if best is None else {k: v for k, v in best[2].items() if "." in k},
                "structure": None if best is None else _structure(out, best[2]),
                "points": [(s, t) for s, t, _ in sorted(pts, key=lambda t: t[0])],
            }
        )
    lines = [
        f"Dense model: {dense:.2f}% top-1; the highest sparsity each method reaches within 1 point of it "
        f"(top-1 >= {dense - 1:.2f}%):"
        if dense is not None
        else "No dense baseline (run the magnitude method).",
        "",
        "| method | runs | sparsity at <= 1 point loss | top-1 (%) | setting | alive filters / rows (out), "
        "channels / columns (in) |",
        "|---|---:|---:|---:|---|---|",
    ]
    for t in table:
        sp = "-" if t["best_sparsity"] is None else f"{100 * t['best_sparsity']:.2f}%"
        top = "-" if t["top1"] is None else f"{t['top1']:.2f}"
        setting = "-" if not t["setting"] else ", ".join(f"{k}={v}" for k, v in t["setting"].items())
        lines.append(f"| {t['method']} | {t['runs']} | {sp} | {top} | {setting} | {t['structure'] or '-'} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump({"dense_top1": dense, "methods": table}, f, indent=1, default=str)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for t in table:
        if t["points"]:
            xs, ys = zip(*t["points"])
            ax.plot([100 * x for x in xs], ys, marker="o", label=t["method"])
    if dense is not None:
        ax.axhline(dense, color="k", lw=0.8, label=f"dense {dense:.2f}%")
        ax.axhspan(dense - 1, dense, color="0.85", zorder=0, label="within 1 point")
    ax.set_xlabel("sparsity of the pruned layers (%)")
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=120)
    plt.close(fig)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
