"""pycompress plot pareto: points from run and sweep directories, the Pareto front, the PNG."""

from __future__ import annotations

import json
import os

import pytest

from pycompress.plot import PlotError, collect_points, pareto_front
from tests.helpers import run_cli


def _run(d, top1, size, recipe="r", file_bytes=None):
    os.makedirs(d)
    student = {"top1": top1, "size_bytes": size, "file_bytes": file_bytes}
    json.dump({"recipe": recipe, "student": student}, open(os.path.join(d, "report.json"), "w"))
    return str(d)


def test_points_and_front(tmp_path):
    a = _run(tmp_path / "a", 91.0, 150_000, "quick", file_bytes=147_000)
    b = _run(tmp_path / "b", 90.0, 80_000, "kpq")
    c = _run(tmp_path / "c", 89.0, 120_000, "worse")  # beaten by b on both
    sw = tmp_path / "sw"
    os.makedirs(sw)
    rows = [
        {"run_dir": "000", "top1": 92.0, "size_bytes": 400_000, "status": "done"},
        {"run_dir": "001", "top1": None, "size_bytes": None, "status": "failed: x"},
    ]
    json.dump({"rows": rows}, open(sw / "sweep.json", "w"))
    pts = collect_points([a, b, c], [str(sw)])
    assert [(p["label"], p["bytes"]) for p in pts] == [
        ("quick", 147_000),
        ("kpq", 80_000),
        ("worse", 120_000),
        ("000", 400_000),
    ]
    assert [p["label"] for p in pareto_front(pts)] == ["kpq", "quick", "000"]
    with pytest.raises(PlotError, match="no report.json"):
        collect_points([str(tmp_path / "nothing")])


def test_cli(tmp_path):
    a = _run(tmp_path / "a", 91.0, 150_000, "quick")
    out, js = tmp_path / "p.png", tmp_path / "p.json"
    res = run_cli(["plot", "pareto", a, "-o", str(out), "--json", str(js)])
    assert res.returncode == 0, res.stderr
    assert out.stat().st_size > 0 and json.loads(js.read_text())["front"][0]["label"] == "quick"
    assert run_cli(["plot", "pareto"]).returncode == 2
    bad = run_cli(["plot", "pareto", str(tmp_path / "missing")])
    assert bad.returncode == 2 and "no report.json" in bad.stderr
