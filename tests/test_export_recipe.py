"""Artifacts in runs and on the command line: the export stage (auto-added for compressing recipes),
`pycompress export | eval FILE | info FILE`, and the post-training stages ptq and bn_recalibrate."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os

import pytest
import torch
import yaml

from pycompress import export
from pycompress.cli import main
from pycompress.recipe import RecipeError, load_model, run_recipe, validate

DATA = {
    "dataset": "synthetic",
    "batch_size": 16,
    "eval_batch_size": 64,
    "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 96},
}

TINY = {
    "name": "tiny-export",
    "seed": 3,
    "device": "cpu",
    "data": DATA,
    "model": {"name": "mobilenet_student", "args": {"width_mult": 0.5}},
    "stages": [
        {"name": "float", "kind": "train", "epochs": 2, "optimizer": {"name": "adamw", "lr": 3e-3}},
        {
            "name": "prune",
            "kind": "prune",
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "prune": {"criterion": "global_magnitude", "sparsity": 0.6},
        },
        {
            "name": "qat4",
            "kind": "quantize",
            "epochs": 1,
            "optimizer": {"name": "adamw", "lr": 5e-4},
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 1},
        },
        {"name": "recal", "kind": "bn_recalibrate", "batches": 3, "rounds": 2},
    ],
}


def _cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-run")
    out = str(tmp / "out")
    torch.set_num_threads(1)
    report = run_recipe(validate(copy.deepcopy(TINY), "tiny.yaml"), out, progress=False, log=lambda s: None)
    return tmp, out, report


# ------------------------------------------------------------------------------ schema
def test_auto_export_stage_added_only_when_compressing():
    r = validate(copy.deepcopy(TINY), "t.yaml")
    assert [s.kind for s in r.stages][-1] == "export" and r.stages[-1].name == "export"
    plain = copy.deepcopy(TINY)
    plain["stages"] = plain["stages"][:1]
    assert [s.kind for s in validate(plain, "t.yaml").stages] == ["train"]
    off = copy.deepcopy(TINY)
    off["auto_export"] = False
    assert "export" not in [s.kind for s in validate(off, "t.yaml").stages]
    # the resolved recipe (what a run directory stores) validates to the same stages
    from pycompress.recipe import dump_recipe

    again = validate(yaml.safe_load(dump_recipe(r)), "t.yaml")
    assert [s.name for s in again.stages] == [s.name for s in r.stages]


@pytest.mark.parametrize(
    "stage,match",
    [
        ({"name": "e", "kind": "export", "formats": ["pcz", "zip"]}, "unknown format 'zip'"),
        ({"name": "e", "kind": "export", "formats": []}, "non-empty list"),
        ({"name": "e", "kind": "export", "epochs": 2}, "'epochs' does not apply to a 'export' stage"),
        ({"name": "e", "kind": "export", "target": "teacher"}, "works on the student"),
        ({"name": "p", "kind": "ptq"}, "missing required key 'quantize'"),
        ([{"name": "e", "kind": "export"}], "needs an earlier stage that trains the student"),
        ({"name": "p", "kind": "ptq", "quantize": {"weight_bits": 17}}, "weight_bits"),
        ({"name": "b", "kind": "bn_recalibrate", "rounds": 0}, "'rounds' must be >= 1"),
        ({"name": "b", "kind": "bn_recalibrate", "optimizer": {"name": "sgd", "lr": 0.1}}, "does not apply"),
        (
            {"name": "t", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}, "formats": ["pcz"]},
            "'formats' does not apply to a 'train' stage",
        ),
    ],
)
def test_bad_stages(stage, match):
    raw = copy.deepcopy(TINY)
    raw["stages"] = stage if isinstance(stage, list) else raw["stages"][:1] + [stage]
    with pytest.raises(RecipeError, match=match):
        validate(raw, "bad.yaml")


# ------------------------------------------------------------------------------ the run
def test_run_writes_artifacts_and_reports_file_bytes(run):
    tmp, out, report = run
    arts = {a["format"]: a for a in report["artifacts"]}
    assert set(arts) == {"pcz", "fp16", "uint8"}
    for fmt, a in arts.items():
        path = os.path.join(out, a["file"])
        assert os.path.getsize(path) == a["file_bytes"]
        # a barely trained tiny net has small margins: hw7's uint8 min-max moves a few predictions
        assert 0 <= a["top1"] <= 100 and a["agreement"] >= (0.95 if fmt == "pcz" else 0.75), (fmt, a)
    s = report["student"]
    assert s["file_bytes"] == s["size_bytes"] == arts["pcz"]["file_bytes"]
    assert s["top1"] == arts["pcz"]["top1"]
    assert s["counted_bytes"] <= s["file_bytes"] <= s["counted_bytes"] + arts["pcz"]["overhead_bytes"] + 4 * 60
    md = open(os.path.join(out, "report.md")).read()
    assert "## Artifacts" in md and "model.pcz" in md and "file size (bytes)" in md
    # the artifact's predictions agree with the checkpoint it came from on this (tiny) test set
    assert arts["pcz"]["agreement"] >= 0.95


def test_bn_recalibrate_stage(run):
    tmp, out, report = run
    st = {s["name"]: s for s in report["stages"]}["recal"]
    assert [r["round"] for r in st["rounds"]] == [0, 1, 2]
    assert st["top1"] == max(r["top1"] for r in st["rounds"])
    model, ckpt = load_model(os.path.join(out, st["best"]))
    assert ckpt["stage"] == "recal" and type(model.cnn[1][0]).__name__ == "QuantConv2d"


def test_eval_and_info_of_an_artifact(run, tmp_path):
    _, out, report = run
    path = os.path.join(out, "model.pcz")
    j = str(tmp_path / "e.json")
    code, stdout, err = _cli("eval", path, "--json", j)
    assert code == 0, err
    res = json.load(open(j))
    pcz = {a["format"]: a for a in report["artifacts"]}["pcz"]
    assert res["top1"] == pytest.approx(pcz["top1"]) == pytest.approx(res["recorded_top1"])
    assert res["file_bytes"] == pcz["file_bytes"] and res["artifact"] is True
    for key in ("top1", "top5", "loss", "samples", "size_bytes", "fp32_bytes", "dataset", "checkpoint"):
        assert key in res
    code, stdout, err = _cli("info", path, "--json", str(tmp_path / "i.json"))
    assert code == 0, err
    assert "mobilenet_student" in stdout and "weight_codes" in stdout and "sha256" in stdout
    info = json.load(open(tmp_path / "i.json"))
    assert info["facts"]["file_bytes"] == pcz["file_bytes"]


def test_export_cli_from_run_dir_and_checkpoint(run, tmp_path):
    _, out, report = run
    dst = str(tmp_path / "a.pcz")
    code, stdout, err = _cli("export", out, "-o", dst)
    assert code == 0, err
    assert "wrote" in stdout and os.path.exists(dst)
    # the run's final student is the bn_recalibrate stage's best: same artifact as the run's
    a, b = export.read(dst), export.read(os.path.join(out, "model.pcz"))
    assert a.facts["payload_bytes"] == b.facts["payload_bytes"]
    assert a.manifest["eval"]["top1"] == pytest.approx(b.manifest["eval"]["top1"])
    # refuses to overwrite, --force overwrites
    code, _, err = _cli("export", out, "-o", dst)
    assert code == 2 and "--force" in err
    assert _cli("export", out, "-o", dst, "--force", "--no-eval", "--format", "uint8")[0] == 0
    assert export.read(dst).manifest["encoding"] == "uint8" and export.read(dst).manifest["eval"] is None
    # --stage picks an earlier stage; a checkpoint file works too
    code, _, err = _cli("export", out, "--stage", "float", "-o", str(tmp_path / "f.pcz"))
    assert code == 0, err
    assert export.read(str(tmp_path / "f.pcz")).manifest["bn_folding"]["folded"] == 8
    ck = os.path.join(out, "stages", "01-prune", "best.pt")
    assert _cli("export", ck, "-o", str(tmp_path / "p.pcz"), "--no-eval")[0] == 0
    code, _, err = _cli("export", out, "--stage", "nope", "-o", str(tmp_path / "n.pcz"))
    assert code == 2 and "no finished stage 'nope'" in err


def test_cli_errors_name_file_and_problem(tmp_path):
    bad = tmp_path / "bad.pcz"
    bad.write_bytes(b"\x89PCZ\r\n\x1a\n" + b"\0" * 10)
    code, _, err = _cli("eval", str(bad))
    assert code == 2 and "truncated" in err and str(bad) in err
    code, _, err = _cli("info", str(bad))
    assert code == 2 and "truncated" in err
    code, _, err = _cli("export", str(tmp_path), "-o", str(tmp_path / "x.pcz"))
    assert code == 2 and "not a pycompress run directory" in err


# ------------------------------------------------------------------------------ ptq
def test_ptq_stage(tmp_path):
    raw = copy.deepcopy(TINY)
    raw["stages"] = [
        raw["stages"][0],
        {
            "name": "ptq8",
            "kind": "ptq",
            "batches": 2,
            "quantize": {"weight_bits": 8, "act_bits": 8, "act_observer": "percentile", "act_percentile": 99.9},
        },
        {"name": "export", "kind": "export", "formats": ["pcz"]},
    ]
    out = str(tmp_path / "out")
    report = run_recipe(validate(raw, "ptq.yaml"), out, progress=False, log=lambda s: None)
    st = {s["name"]: s for s in report["stages"]}
    assert st["ptq8"]["calib_batches"] == 2 and st["ptq8"]["layers"] > 10
    assert abs(st["ptq8"]["top1"] - st["ptq8"]["float_top1"]) <= 10
    model, ckpt = load_model(os.path.join(out, st["ptq8"]["best"]))
    assert ckpt["arch"]["qat"] and type(model.cnn[2][3]).__name__ == "QuantConv2d"
    assert [a["format"] for a in report["artifacts"]] == ["pcz"]


def test_onnx_format_without_the_extra_fails_before_training(tmp_path, monkeypatch):
    import importlib.util

    from pycompress.recipe import RunError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    raw = copy.deepcopy(TINY)
    raw["stages"] = raw["stages"][:1] + [{"name": "export", "kind": "export", "formats": ["pcz", "onnx"]}]
    recipe = validate(raw, "x.yaml")  # a valid recipe: the machine lacks the extra
    with pytest.raises(RunError, match=r"needs the onnx extra \(missing: onnxruntime\)"):
        run_recipe(recipe, str(tmp_path / "out"), progress=False, log=lambda s: None)
    assert not os.path.exists(tmp_path / "out" / "stages")
