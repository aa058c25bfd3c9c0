"""Recipes: every shipped recipe validates; bad recipes fail naming file, stage and key; a tiny
recipe runs end to end, survives a SIGKILL mid-stage and resumes to the same result."""

from __future__ import annotations

import copy
import glob
import json
import os

import pytest
import torch

from pycompress.recipe import RecipeError, RunError, apply_overrides, load_model, load_recipe, run_recipe, validate
from tests.helpers import ROOT, run_cli, write_recipe

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))

# A pipeline shaped like the quickstart, on synthetic data, a few steps per stage.
TINY = {
    "name": "tiny",
    "seed": 3,
    "kernel_backend": "auto",
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 64},
    },
    "model": {"name": "mobilenet_student", "args": {"width_mult": 0.5}},
    "teacher": {"name": "lenet5", "args": {"input_size": 16}},
    "stages": [
        {
            "name": "teacher",
            "kind": "train",
            "target": "teacher",
            "epochs": 2,
            "batch_size": 32,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
            "schedule": {"name": "warmup_cosine", "warmup_epochs": 0.5},
        },
        {
            "name": "kd",
            "kind": "distill",
            "epochs": 2,
            "optimizer": {"name": "adamw", "lr": 2e-3},
            "distill": {"kind": "hinton", "alpha": 0.5, "temperature": 4},
        },
        {
            "name": "qat8",
            "kind": "quantize",
            "epochs": 2,
            "optimizer": {"name": "adamw", "lr": 5e-4},
            "distill": {"kind": "hinton", "alpha": 0.5, "temperature": 4},
            "quantize": {"weight_bits": 8, "act_bits": 8, "calib_batches": 2},
        },
        {
            "name": "qat4",
            "kind": "quantize",
            "epochs": 2,
            "optimizer": {"name": "adamw", "lr": 5e-4},
            "schedule": {"name": "warmup_cosine"},
            "log_format": "jsonl",
            "distill": {"kind": "hinton", "alpha": 0.5, "temperature": 4},
            "quantize": {
                "weight_bits": 4,
                "act_bits": 8,
                "calib_batches": 2,
                "first": {"weight_bits": 8},
                "last": {"weight_bits": 8},
            },
        },
        {"name": "final", "kind": "evaluate"},
    ],
}


def tiny(**changes):
    r = copy.deepcopy(TINY)
    r.update(changes)
    return r


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("path", RECIPES, ids=[os.path.basename(p) for p in RECIPES])
def test_every_recipe_validates(path):
    r = load_recipe(path)
    assert r.stages and r.name


def test_recipes_dir_is_not_empty():
    assert any(p.endswith("quickstart.yaml") for p in RECIPES)


def test_tiny_validates_and_dumps():
    r = validate(tiny(), "tiny.yaml")
    # a recipe that quantizes gets an export stage at the end
    assert [s.name for s in r.stages] == ["teacher", "kd", "qat8", "qat4", "final", "export"]
    assert r.stage("kd").optimizer["no_bias_decay"] is True
    d = r.to_dict()
    assert validate(d, "again.yaml").to_dict() == d  # the resolved form validates to itself


def _stage(i, **kv):
    r = tiny()
    r["stages"][i].update(kv)
    return r


def _drop(i, key):
    r = tiny()
    del r["stages"][i][key]
    return r


BAD = [
    # (recipe, expected fragments of the message)
    (tiny(stagez=[]), ["bad.yaml", "unknown key 'stagez'"]),
    (_stage(1, epoch=3), ["bad.yaml", "stages[1] 'kd'", "unknown key 'epoch'", "did you mean 'epochs'"]),
    (_stage(1, epochs="3"), ["stages[1] 'kd'", "'epochs' must be an integer"]),
    (_stage(1, epochs=0), ["stages[1] 'kd'", "'epochs' must be >= 1"]),
    (_drop(1, "epochs"), ["stages[1] 'kd'", "missing required key 'epochs'"]),
    (_drop(1, "distill"), ["stages[1] 'kd'", "missing required key 'distill'"]),
    (_drop(2, "quantize"), ["stages[2] 'qat8'", "missing required key 'quantize'"]),
    (_stage(1, kind="distil"), ["stages[1] 'kd'", "'kind' must be one of", "did you mean 'distill'"]),
    (_stage(1, optimizer={"name": "adamw", "lr": -1}), ["stages[1] 'kd'", "'lr' must be > 0"]),
    (_stage(1, optimizer={"name": "adamw", "lr": 1e-3, "momentum": 0.9}), ["stages[1] 'kd'", "unknown key 'momentum'"]),
    (_stage(1, optimizer={"name": "rmsprop", "lr": 1e-3}), ["stages[1] 'kd'", "'name' must be one of"]),
    (_stage(1, schedule={"name": "warmup_cosine", "warmup_epoch": 1}), ["stages[1] 'kd'", "schedule", "warmup_epoch"]),
    (_stage(1, distill={"kind": "hinton", "alpha": 2.0}), ["stages[1] 'kd'", "distill", "alpha"]),
    (_stage(2, quantize={"weight_bits": 17}), ["stages[2] 'qat8'", "quantize", "weight_bits"]),
    (_stage(2, quantize={"weight_bits": 4, "bits": 4}), ["stages[2] 'qat8'", "quantize", "bits"]),
    (_stage(4, epochs=3), ["stages[4] 'final'", "'epochs' does not apply to a 'evaluate' stage"]),
    (_stage(4, amp=True), ["stages[4] 'final'", "'amp' does not apply"]),
    (_stage(4, batch_size=8), ["stages[4] 'final'", "'batch_size' does not apply"]),
    (_stage(0, batch_size=0), ["stages[0] 'teacher'", "'batch_size' must be >= 1"]),
    (
        _stage(0, distill="kldiv:1"),
        ["stages[0] 'teacher'", "'distill' is not supported on a stage with target 'teacher'"],
    ),
    (_stage(1, name="teacher"), ["stages[1] 'teacher'", "duplicate stage name"]),
    (_stage(1, name="k d"), ["stages[1] 'k d'", "'name' must match"]),
    (
        tiny(stages=[s for s in TINY["stages"] if s["name"] != "teacher"]),
        ["stages[0] 'kd'", "'distill' needs a trained teacher"],
    ),
    (tiny(teacher=None), ["target 'teacher' but the recipe has no 'teacher' section"]),
    (tiny(model={"name": "mobilenet", "args": {}}), ["model", "unknown model 'mobilenet'", "did you mean"]),
    (tiny(model={"name": "mobilenet_student", "args": {"width": 1}}), ["model.args", "takes no argument 'width'"]),
    (tiny(model={"name": "mobilenet_student", "args": {"width_mult": -1.0}}), ["model.args", "width_mult"]),
    (
        tiny(model={"name": "mobilenet_student", "args": {"num_classes": 3}}),
        ["model.args", "'num_classes' is set from the dataset"],
    ),
    (tiny(data={"dataset": "fashion-mnistt"}), ["data", "unknown dataset"]),
    (tiny(data={"dataset": "synthetic", "batch_size": 0}), ["data", "'batch_size' must be >= 1"]),
    (tiny(kernel_backend="fast"), ["'kernel_backend' must be one of"]),
    (tiny(stages=[]), ["stages", "non-empty list"]),
    (tiny(stages={"a": 1}), ["stages", "non-empty list"]),
    ({k: v for k, v in TINY.items() if k != "model"}, ["missing required key 'model'"]),
    ([1, 2], ["top level"]),
]


@pytest.mark.parametrize("raw,fragments", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_recipe_names_file_stage_and_key(raw, fragments):
    with pytest.raises(RecipeError) as info:
        validate(raw, "bad.yaml")
    msg = str(info.value)
    assert msg.startswith("bad.yaml"), msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("stages: [\n")
    with pytest.raises(RecipeError, match="broken.yaml: not valid YAML"):
        load_recipe(str(p))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_overrides():
    raw = apply_overrides(
        TINY,
        ["kd.epochs=5", "data.batch_size=8", "seed=9", "qat4.optimizer.lr=0.01", "kd.distill={kind: kldiv, weight: 1}"],
    )
    r = validate(raw, "x.yaml")
    assert r.stage("kd").epochs == 5 and r.data.batch_size == 8 and r.seed == 9
    assert r.stage("qat4").optimizer["lr"] == 0.01 and r.stage("kd").distill["kind"] == "kldiv"
    assert TINY["stages"][1]["epochs"] == 2  # the input is not modified
    with pytest.raises(RecipeError, match="neither a top-level key"):
        apply_overrides(TINY, ["qat5.epochs=1"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        apply_overrides(TINY, ["kd.epochs"])
    with pytest.raises(RecipeError, match="'epochs' must be an integer"):
        validate(apply_overrides(TINY, ["kd.epochs=two"]), "x.yaml")


# ------------------------------------------------------------------------------ running
def _final_state(out):
    model, ckpt = load_model(os.path.join(out, "stages", "03-qat4", "best.pt"))
    return model.state_dict(), ckpt


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    path = write_recipe(tmp, TINY)
    out = str(tmp / "out")
    res = run_cli(["run", path, "--out", out, "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    return path, out, res


def test_tiny_recipe_runs_end_to_end(uninterrupted):
    path, out, res = uninterrupted
    for f in [
        "recipe.yaml",
        "run.json",
        "report.md",
        "report.json",
        "stages/00-teacher/best.pt",
        "stages/00-teacher/checkpoint.pt",
        "stages/00-teacher/metrics.csv",
        "stages/00-teacher/curves.png",
        "stages/03-qat4/metrics.jsonl",
    ]:
        assert os.path.exists(os.path.join(out, f)), f
    report = json.load(open(os.path.join(out, "report.json")))
    assert [s["name"] for s in report["stages"]] == ["teacher", "kd", "qat8", "qat4", "final", "export"]
    assert all(s["status"] == "done" for s in report["stages"])
    st = report["student"]
    assert st["stage"] == "export" and st["quantized"] and 0 <= st["top1"] <= 100
    assert st["size_bytes"] == st["file_bytes"] == os.path.getsize(os.path.join(out, "model.pcz"))
    assert st["size_bytes"] < st["fp32_bytes"]
    assert report["teacher"]["top1"] is not None
    # the metrics log has one row per epoch with the columns users plot
    rows = open(os.path.join(out, "stages/00-teacher/metrics.csv")).read().splitlines()
    assert rows[0].startswith("epoch,lr,train_loss,train_top1,train_top5,eval_loss,eval_top1,eval_top5")
    assert len(rows) == 3
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["stages"]["teacher"]["result"]["steps"] == 4  # 2 epochs x (64 / batch_size 32)
    assert run["stages"]["kd"]["result"]["steps"] == 8  # data.batch_size 16
    jl = [json.loads(line) for line in open(os.path.join(out, "stages/03-qat4/metrics.jsonl"))]
    assert [r["epoch"] for r in jl] == [1, 2]
    md = open(os.path.join(out, "report.md")).read()
    assert "| student (export) |" in md and "qat4" in md
    # the 4-bit checkpoint rebuilds as a QAT model and evaluates from the CLI
    state, ckpt = _final_state(out)
    assert ckpt["arch"]["qat"] and any("weight_quant" in k for k in state)
    ev = run_cli(["eval", os.path.join(out, "stages/03-qat4/best.pt"), "--json", os.path.join(out, "eval.json")])
    assert ev.returncode == 0, ev.stderr
    got = json.load(open(os.path.join(out, "eval.json")))
    assert got["top1"] == pytest.approx(report["stages"][3]["best_top1"])


def test_existing_run_dir_needs_resume(uninterrupted):
    path, out, _ = uninterrupted
    res = run_cli(["run", path, "--out", out])
    assert res.returncode == 2 and "already holds a run; pass --resume" in res.stderr
    # resuming a finished run is a no-op that rewrites the report
    res = run_cli(["run", path, "--out", out, "--resume"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("already done, skipped") == 6
    # a changed recipe is refused
    res = run_cli(["run", path, "--out", out, "--resume", "--set", "qat4.epochs=3"])
    assert res.returncode == 2 and "the recipe changed" in res.stderr and "qat4" in res.stderr


def test_killed_mid_stage_resumes_to_the_same_result(uninterrupted, tmp_path):
    path, ref_out, ref_res = uninterrupted
    out = str(tmp_path / "out")
    # Each stage has 4 steps per epoch (64 samples / 16). PYCOMPRESS_DEBUG_KILL_AT=qat4:6 makes the
    # process SIGKILL itself after qat4's 6th step: in its second epoch, after its first checkpoint.
    res = run_cli(["run", path, "--out", out], env_extra={"PYCOMPRESS_DEBUG_KILL_AT": "qat4:6"})
    assert res.returncode == -9, res.stdout + res.stderr
    run = json.load(open(os.path.join(out, "run.json")))
    assert run["stages"]["qat4"]["status"] == "running"
    assert os.path.exists(os.path.join(out, "stages/03-qat4/checkpoint.pt"))  # epoch 1 finished
    res = run_cli(["run", path, "--out", out, "--resume"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "resumed from" in res.stdout and res.stdout.count("already done, skipped") == 3
    a, _ = _final_state(ref_out)
    b, _ = _final_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra = json.load(open(os.path.join(ref_out, "report.json")))
    rb = json.load(open(os.path.join(out, "report.json")))
    assert ra["student"]["top1"] == rb["student"]["top1"]
    for sa, sb in zip(ra["stages"], rb["stages"]):
        for key in ("best_top1", "final_top1", "top1", "size_bytes"):
            assert sa.get(key) == sb.get(key), (sa["name"], key)


def test_kill_before_first_checkpoint_restarts_the_stage(uninterrupted, tmp_path):
    path, ref_out, _ = uninterrupted
    out = str(tmp_path / "out")
    res = run_cli(["run", path, "--out", out], env_extra={"PYCOMPRESS_DEBUG_KILL_AT": "qat8:2"})
    assert res.returncode == -9
    assert not os.path.exists(os.path.join(out, "stages/02-qat8/checkpoint.pt"))
    res = run_cli(["run", path, "--out", out, "--resume"])
    assert res.returncode == 0, res.stderr
    a, _ = _final_state(ref_out)
    b, _ = _final_state(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    raw = tiny(
        stages=[
            {"name": "boom", "kind": "train", "epochs": 3, "optimizer": {"name": "sgd", "lr": 1e30, "momentum": 0.9}}
        ]
    )
    r = validate(raw, "nan.yaml")
    from pycompress.train import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"stage 'boom': loss is (nan|inf)"):
        run_recipe(r, str(tmp_path / "out"), progress=False, log=lambda s: None)


def test_run_refuses_unavailable_backend(tmp_path):
    r = validate(tiny(kernel_backend="cuda"), "x.yaml")
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(RunError, match="kernel backend 'cuda' is not available"):
        run_recipe(r, str(tmp_path / "o"), progress=False, log=lambda s: None)


def test_check_cli(tmp_path):
    good = write_recipe(tmp_path, TINY, "good.yaml")
    bad = write_recipe(tmp_path, _stage(1, epoch=3), "bad.yaml")
    res = run_cli(["check", good])
    assert res.returncode == 0 and "ok" in res.stdout
    res = run_cli(["check", good, bad])
    assert res.returncode == 1 and "bad.yaml: stages[1] 'kd': unknown key 'epoch'" in res.stderr


def test_progress_bar_does_not_change_the_data_order():
    from pycompress.data import make_loaders
    from pycompress.train.trainer import _progress

    tr, _, _ = make_loaders("synthetic", batch_size=16, length=64, image_size=8, in_channels=1, num_classes=4)
    orders = []
    for enabled in (False, True, None):
        tr.generator.manual_seed(5)
        orders.append([y.tolist() for _, y in _progress(tr, 4, "x", enabled)])
    assert orders[0] == orders[1] == orders[2]
