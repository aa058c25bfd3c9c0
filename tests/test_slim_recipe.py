"""Network slimming in recipes: sparsity training with bn_l1, a slim stage in rounds (a new optimizer
per round, the best of each round kept), then QAT and export of the smaller network; the checkpoint
and the artifact rebuild it; an interrupted round resumes to the same result."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from pycompress import export
from pycompress.recipe import RecipeError, load_model, run_recipe, validate
from tests.helpers import run_cli, write_recipe

pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (installed by scripts/setup.sh)")

SLIM = {
    "name": "tiny-slim",
    "seed": 1,
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 64},
    },
    "model": {"name": "mobilenet_student", "args": {"width_mult": 0.5}},
    "stages": [
        {
            "name": "float",
            "kind": "train",
            "epochs": 2,
            "optimizer": {"name": "adamw", "lr": 3e-3},
            "prune": {"regularizer": "bn_l1", "strength": 1.0e-3},
        },
        {
            "name": "slim",
            "kind": "slim",
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "slim": {"criterion": "bn_gamma", "ratio": 0.5, "rounds": 2, "round_to": 4},
        },
        {
            "name": "qat4",
            "kind": "quantize",
            "epochs": 1,
            "optimizer": {"name": "adamw", "lr": 5e-4},
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 1},
        },
    ],
}


@pytest.fixture(scope="module")
def slim_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slim")
    path = write_recipe(tmp, SLIM, "slim.yaml")
    out = str(tmp / "out")
    res = run_cli(["run", path, "--out", out, "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    return path, out, res


def test_slim_stage_shrinks_the_network(slim_run):
    path, out, res = slim_run
    report = json.load(open(os.path.join(out, "report.json")))
    st = {s["name"]: s for s in report["stages"]}
    sl = st["slim"]["slim"]
    assert [r["round"] for r in sl["rounds"]] == [1, 2]
    assert sl["rounds"][1]["params"] < sl["rounds"][0]["params"] < sl["before"]["params"]
    assert st["slim"]["params"] == sl["rounds"][1]["params"] and 0.2 < sl["params_ratio"] < 0.6
    assert st["slim"]["macs"] < 0.6 * sl["before"]["macs"]
    for key in ("macs", "latency_ms"):
        assert st["float"][key] > 0 and st["qat4"][key] > 0
    assert st["qat4"]["macs"] == st["slim"]["macs"]  # QAT does not change the work
    for r in (1, 2):
        assert os.path.exists(os.path.join(out, "stages", "01-slim", f"round-{r}", "best.pt"))
    md = open(os.path.join(out, "report.md")).read()
    assert "Slimming (slim: bn_gamma, 2 round(s)" in md and "| MACs (M) |" in md
    assert "slimmed (bn_gamma" in res.stdout


def test_slimmed_checkpoints_and_artifact_rebuild(slim_run, tmp_path):
    path, out, _ = slim_run
    report = json.load(open(os.path.join(out, "report.json")))
    st = {s["name"]: s for s in report["stages"]}
    model, ckpt = load_model(os.path.join(out, st["qat4"]["best"]))
    assert ckpt["arch"]["slim"] and ckpt["arch"]["qat"]
    assert sum(p.numel() for n, p in model.named_parameters() if "quant" not in n) == st["qat4"]["params"]
    art = export.load(os.path.join(out, "model.pcz"))
    assert art.artifact.manifest["arch"]["slim"] == ckpt["arch"]["slim"]
    x = torch.randn(8, 1, 16, 16)
    with torch.no_grad():
        assert (art(x).argmax(1) == model.eval()(x).argmax(1)).float().mean() >= 0.75
    assert {a["format"]: a for a in report["artifacts"]}["pcz"]["agreement"] >= 0.95
    res = run_cli(["eval", os.path.join(out, st["slim"]["best"]), "--json", str(tmp_path / "e.json")])
    assert res.returncode == 0, res.stderr
    assert json.load(open(tmp_path / "e.json"))["top1"] == pytest.approx(st["slim"]["best_top1"])


def test_interrupted_round_resumes_to_the_same_result(slim_run, tmp_path):
    path, ref_out, _ = slim_run
    out = str(tmp_path / "out")
    res = run_cli(["run", path, "--out", out, "--no-progress"], env_extra={"PYCOMPRESS_DEBUG_KILL_AT": "slim-r2:2"})
    assert res.returncode == -9, res.stdout + res.stderr
    res = run_cli(["run", path, "--out", out, "--no-progress", "--resume"])
    assert res.returncode == 0, res.stdout + res.stderr
    a = json.load(open(os.path.join(ref_out, "report.json")))
    b = json.load(open(os.path.join(out, "report.json")))
    for sa, sb in zip(a["stages"], b["stages"]):
        for key in ("best_top1", "params", "macs", "top1"):
            assert sa.get(key) == sb.get(key), (sa["name"], key)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda r: r["stages"][1].update(quantize={"weight_bits": 4}), "'slim' and 'quantize' in one stage"),
        (
            lambda r: r["stages"].insert(
                1,
                {
                    "name": "q",
                    "kind": "quantize",
                    "epochs": 1,
                    "optimizer": {"name": "sgd", "lr": 0.1},
                    "quantize": {"weight_bits": 8},
                },
            ),
            "after the student was quantized in stage 'q'",
        ),
        (lambda r: r["stages"][1]["slim"].update(ratio=1.5), "ratio"),
        (lambda r: r["stages"][1]["slim"].update(criterio="l1"), "unknown key"),
        (lambda r: r["stages"][1].pop("slim"), "missing required key 'slim'"),
        (lambda r: r["stages"][0]["prune"].update(regularizer="bn_l2"), "regularizer"),
    ],
)
def test_bad_slim_recipes(edit, match):
    raw = copy.deepcopy(SLIM)
    edit(raw)
    with pytest.raises(RecipeError, match=match):
        validate(raw, "bad.yaml")


def test_bn_l1_pushes_gammas_down(tmp_path):
    raw = copy.deepcopy(SLIM)
    raw["stages"] = [raw["stages"][0]]
    raw["auto_export"] = False
    plain = copy.deepcopy(raw)
    plain["stages"][0].pop("prune")
    a = run_recipe(validate(raw, "a.yaml"), str(tmp_path / "a"), progress=False, log=lambda s: None)
    b = run_recipe(validate(plain, "b.yaml"), str(tmp_path / "b"), progress=False, log=lambda s: None)
    ma, _ = load_model(os.path.join(tmp_path / "a", a["stages"][0]["best"]))
    mb, _ = load_model(os.path.join(tmp_path / "b", b["stages"][0]["best"]))
    ga = sum(float(m.weight.detach().abs().sum()) for m in ma.modules() if isinstance(m, torch.nn.BatchNorm2d))
    gb = sum(float(m.weight.detach().abs().sum()) for m in mb.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert ga < gb


def test_slim_settings_fail_before_training(tmp_path):
    from pycompress.recipe import RunError

    raw = copy.deepcopy(SLIM)
    raw["stages"][1]["slim"]["exclude"] = ["cnn"]  # every channel group holds an excluded layer
    with pytest.raises(RunError, match="stage 'slim': nothing to prune"):
        run_recipe(validate(raw, "x.yaml"), str(tmp_path / "out"), progress=False, log=lambda s: None)
    assert not os.path.exists(tmp_path / "out" / "stages")
