"""benchmarks/deephoyer_compare.py's table: the highest sparsity within 1 point of the dense model,
per method, with the alive groups of the chosen run (no training: synthetic sweep rows and files)."""

from __future__ import annotations

import importlib.util
import json
import os

from tests.helpers import ROOT


def _module():
    spec = importlib.util.spec_from_file_location(
        "deephoyer_compare", os.path.join(ROOT, "benchmarks", "deephoyer_compare.py")
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run_dir(out, method, name, first_top1=None, alive=None):
    d = os.path.join(out, method, name)
    os.makedirs(os.path.join(d, "stages", "01-prune"))
    json.dump({"stages": [{"best_top1": first_top1}]}, open(os.path.join(d, "report.json"), "w"))
    rows = [
        {"name": "fc1.weight", "selected": True, "alive_out": alive or 5, "total_out": 10, "alive_in": 7, "total_in": 8}
    ]
    json.dump({"rows": rows}, open(os.path.join(d, "stages", "01-prune", "sparsity.json"), "w"))
    return name


def test_table_picks_the_sparsest_run_within_one_point(tmp_path):
    dc = _module()
    out = str(tmp_path)
    mag = [
        {"run_dir": _run_dir(out, "magnitude", "000", 90.0), "sparsity": 0.8, "top1": 90.5, "status": "done"},
        {"run_dir": _run_dir(out, "magnitude", "001", 90.0), "sparsity": 0.9, "top1": 88.9, "status": "done"},
    ]
    hs = [
        {
            "run_dir": _run_dir(out, "hoyer_square", "000", alive=3),
            "sparsity": 0.93,
            "top1": 89.0,
            "status": "done",
            "hoyer.prune.strength": 2e-5,
        },
        {"run_dir": _run_dir(out, "hoyer_square", "001"), "sparsity": 0.97, "top1": 88.99, "status": "done"},
        {"run_dir": "002", "sparsity": None, "top1": None, "status": "failed: diverged"},
    ]
    dense = dc._dense_top1(out)
    assert dense == 90.0
    dc.write_comparison(out, {"magnitude": mag, "hoyer_square": hs}, dense)
    data = json.load(open(tmp_path / "compare.json"))
    got = {m["method"]: m for m in data["methods"]}
    assert got["magnitude"]["best_sparsity"] == 0.8  # 0.9 is 1.1 points below the dense model
    assert got["hoyer_square"]["best_sparsity"] == 0.93 and got["hoyer_square"]["runs"] == 2  # 88.99 < 89.0: out
    assert got["hoyer_square"]["structure"] == "fc1 3/10, 7/8"
    assert got["hoyer_square"]["setting"] == {"hoyer.prune.strength": 2e-5}
    md = open(tmp_path / "compare.md").read()
    assert "| hoyer_square | 2 | 93.00% | 89.00 |" in md and os.path.getsize(tmp_path / "compare.png") > 0
