"""`pycompress sweep RECIPE --set KEY=V1,V2,... [--set ...]`: run one recipe over a grid of settings,
then tabulate and plot the results.

Grid. Each ``--set KEY=V1,V2,...`` names one swept key (a ``pycompress run --set`` key: a top-level
key or ``STAGE.key.sub``) and its values. The value list is split on the commas that are outside
brackets, braces and quotes, so ``--set hoyer.prune.strength=1.0e-5,2.0e-5``,
``--set model.args.widths=[8, 16],[16, 32]`` and ``--set name='a,b',c`` are two values each; an empty
item (``1,,2``), an unbalanced bracket or quote, a value given twice and a key given twice are errors.
Each value is parsed as YAML, exactly as ``--set`` parses it (``3`` an integer, ``0.5`` a number,
``true`` a boolean, ``[1, 2]`` a list; note that YAML reads ``1e-5`` without a dot as a string, so
write ``1.0e-5``). ``--fixed KEY=VALUE`` (repeatable, never split) applies to every run; a key may
not be both swept and fixed. Every run's overrides are the fixed ones followed by its swept ones.

Runs. The runs are the cartesian product of the value lists, in a stable order: the first ``--set``
key varies slowest, values in the order given (``itertools.product``). Run ``i`` (from 0) goes to
``<out>/<i:03d>-<slug>``, the slug made of its settings (``key=value`` joined by ``_``; the key is
its last component unless two swept keys share it; each run of characters other than
``A-Za-z0-9._=+-`` becomes one ``_``; at most 60 characters). ``--out`` defaults to ``runs/sweep-<recipe name>``.

Before anything runs, every combination is validated (the recipe loaded with its overrides, and
the device and kernel backend it would use checked): a bad value fails the whole sweep with a
:class:`~pycompress.recipe.RecipeError` naming the setting (``--set KEY=VALUE`` when that value
alone breaks the recipe, else the run's whole combination). ``<out>/sweep.json`` records the recipe
file (its real path), the grid and the fixed settings; a sweep into a directory whose
``sweep.json`` records other ones, or into a non-empty directory without one, is refused
(:class:`SweepError`), as is a run directory whose ``recipe.yaml`` differs from the recipe its
settings resolve to now (the recipe file was edited). Re-running the same command therefore
continues the sweep: a finished run (``run.json`` has ``"finished"`` and ``report.json`` is there)
is not run again, its report is reused; an interrupted one (a ``run.json`` without
``"finished"``, a failed run included) is resumed (``run_recipe(..., resume=True)``); the others
start fresh. ``--dry-run`` validates all this, prints each run's index, state (new, interrupted,
finished), directory and settings, and writes nothing.

Results. One row per run that has an outcome, in grid order: ``index``, ``run_dir`` (relative to
``<out>``), each swept key's value, and from the report's final student ``top1``, ``top5`` (%),
``params``, ``size_bytes`` (``student.size_bytes``: the artifact file where the recipe exports,
else the counted size), ``sparsity`` (``student.sparsity.selected``, a fraction of the pruned
layers' weights; empty when nothing was pruned), ``compression`` (fp32 bytes / size_bytes),
``seconds`` (the report's ``total_seconds``, stage time summed over sessions; for a failed run the
wall time of the failed attempt) and ``status`` (``done`` or ``failed: <message>``).
``<out>/sweep.csv`` and ``<out>/sweep.json`` (the rows under ``"rows"``) are rewritten atomically
before the first run (the runs already finished) and after every run, so a sweep that crashes
leaves the rows of the finished runs. At the end ``<out>/sweep.md`` gets the rows as a markdown
table and ``<out>/sweep.png`` a plot of ``--y`` against ``--x``: one curve (marker and line, points
sorted by x) per value of the ``--group`` key over the finished runs. Axes are any of the metrics
``top1``, ``top5``, ``params``, ``size_bytes``, ``sparsity`` (plotted in percent), ``compression``,
``seconds``, or a swept key with numeric values; the defaults are x = ``sparsity`` when some
finished run reports one, else ``size_bytes``; y = ``top1``; group = the first swept key.

A run that raises (``RunError``, ``TrainingDiverged``, any exception from ``run_recipe``) becomes a
``failed: <message>`` row and the sweep goes on. ``cli_main`` returns 0 when every run finished, 1
when some run failed, 2 for bad arguments (an invalid grid, a RecipeError, a refused output
directory) before anything ran.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import yaml

__all__ = [
    "SweepError",
    "METRICS",
    "split_values",
    "parse_set",
    "parse_grid",
    "plan_sweep",
    "sweep",
    "format_markdown",
    "plot_sweep",
    "add_arguments",
    "cli_main",
]

SWEEP_FORMAT = "pycompress-sweep"
#: metric columns of a row, in table order, with their axis labels
METRICS: Dict[str, str] = {
    "top1": "top-1 (%)",
    "val_top1": "validation top-1 (%)",  # what to choose settings on, with data.validation
    "top5": "top-5 (%)",
    "params": "parameters",
    "size_bytes": "size (bytes)",
    "sparsity": "sparsity of the pruned layers (%)",
    "compression": "compression (x smaller than fp32)",
    "seconds": "time (s)",
}
_ROW_FIXED = ("index", "run_dir")
_SLUG_MAX = 60
_SLUG_BAD = re.compile(r"[^A-Za-z0-9._=+-]+")


class SweepError(ValueError):
    """The sweep cannot start: a malformed grid, bad plot axes, or an output directory that holds
    something else."""


# ------------------------------------------------------------------------------------ parsing
def split_values(text: str) -> List[str]:
    """Split a ``--set`` value list on its top-level commas: ``"1,[2, 3],{a: 1, b: 2},'x,y'"`` ->
    ``["1", "[2, 3]", "{a: 1, b: 2}", "'x,y'"]`` (items stripped). Commas inside ``[]``, ``{}`` and
    quotes (a quote that starts a value or a flow item) do not split. SweepError for an empty item,
    an unbalanced bracket or an unclosed quote."""
    items: List[str] = []
    depth: List[str] = []
    quote: Optional[str] = None
    cur: List[str] = []
    pairs = {"[": "]", "{": "}"}
    escaped = False
    for ch in text:
        if quote is not None:
            cur.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
            continue
        last = next((c for c in reversed(cur) if not c.isspace()), None)
        if ch in ("'", '"') and (last is None or last in "[{,:"):  # a quote opens a scalar, as in YAML
            quote = ch
        elif ch in pairs:
            depth.append(pairs[ch])
        elif ch in ("]", "}"):
            if not depth or depth[-1] != ch:
                raise SweepError(f"{text!r}: unbalanced {ch!r}")
            depth.pop()
        elif ch == "," and not depth:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote is not None:
        raise SweepError(f"{text!r}: unclosed quote {quote}")
    if depth:
        raise SweepError(f"{text!r}: unclosed {'[' if depth[-1] == ']' else '{'}")
    items.append("".join(cur).strip())
    for i, item in enumerate(items):
        if not item:
            raise SweepError(f"{text!r}: value {i + 1} is empty (write null for a null value)")
    return items


def _norm_key(key: str, what: str, full: str) -> str:
    parts = [k.strip() for k in key.split(".")]
    if not all(parts):
        raise SweepError(f"{what} {full!r}: empty key in {key!r}")
    return ".".join(parts)


def parse_set(text: str) -> Tuple[str, List[Any]]:
    """``"KEY=V1,V2,..."`` -> ``(KEY, [parsed V1, parsed V2, ...])``, values split by
    :func:`split_values` and parsed as YAML. SweepError for a malformed item or a repeated value."""
    if "=" not in text:
        raise SweepError(f"--set {text!r}: expected KEY=V1,V2,..., e.g. hoyer.prune.strength=1.0e-5,2.0e-5")
    key, _, raw = text.partition("=")
    key = _norm_key(key, "--set", text)
    try:
        items = split_values(raw)
    except SweepError as exc:
        raise SweepError(f"--set {text!r}: {exc}") from None
    values = []
    for item in items:
        try:
            values.append(yaml.safe_load(item))
        except yaml.YAMLError as exc:
            raise SweepError(f"--set {text!r}: the value {item!r} is not valid YAML: {exc}") from None
    _check_unique(key, values)
    return key, values


def parse_grid(sets: Iterable[str]) -> Dict[str, List[Any]]:
    """Several ``--set KEY=V1,V2,...`` -> the grid ``{KEY: [values]}`` (in the order given)."""
    grid: Dict[str, List[Any]] = {}
    for text in sets or ():
        key, values = parse_set(text)
        if key in grid:
            raise SweepError(f"--set {key}=... is given twice; list all its values in one --set {key}=V1,V2,...")
        grid[key] = values
    return grid


def _check_unique(key: str, values: Sequence[Any]) -> None:
    seen: List[str] = []
    for v in values:
        t = _yaml_text(v)
        if t in seen:
            raise SweepError(f"--set {key}: the value {_show(v)} is listed twice")
        seen.append(t)


def _yaml_text(v: Any) -> str:
    """``v`` as a one-line YAML value that ``yaml.safe_load`` reads back as ``v`` (what the run's
    ``--set`` override gets)."""
    s = yaml.safe_dump(v, default_flow_style=True, width=1 << 30, sort_keys=False, allow_unicode=True)
    if s.endswith("\n...\n"):
        s = s[: -len("\n...\n")]
    return s.strip()


def _show(v: Any) -> str:
    """A value as shown in slugs, tables and CSV files: strings as they are, floats by repr."""
    if isinstance(v, str):
        return v
    if isinstance(v, float):
        return repr(v)
    return _yaml_text(v)


def _fixed_key(ov: str) -> str:
    if "=" not in ov:
        raise SweepError(f"--fixed {ov!r}: expected KEY=VALUE, e.g. hoyer.epochs=2")
    return _norm_key(ov.partition("=")[0], "--fixed", ov)


# ------------------------------------------------------------------------------------ the plan
def _short_names(keys: Sequence[str]) -> Dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _slug(settings: Dict[str, Any], short: Dict[str, str]) -> str:
    text = "_".join(f"{short[k]}={_show(v)}" for k, v in settings.items())
    text = _SLUG_BAD.sub("_", text)[:_SLUG_MAX].rstrip("_.-")
    return text or "run"


def _setting_text(settings: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in settings.items())


def _run_state(run_dir: str) -> str:
    """``finished`` (run.json says so and report.json is there), ``interrupted`` (a run.json
    without ``finished``) or ``new``."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.isfile(path):
        return "new"
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return "interrupted"
    if state.get("finished") and os.path.isfile(os.path.join(run_dir, "report.json")):
        return "finished"
    return "interrupted"


class SweepPlan:
    """A validated sweep: the recipe, the grid, and per run its index, settings, overrides,
    validated :class:`~pycompress.recipe.Recipe` and directory."""

    def __init__(self, recipe_path: str, grid: Dict[str, List[Any]], fixed: List[str], out: str, runs: List[dict]):
        self.recipe_path = recipe_path
        self.grid = grid
        self.fixed = fixed
        self.out = out
        self.runs = runs

    @property
    def keys(self) -> List[str]:
        return list(self.grid)

    def grid_text(self) -> str:
        return _grid_text({k: [_show(v) for v in vs] for k, vs in self.grid.items()})

    def record(self) -> Dict[str, Any]:
        """What sweep.json records of the plan (compared when a sweep is re-run)."""
        return {
            "format": SWEEP_FORMAT,
            "recipe": os.path.realpath(self.recipe_path),
            "grid": {k: [_yaml_text(v) for v in vs] for k, vs in self.grid.items()},
            "fixed": list(self.fixed),
            "runs": [
                {"index": r["index"], "run_dir": r["run_dir"], "settings": _jsonable(r["settings"])} for r in self.runs
            ],
        }


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def _grid_text(grid: Dict[str, List[str]]) -> str:
    return "; ".join(f"{k}={','.join(vs)}" for k, vs in grid.items()) or "(empty)"


def _culprit(raw, fixed: List[str], settings: Dict[str, Any], path: str) -> Optional[str]:
    """The one setting of a failing combination that breaks the recipe on its own (the recipe
    with only the fixed overrides being valid), else None."""
    from .recipe import RecipeError, apply_overrides, validate

    try:
        validate(apply_overrides(raw, fixed, file=path), file=path)
    except RecipeError:
        return None
    bad = []
    for k, v in settings.items():
        try:
            validate(apply_overrides(raw, list(fixed) + [f"{k}={_yaml_text(v)}"], file=path), file=path)
        except RecipeError:
            bad.append(k)
    return bad[0] if len(bad) == 1 else None


def plan_sweep(
    recipe_path: str,
    grid: Dict[str, List[Any]],
    fixed: Sequence[str] = (),
    out_dir: Optional[str] = None,
    *,
    device: Optional[str] = None,
    backend: Optional[str] = None,
) -> SweepPlan:
    """Validate every combination of ``grid`` (see the module docstring) and lay out the runs.
    ``device`` / ``backend``: what the runs will be given (checked to be available here). Raises
    RecipeError (a bad value, naming the setting) or SweepError; writes nothing."""
    import torch

    from . import backends
    from .recipe import RecipeError, apply_overrides, load_recipe_dict, validate

    recipe_path = os.fspath(recipe_path)
    if not grid:
        raise SweepError("nothing to sweep: give at least one --set KEY=V1,V2,...")
    g: Dict[str, List[Any]] = {}
    for key, values in grid.items():
        k = _norm_key(str(key), "--set", str(key))
        if k in g:
            raise SweepError(f"--set {k}=... is given twice")
        values = list(values)
        if not values:
            raise SweepError(f"--set {k}: no values")
        _check_unique(k, values)
        g[k] = values
    fixed = [str(f) for f in fixed or ()]
    for f in fixed:
        fk = _fixed_key(f)
        if fk in g:
            raise SweepError(f"{fk!r} is both swept (--set) and fixed (--fixed {f!r}); keep one")
    for k in g:
        if k in METRICS or k in _ROW_FIXED or k == "status":
            raise SweepError(f"--set {k}: the name clashes with a result column")
    raw = load_recipe_dict(recipe_path)
    keys = list(g)
    short = _short_names(keys)
    runs: List[dict] = []
    for index, combo in enumerate(itertools.product(*(g[k] for k in keys))):
        settings = dict(zip(keys, combo))
        overrides = fixed + [f"{k}={_yaml_text(v)}" for k, v in settings.items()]
        try:
            recipe = validate(apply_overrides(raw, overrides, file=recipe_path), file=recipe_path)
        except RecipeError as exc:
            bad = _culprit(raw, fixed, settings, recipe_path)
            what = (
                f"--set {bad}={_show(settings[bad])}"
                if bad
                else f"run {index:03d} ({_setting_text(settings)})"
                + (f" with --fixed {' '.join(fixed)}" if fixed else "")
            )
            raise RecipeError(f"{what} is invalid: {exc}") from None
        dev = device or recipe.device
        if dev == "cuda" and not torch.cuda.is_available():
            raise SweepError(
                f"run {index:03d} ({_setting_text(settings)}): device 'cuda' but no CUDA device is available "
                "(use --device cpu)"
            )
        be = backend or recipe.kernel_backend
        if be != "auto" and backends.status(be) is not None:
            raise SweepError(
                f"run {index:03d} ({_setting_text(settings)}): kernel backend {be!r} is not available here: "
                f"{backends.status(be)}"
            )
        runs.append(
            {
                "index": index,
                "settings": settings,
                "overrides": overrides,
                "recipe": recipe,
                "run_dir": f"{index:03d}-{_slug(settings, short)}",
            }
        )
    out = os.fspath(out_dir) if out_dir else os.path.join("runs", f"sweep-{runs[0]['recipe'].name}")
    return SweepPlan(recipe_path, g, fixed, out, runs)


def _check_out(plan: SweepPlan) -> None:
    """Refuse an output directory that holds another sweep, or something that is not a sweep, or
    runs made from another recipe; adopt the run directories a matching sweep.json records."""
    from .recipe import dump_recipe
    from .recipe.runner import _diff  # the runner's own "what changed" list for resumes

    out = plan.out
    path = os.path.join(out, "sweep.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
        except (OSError, ValueError) as exc:
            raise SweepError(f"{path} cannot be read ({exc}); choose another --out") from None
        now = plan.record()
        same_grid = _same_values(before.get("grid") or {}, plan.grid)
        problems = []
        if before.get("recipe") != now["recipe"]:
            problems.append(f"recipe {before.get('recipe')} -> {now['recipe']}")
        if not same_grid:
            problems.append(f"grid {_grid_text(before.get('grid') or {})} -> {_grid_text(now['grid'])}")
        if list(before.get("fixed") or []) != now["fixed"]:
            problems.append(f"fixed {before.get('fixed') or []} -> {now['fixed']}")
        if problems:
            raise SweepError(
                f"{out} holds another sweep ({'; '.join(problems)}). Re-run with the same recipe, --set and "
                "--fixed options to continue it, or choose another --out"
            )
        dirs = [r.get("run_dir") for r in before.get("runs") or []]
        if len(dirs) == len(plan.runs) and all(isinstance(d, str) and d for d in dirs):
            for r, d in zip(plan.runs, dirs):
                r["run_dir"] = d
    elif os.path.isdir(out) and os.listdir(out):
        raise SweepError(f"{out} is not empty and holds no sweep.json (not a sweep directory); choose another --out")
    for r in plan.runs:
        saved = os.path.join(out, r["run_dir"], "recipe.yaml")
        if not os.path.isfile(saved):
            continue
        with open(saved, encoding="utf-8") as f:
            was = yaml.safe_load(f)
        diff = _diff(was, yaml.safe_load(dump_recipe(r["recipe"])))
        if diff:
            raise SweepError(
                f"{os.path.join(out, r['run_dir'])} was run from another recipe than {_setting_text(r['settings'])} "
                f"resolves to now ({'; '.join(diff[:5])}): was {plan.recipe_path} edited? Restore it, or choose "
                "another --out"
            )


def _same_values(before: Dict[str, List[str]], grid: Dict[str, List[Any]]) -> bool:
    """The recorded grid (YAML texts) holds the same keys and values, in the same order."""
    if list(before) != list(grid):
        return False
    try:
        return all([yaml.safe_load(t) for t in before[k]] == list(grid[k]) for k in grid)
    except (yaml.YAMLError, TypeError):
        return False


# ------------------------------------------------------------------------------------ rows
def _row(plan: SweepPlan, run: dict, report: Optional[dict], status: str, seconds: Optional[float]) -> dict:
    row: Dict[str, Any] = {"index": run["index"], "run_dir": run["run_dir"]}
    row.update(run["settings"])
    s = (report or {}).get("student") or {}
    sp = s.get("sparsity") or {}
    row.update(
        {
            "top1": s.get("top1"),
            "val_top1": s.get("val_top1"),
            "top5": s.get("top5"),
            "params": s.get("params"),
            "size_bytes": s.get("size_bytes"),
            "sparsity": sp.get("selected"),
            "compression": s.get("compression"),
            "seconds": report.get("total_seconds") if report else seconds,
            "status": status,
        }
    )
    return row


def _columns(keys: Sequence[str]) -> List[str]:
    return list(_ROW_FIXED) + list(keys) + list(METRICS) + ["status"]


def _csv_text(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return _show(v)


def _write_tables(plan: SweepPlan, rows: List[dict]) -> None:
    from .utils import atomic_write_text

    cols = _columns(plan.keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow([_csv_text(r.get(c)) for c in cols])
    atomic_write_text(os.path.join(plan.out, "sweep.csv"), buf.getvalue())
    doc = dict(plan.record(), rows=_jsonable(rows))
    atomic_write_text(os.path.join(plan.out, "sweep.json"), json.dumps(doc, indent=1, default=str) + "\n")


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def format_markdown(rows: Sequence[dict], keys: Sequence[str]) -> str:
    """The rows as a markdown table (sparsity in percent)."""
    head = ["#", "run"] + list(keys) + ["top-1 (%)", "val top-1 (%)", "top-5 (%)", "params", "size (bytes)"]
    head += ["sparsity", "compression", "time (s)", "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r.get("sparsity")
        cells = [str(r["index"]), f"`{r['run_dir']}`"] + [_show(r.get(k)).replace("|", "\\|") for k in keys]
        cells += [
            _fmt(r.get("top1"), ".2f"),
            _fmt(r.get("val_top1"), ".2f"),
            _fmt(r.get("top5"), ".2f"),
            _fmt(r.get("params"), ","),
            _fmt(r.get("size_bytes"), ","),
            "-" if sp is None else f"{100 * sp:.1f}%",
            "-" if r.get("compression") is None else f"{r['compression']:.2f}x",
            _fmt(r.get("seconds"), ".1f"),
            str(r.get("status", "")).replace("|", "\\|").replace("\n", " "),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _default_x(rows: Sequence[dict]) -> str:
    return "sparsity" if any(r.get("sparsity") is not None for r in rows if r.get("status") == "done") else "size_bytes"


def _axis(name: str) -> Tuple[str, float]:
    """(label, scale) of an axis: metrics get their unit, sparsity is shown in percent."""
    return (METRICS.get(name, name), 100.0 if name == "sparsity" else 1.0)


def plot_sweep(
    path: str, rows: Sequence[dict], group: str, x: Optional[str] = None, y: str = "top1", title: str = ""
) -> bool:
    """``y`` against ``x`` over the finished rows as a PNG, one curve per value of ``group`` (points
    sorted by x, marker and line). Returns False (and writes nothing) when matplotlib is missing or
    no finished row has both values."""
    x = x or _default_x(rows)
    curves: Dict[str, List[Tuple[float, float]]] = {}
    for r in rows:
        if r.get("status") != "done" or not _is_number(r.get(x)) or not _is_number(r.get(y)):
            continue
        curves.setdefault(_show(r.get(group)), []).append((float(r[x]), float(r[y])))
    if not curves:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        return False
    from .train.metrics import save_png

    (xlabel, xs), (ylabel, ys) = _axis(x), _axis(y)
    fig = Figure(figsize=(6.4, 4.4), dpi=100)
    ax = fig.subplots()
    for value, pts in curves.items():
        pts.sort()
        ax.plot([p[0] * xs for p in pts], [p[1] * ys for p in pts], marker="o", label=f"{group}={value}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    save_png(fig, path)
    return True


def _check_axes(plan: SweepPlan, group: Optional[str], x: Optional[str], y: Optional[str]) -> str:
    group = group if group is None else _norm_key(group, "--group", group)
    if group is not None and group not in plan.grid:
        raise SweepError(f"--group {group!r} is not a swept key; swept: {', '.join(plan.keys)}")
    for flag, name in (("--x", x), ("--y", y)):
        if name is None or name in METRICS:
            continue
        if name not in plan.grid:
            raise SweepError(
                f"{flag} {name!r}: not a metric ({', '.join(METRICS)}) nor a swept key ({', '.join(plan.keys)})"
            )
        if not all(_is_number(v) for v in plan.grid[name]):
            raise SweepError(f"{flag} {name!r}: the swept key has values that are not numbers")
    return group or plan.keys[0]


# ------------------------------------------------------------------------------------ running
def sweep(
    recipe_path: str,
    grid: Dict[str, List[Any]],
    fixed: Sequence[str] = (),
    out_dir: Optional[str] = None,
    *,
    group: Optional[str] = None,
    x: Optional[str] = None,
    y: Optional[str] = None,
    dry_run: bool = False,
    log: Optional[Callable[[str], None]] = None,
    **run_kwargs: Any,
) -> List[dict]:
    """Run ``recipe_path`` once per combination of ``grid`` (``{KEY: [values]}``, values as parsed
    from YAML) with the ``fixed`` overrides (``"KEY=VALUE"``) into ``out_dir`` (default
    ``runs/sweep-<recipe name>``), as the module docstring says; returns the rows (one per run, in
    grid order). ``run_kwargs`` go to :func:`~pycompress.recipe.run_recipe` (``data_root``,
    ``device``, ``backend``, ``progress``, ``compile``, ``log``); ``group`` / ``x`` / ``y`` choose the
    plot; ``dry_run``: validate and return the planned runs (``index``, ``run_dir``, the settings,
    ``state``: new / interrupted / finished) without running or writing anything. ``log`` receives
    the sweep's progress lines (default: print). Raises RecipeError / SweepError before anything
    runs; a run that fails becomes a row with status ``failed: <message>``."""
    from .recipe import RecipeError, RunError
    from .recipe import runner as _runner  # run_recipe looked up at call time (tests wrap it)
    from .train import TrainingDiverged

    if "resume" in run_kwargs:
        raise TypeError("sweep() decides per run whether to resume; do not pass resume")
    log = log or (lambda line: print(line, flush=True))
    run_kwargs.setdefault("log", log)
    plan = plan_sweep(
        recipe_path, grid, fixed, out_dir, device=run_kwargs.get("device"), backend=run_kwargs.get("backend")
    )
    group = _check_axes(plan, group, x, y)
    _check_out(plan)
    n = len(plan.runs)
    if dry_run:
        planned = []
        for run in plan.runs:
            state = _run_state(os.path.join(plan.out, run["run_dir"]))
            planned.append({"index": run["index"], "run_dir": run["run_dir"], **run["settings"], "state": state})
            rdir = os.path.join(plan.out, run["run_dir"])
            log(f"{run['index']:03d}  {state:11s}  {rdir}  {_setting_text(run['settings'])}")
        log(f"{n} runs into {plan.out} (dry run: nothing ran)")
        return planned
    os.makedirs(plan.out, exist_ok=True)
    rows: Dict[int, dict] = {}
    todo = []
    for run in plan.runs:  # the finished runs' rows first, so the tables are complete at all times
        rdir = os.path.join(plan.out, run["run_dir"])
        state = _run_state(rdir)
        if state == "finished":
            with open(os.path.join(rdir, "report.json"), encoding="utf-8") as f:
                rows[run["index"]] = _row(plan, run, json.load(f), "done", None)
        else:
            todo.append((run, state))
    _write_tables(plan, [rows[i] for i in sorted(rows)])
    log(
        f"sweep {plan.runs[0]['recipe'].name!r}: {n} runs ({plan.grid_text()}) -> {plan.out}; "
        f"{n - len(todo)} already finished"
    )
    for j, (run, state) in enumerate(todo):
        rdir = os.path.join(plan.out, run["run_dir"])
        log(
            f"=== sweep run {run['index'] + 1}/{n} ({j + 1} of {len(todo)} to do"
            f"{', resumed' if state != 'new' else ''}): {_setting_text(run['settings'])} -> {rdir}"
        )
        t0 = time.perf_counter()
        try:
            report = _runner.run_recipe(run["recipe"], rdir, resume=state != "new", **run_kwargs)
            row = _row(plan, run, report, "done", None)
        except (RunError, RecipeError, TrainingDiverged) as exc:
            row = _failed(plan, run, exc, time.perf_counter() - t0, log, detail=False)
        except Exception as exc:  # noqa: BLE001 - any failure of one run is recorded, the sweep goes on
            row = _failed(plan, run, exc, time.perf_counter() - t0, log, detail=True)
        rows[run["index"]] = row
        _write_tables(plan, [rows[i] for i in sorted(rows)])
    out_rows = [rows[i] for i in sorted(rows)]
    _write_summary(plan, out_rows, group, x, y, log)
    return out_rows


def _failed(plan: SweepPlan, run: dict, exc: BaseException, seconds: float, log, detail: bool) -> dict:
    msg = str(exc) if not detail else f"{type(exc).__name__}: {exc}"
    msg = " ".join(msg.split()) or type(exc).__name__
    if detail:
        log(traceback.format_exc().rstrip())
    log(f"=== sweep run {run['index'] + 1} ({_setting_text(run['settings'])}) failed: {msg}")
    return _row(plan, run, None, f"failed: {msg}", seconds)


def _write_summary(plan: SweepPlan, rows: List[dict], group: str, x: Optional[str], y: Optional[str], log) -> None:
    from .utils import atomic_write_text

    x = x or _default_x(rows)
    y = y or "top1"
    name = plan.runs[0]["recipe"].name
    table = format_markdown(rows, plan.keys)
    png = os.path.join(plan.out, "sweep.png")
    plotted = plot_sweep(png, rows, group, x, y, title=f"sweep of {name}")
    failed = sum(1 for r in rows if str(r.get("status", "")).startswith("failed"))
    lines = [
        f"# pycompress sweep: {name}",
        "",
        f"- recipe: `{plan.recipe_path}`",
        f"- grid: {plan.grid_text()}" + (f"; fixed: {', '.join(plan.fixed)}" if plan.fixed else ""),
        f"- runs: {len(plan.runs)}, finished {len(rows) - failed}, failed {failed}",
        "",
        table,
        "",
        (
            f"![{y} against {x}](sweep.png): {_axis(y)[0]} against {_axis(x)[0]}, one curve per value of `{group}`."
            if plotted
            else "No plot: no finished run has both values (or matplotlib is missing)."
        ),
        "",
    ]
    atomic_write_text(os.path.join(plan.out, "sweep.md"), "\n".join(lines))
    log(f"wrote {os.path.join(plan.out, 'sweep.md')}, sweep.csv, sweep.json" + (", sweep.png" if plotted else ""))


# ------------------------------------------------------------------------------------ command line
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add `pycompress sweep`'s arguments to ``p`` (a subparser); returns ``p``."""
    from .profile import _positive_int

    p.add_argument("recipe", help="recipe file, e.g. recipes/deephoyer_lenet300.yaml")
    p.add_argument(
        "--set",
        dest="grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a swept setting and its values, parsed as YAML like run's --set; commas inside [] {} or quotes "
        "do not split (repeatable: the runs are every combination)",
    )
    p.add_argument(
        "--fixed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an override applied to every run, never split (repeatable)",
    )
    p.add_argument("--out", metavar="DIR", help="sweep directory (default: runs/sweep-<recipe name>)")
    p.add_argument("--data-root", metavar="DIR", help="where datasets are (as for pycompress run)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the recipe's device")
    p.add_argument(
        "--backend",
        choices=["auto", "reference", "cpu", "triton", "cuda"],
        help="op backend for every run (overrides kernel_backend)",
    )
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--group", metavar="KEY", help="the swept key whose values make the plot's curves (default: the first)"
    )
    p.add_argument(
        "--x",
        metavar="METRIC",
        help=f"plot x axis: {', '.join(METRICS)} or a numeric swept key (default: sparsity when the runs prune, "
        "else size_bytes)",
    )
    p.add_argument("--y", metavar="METRIC", help="plot y axis (default: top1)")
    p.add_argument("--dry-run", action="store_true", help="validate, print the runs and exit")
    return p


def _err(exc: Any) -> int:
    print(f"pycompress sweep: error: {exc}", file=sys.stderr)
    return 2


def cli_main(args: argparse.Namespace) -> int:
    """Run `pycompress sweep` for parsed ``args`` (see :func:`add_arguments`): 0 every run finished,
    1 some run failed, 2 bad arguments (nothing ran)."""
    from .recipe import RecipeError

    a = lambda name, default=None: getattr(args, name, default)  # noqa: E731 - a Namespace built by hand works
    if a("threads"):
        import torch

        torch.set_num_threads(a("threads"))
    try:
        grid = parse_grid(a("grid") or [])
        rows = sweep(
            a("recipe"),
            grid,
            a("fixed") or [],
            a("out"),
            group=a("group"),
            x=a("x"),
            y=a("y"),
            dry_run=bool(a("dry_run")),
            data_root=a("data_root"),
            device=a("device"),
            backend=a("backend"),
            progress=False if a("no_progress") else None,
        )
    except (SweepError, RecipeError) as exc:
        return _err(exc)
    except KeyboardInterrupt:
        print("pycompress sweep: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    if a("dry_run"):
        return 0
    print()
    print(format_markdown(rows, list(grid)))
    return 1 if any(str(r.get("status", "")).startswith("failed") for r in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m pycompress.sweep RECIPE ...` (the same as `pycompress sweep`)."""
    p = add_arguments(argparse.ArgumentParser(prog="pycompress sweep", description=__doc__.split("\n")[0]))
    return cli_main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
