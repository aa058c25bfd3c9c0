"""pycompress.sweep: value lists split on top-level commas, the grid's order and run directories, a
2x2 sweep of a tiny pruning recipe (tables, markdown, plot), re-runs that skip finished runs and
resume interrupted ones, refused grids, bad values caught before anything runs, failed runs
recorded."""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import json
import os
import shutil

import pytest

from pycompress import sweep
from pycompress.recipe import RecipeError, RunError
from pycompress.recipe import runner as recipe_runner
from tests.helpers import write_recipe

TINY = {
    "name": "tiny-sweep",
    "seed": 0,
    "device": "cpu",
    "auto_export": False,
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "augment": False,
        "options": {"num_classes": 4, "image_size": 8, "in_channels": 1, "length": 64},
    },
    "model": {"name": "lenet300", "args": {"input_size": 8}},
    "stages": [
        {
            "name": "train",
            "kind": "train",
            "epochs": 1,
            "max_steps_per_epoch": 2,
            "optimizer": {"name": "sgd", "lr": 0.05},
            "prune": {"criterion": "global_magnitude", "sparsity": 0.5},
        }
    ],
}
GRID_ARGS = ["--set", "train.prune.sparsity=0.5,0.75", "--set", "seed=0,1"]
DIRS = ["000-sparsity=0.5_seed=0", "001-sparsity=0.5_seed=1", "002-sparsity=0.75_seed=0", "003-sparsity=0.75_seed=1"]


def _cli(*argv: str) -> int:
    return sweep.cli_main(sweep.add_arguments(argparse.ArgumentParser(prog="pycompress sweep")).parse_args(argv))


def _capture(fn, *args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = fn(*args)
    return rc, out.getvalue(), err.getvalue()


def _counting(monkeypatch, fail=None):
    """Wrap run_recipe: record (run directory name, resume) per call; ``fail(recipe)`` may raise."""
    calls = []
    real = recipe_runner.run_recipe

    def wrapped(recipe, out_dir=None, **kwargs):
        calls.append((os.path.basename(out_dir), kwargs.get("resume")))
        if fail is not None:
            fail(recipe)
        return real(recipe, out_dir, **kwargs)

    monkeypatch.setattr(recipe_runner, "run_recipe", wrapped)
    return calls


def _csv_rows(out):
    with open(os.path.join(out, "sweep.csv"), newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize(
    "text,items",
    [
        ("1,2,3", ["1", "2", "3"]),
        (" 1.0e-5 , 2.0e-5", ["1.0e-5", "2.0e-5"]),
        ("[1, 2],[3]", ["[1, 2]", "[3]"]),
        ("{a: 1, b: [2, 3]},x", ["{a: 1, b: [2, 3]}", "x"]),
        ("'a,b',\"c,d\",it's", ["'a,b'", '"c,d"', "it's"]),
        ("single", ["single"]),
    ],
)
def test_split_values_on_top_level_commas(text, items):
    assert sweep.split_values(text) == items


@pytest.mark.parametrize(
    "text,msg", [("1,,2", "value 2 is empty"), ("[1, 2", "unclosed ["), ("1]", "unbalanced ']'"), ("'a,b", "quote")]
)
def test_split_values_errors(text, msg):
    with pytest.raises(sweep.SweepError, match=msg.replace("[", r"\[")):
        sweep.split_values(text)


def test_parse_set_and_grid():
    key, values = sweep.parse_set("a.b = 1,0.5,true,null,[1, 2],{x: 1},abc")
    assert key == "a.b" and values == [1, 0.5, True, None, [1, 2], {"x": 1}, "abc"]
    assert sweep.parse_grid(["seed=0,1", "train.epochs=1"]) == {"seed": [0, 1], "train.epochs": [1]}
    with pytest.raises(sweep.SweepError, match="expected KEY=V1,V2"):
        sweep.parse_set("seed")
    with pytest.raises(sweep.SweepError, match="listed twice"):
        sweep.parse_set("seed=1,1")
    with pytest.raises(sweep.SweepError, match="given twice"):
        sweep.parse_grid(["seed=0", "seed=1"])


# ------------------------------------------------------------------------------ the plan
def test_grid_order_and_run_dirs(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["stages"].append(dict(raw["stages"][0], name="ft", prune=None))
    path = write_recipe(tmp_path, raw)
    grid = {"train.epochs": [1, 2], "ft.epochs": [3, 1, 2], "description": ["a/b c"]}
    plan = sweep.plan_sweep(path, grid, out_dir=str(tmp_path / "s"))
    # the first key varies slowest; values in the order given
    assert [tuple(r["settings"].values()) for r in plan.runs] == [
        (1, 3, "a/b c"),
        (1, 1, "a/b c"),
        (1, 2, "a/b c"),
        (2, 3, "a/b c"),
        (2, 1, "a/b c"),
        (2, 2, "a/b c"),
    ]
    # "epochs" is shared by two keys: full key names; unsafe characters replaced
    assert plan.runs[1]["run_dir"] == "001-train.epochs=1_ft.epochs=1_description=a_b_c"
    assert [r["recipe"].stage("ft").epochs for r in plan.runs] == [3, 1, 2, 3, 1, 2]
    long = sweep.plan_sweep(path, {"description": ["x" * 200]}, out_dir=str(tmp_path / "s"))
    assert long.runs[0]["run_dir"] == "000-" + ("description=" + "x" * 200)[:60]
    assert sweep.plan_sweep(path, {"seed": [0]}).out == os.path.join("runs", "sweep-tiny-sweep")
    assert not os.path.exists(tmp_path / "s")  # planning writes nothing


# ------------------------------------------------------------------------------ a real 2x2 sweep
@pytest.fixture(scope="module")
def done_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    path = write_recipe(tmp, TINY)
    out = str(tmp / "out")
    with pytest.MonkeyPatch.context() as mp:
        calls = _counting(mp)
        rc, stdout, stderr = _capture(_cli, path, *GRID_ARGS, "--out", out, "--no-progress", "--group", "seed")
    return path, out, calls, rc, stdout, stderr


def test_sweep_writes_rows_table_and_plot(done_sweep):
    path, out, calls, rc, stdout, stderr = done_sweep
    assert rc == 0, stdout + stderr
    assert calls == [(d, False) for d in DIRS]
    rows = _csv_rows(out)
    assert list(rows[0]) == [
        "index",
        "run_dir",
        "train.prune.sparsity",
        "seed",
        "top1",
        "val_top1",
        "top5",
        "params",
        "size_bytes",
        "sparsity",
        "compression",
        "seconds",
        "status",
    ]
    assert [(r["index"], r["run_dir"], r["train.prune.sparsity"], r["seed"]) for r in rows] == [
        ("0", DIRS[0], "0.5", "0"),
        ("1", DIRS[1], "0.5", "1"),
        ("2", DIRS[2], "0.75", "0"),
        ("3", DIRS[3], "0.75", "1"),
    ]
    doc = json.load(open(os.path.join(out, "sweep.json")))
    assert doc["recipe"] == os.path.realpath(path)
    assert doc["grid"] == {"train.prune.sparsity": ["0.5", "0.75"], "seed": ["0", "1"]}
    for r, c in zip(doc["rows"], rows):
        report = json.load(open(os.path.join(out, r["run_dir"], "report.json")))
        s = report["student"]
        assert r["status"] == c["status"] == "done"
        assert r["sparsity"] == pytest.approx(r["train.prune.sparsity"], abs=1e-3)
        assert float(c["sparsity"]) == pytest.approx(r["sparsity"])
        assert (r["top1"], r["top5"], r["params"], r["size_bytes"]) == (
            s["top1"],
            s["top5"],
            s["params"],
            s["size_bytes"],
        )
        assert r["compression"] == pytest.approx(s["compression"]) and r["seconds"] == report["total_seconds"]
    assert doc["rows"][2]["size_bytes"] < doc["rows"][0]["size_bytes"]  # 75% pruned is smaller
    md = open(os.path.join(out, "sweep.md")).read()
    assert md.count("| done |") == 4 and "50.0%" in md and "75.0%" in md
    assert "top-1 (%) against sparsity of the pruned layers (%)" in md and "value of `seed`" in md
    assert "| # | run | train.prune.sparsity | seed | top-1 (%)" in stdout  # the table is printed too
    with open(os.path.join(out, "sweep.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_skips_finished_runs_and_resumes_an_interrupted_one(done_sweep, tmp_path, monkeypatch):
    path, ref, *_ = done_sweep
    out = str(tmp_path / "out")
    shutil.copytree(ref, out)
    # run 002 as if killed after its last stage: run.json without "finished", no report.json
    run_json = os.path.join(out, DIRS[2], "run.json")
    state = json.load(open(run_json))
    del state["finished"]
    json.dump(state, open(run_json, "w"))
    os.remove(os.path.join(out, DIRS[2], "report.json"))
    kept = {d: os.stat(os.path.join(out, d, "report.json")).st_mtime_ns for d in DIRS if d != DIRS[2]}
    calls = _counting(monkeypatch)
    rc, stdout, stderr = _capture(_cli, path, *GRID_ARGS, "--out", out, "--no-progress")
    assert rc == 0, stdout + stderr
    assert calls == [(DIRS[2], True)]  # only the interrupted run, resumed
    assert "already done, skipped" in stdout and "3 already finished" in stdout
    assert {d: os.stat(os.path.join(out, d, "report.json")).st_mtime_ns for d in kept} == kept
    assert [r["status"] for r in _csv_rows(out)] == ["done"] * 4
    # a third time: nothing runs at all; the values may be spelled differently
    calls.clear()
    rc, stdout, stderr = _capture(
        _cli, path, "--set", "train.prune.sparsity=.5, 0.75", "--set", "seed=0,1", "--out", out, "--no-progress"
    )
    assert rc == 0 and calls == [], stdout + stderr
    assert _csv_rows(out) == _csv_rows(ref)


def test_changed_grid_is_refused(done_sweep, monkeypatch):
    path, out, *_ = done_sweep
    calls = _counting(monkeypatch)
    for grid in (["--set", "train.prune.sparsity=0.5,0.75", "--set", "seed=0,1,2"], ["--set", "seed=0,1"]):
        rc, stdout, stderr = _capture(_cli, path, *grid, "--out", out)
        assert rc == 2 and "holds another sweep" in stderr and "grid train.prune.sparsity=0.5,0.75; seed=0,1" in stderr
    rc, stdout, stderr = _capture(_cli, path, *GRID_ARGS, "--fixed", "train.epochs=2", "--out", out)
    assert rc == 2 and "fixed [] -> ['train.epochs=2']" in stderr
    assert calls == []
    with pytest.raises(sweep.SweepError, match="not empty and holds no sweep.json"):
        sweep.sweep(path, {"seed": [0]}, out_dir=os.path.join(out, DIRS[0]))


def test_edited_recipe_is_refused(done_sweep, tmp_path, monkeypatch):
    _, ref, *_ = done_sweep
    raw = copy.deepcopy(TINY)
    raw["stages"][0]["optimizer"]["lr"] = 0.1
    path = write_recipe(tmp_path, raw)
    out = str(tmp_path / "out")
    shutil.copytree(ref, out)
    doc = json.load(open(os.path.join(out, "sweep.json")))
    doc["recipe"] = os.path.realpath(path)  # as if the sweep's own recipe file had been edited
    json.dump(doc, open(os.path.join(out, "sweep.json"), "w"))
    calls = _counting(monkeypatch)
    rc, _, stderr = _capture(_cli, path, *GRID_ARGS, "--out", out)
    assert rc == 2 and calls == []
    assert f"{DIRS[0]} was run from another recipe" in stderr and "lr: 0.05 -> 0.1" in stderr, stderr


def test_dry_run_lists_runs_and_writes_nothing(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, TINY)
    out = str(tmp_path / "out")
    calls = _counting(monkeypatch)
    rc, stdout, _ = _capture(_cli, path, *GRID_ARGS, "--out", out, "--dry-run")
    assert rc == 0 and calls == [] and not os.path.exists(out)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("00")]
    assert [ln.split()[:3] for ln in lines] == [[f"{i:03d}", "new", os.path.join(out, d)] for i, d in enumerate(DIRS)]


# ------------------------------------------------------------------------------ errors
def test_bad_value_fails_before_anything_runs(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, TINY)
    out = str(tmp_path / "out")
    calls = _counting(monkeypatch)
    rc, _, stderr = _capture(_cli, path, "--set", "seed=0,1", "--set", "train.prune.sparsity=0.5,1.5", "--out", out)
    assert rc == 2 and calls == [] and not os.path.exists(out)
    assert "--set train.prune.sparsity=1.5 is invalid" in stderr and "sparsity" in stderr
    with pytest.raises(RecipeError, match="--set trian.epochs=2 is invalid.*did you mean 'train'"):
        sweep.sweep(path, {"trian.epochs": [2]}, out_dir=out)
    for argv, msg in (
        (["--set", "seed=0,,1"], "value 2 is empty"),
        (["--set", "seed=0", "--fixed", "seed=1"], "both swept"),
        (["--set", "seed=0", "--group", "train.epochs"], "--group 'train.epochs' is not a swept key"),
        (["--set", "seed=0", "--x", "flops"], "--x 'flops': not a metric"),
        (["--set", "description=a,b", "--y", "description"], "values that are not numbers"),
        ([], "nothing to sweep"),
    ):
        rc, _, stderr = _capture(_cli, path, *argv, "--out", out)
        assert rc == 2 and msg in stderr, (argv, stderr)
    assert calls == [] and not os.path.exists(out)


def test_failed_runs_are_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, TINY)
    out = str(tmp_path / "out")

    def fail(recipe):
        if recipe.seed == 1:
            raise RunError("boom: cannot start")
        if recipe.seed == 2:
            raise ZeroDivisionError("division by zero")

    calls = _counting(monkeypatch, fail)
    rc, stdout, stderr = _capture(_cli, path, "--set", "seed=1,2,0", "--out", out, "--no-progress")
    assert rc == 1, stdout + stderr
    assert [c[0] for c in calls] == ["000-seed=1", "001-seed=2", "002-seed=0"]
    rows = _csv_rows(out)
    assert [r["status"] for r in rows] == [
        "failed: boom: cannot start",
        "failed: ZeroDivisionError: division by zero",
        "done",
    ]
    assert rows[0]["top1"] == "" and float(rows[2]["top1"]) > 0
    assert "failed: boom: cannot start" in open(os.path.join(out, "sweep.md")).read()
    assert os.path.exists(os.path.join(out, "sweep.png"))  # the finished run is plotted


def test_a_crash_mid_sweep_leaves_the_finished_rows(tmp_path, monkeypatch):
    path = write_recipe(tmp_path, TINY)
    out = str(tmp_path / "out")

    def fail(recipe):
        if recipe.seed == 1:
            raise KeyboardInterrupt

    _counting(monkeypatch, fail)
    with pytest.raises(KeyboardInterrupt):
        sweep.sweep(path, {"seed": [0, 1]}, out_dir=out, progress=False, log=lambda line: None)
    rows = _csv_rows(out)
    assert [(r["run_dir"], r["status"]) for r in rows] == [("000-seed=0", "done")]
    assert json.load(open(os.path.join(out, "sweep.json")))["rows"][0]["status"] == "done"
    assert not os.path.exists(os.path.join(out, "sweep.md"))


def test_plot_sweep_curves_per_group(tmp_path):
    rows = [
        {"g": "a", "size_bytes": 3, "top1": 50.0, "status": "done", "sparsity": None},
        {"g": "a", "size_bytes": 1, "top1": 40.0, "status": "done", "sparsity": None},
        {"g": "b", "size_bytes": 2, "top1": None, "status": "failed: x", "sparsity": None},
    ]
    png = str(tmp_path / "p.png")
    assert sweep.plot_sweep(png, rows, "g") and os.path.getsize(png) > 0  # x defaults to size_bytes
    assert not sweep.plot_sweep(str(tmp_path / "q.png"), rows[2:], "g")
    assert not os.path.exists(tmp_path / "q.png")
