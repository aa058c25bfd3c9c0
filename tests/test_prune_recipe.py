"""Pruning in recipes: a small recipe prunes under KD to 75% (MicroNet's regrowing masks), fine-tunes
with 4-bit QAT and the masks fixed, reports the sparsity, and resumes bit-identically after a kill."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import yaml

from pycompress.prune import get_mask, masked_layers
from pycompress.recipe import RecipeError, load_model, validate
from tests.helpers import run_cli, write_recipe

PRUNE_TINY = {
    "name": "tiny-prune",
    "seed": 5,
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
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.05},
        },
        {
            "name": "kd",
            "kind": "distill",
            "epochs": 1,
            "optimizer": {"name": "adamw", "lr": 2e-3},
            "distill": "kldiv:1",
        },
        {
            "name": "prune",
            "kind": "prune",
            "epochs": 2,
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
            "distill": "kldiv:1",
            "prune": {
                "criterion": "global_magnitude",
                "sparsity": 0.75,
                "schedule": "regrow",
                "update_interval": 2,
                "types": ["conv"],
            },
        },
        {
            "name": "ft4",
            "kind": "finetune",
            "epochs": 2,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "distill": "kldiv:1",
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 1},
        },
        {"name": "final", "kind": "evaluate"},
    ],
}
SELECTED = None


def _state(out, stage="03-ft4"):
    model, ckpt = load_model(os.path.join(out, "stages", stage, "best.pt"))
    return model, ckpt


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prune")
    path = write_recipe(tmp, PRUNE_TINY)
    out = str(tmp / "out")
    res = run_cli(["run", path, "--out", out, "--no-progress"])
    assert res.returncode == 0, res.stdout + res.stderr
    return path, out, res


def test_prune_recipe_reports_75_percent_and_keeps_zeros(pruned_run):
    path, out, res = pruned_run
    assert "regrow start: global_magnitude masks" in res.stdout and "masks frozen at step 8" in res.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    stages = {s["name"]: s for s in report["stages"]}
    for name in ("prune", "ft4"):
        sp = stages[name]["sparsity"]
        assert sp["selected"] == pytest.approx(0.75, abs=0.002), name
        assert 0 < sp["overall"] < sp["selected"]
    assert report["student"]["sparsity"]["selected"] == pytest.approx(0.75, abs=0.002)
    for f in ("stages/02-prune/sparsity.txt", "stages/02-prune/sparsity.json", "stages/03-ft4/sparsity.json"):
        assert os.path.exists(os.path.join(out, f)), f
    sj = json.load(open(os.path.join(out, "stages/02-prune/sparsity.json")))
    assert sj["selected"]["sparsity"] == pytest.approx(stages["prune"]["sparsity"]["selected"])
    md = open(os.path.join(out, "report.md")).read()
    assert "Sparsity: 75." in md and "| sparsity |" in md
    # the 4-bit fine-tuned model kept every pruned weight at exactly 0, also after quantization
    model, ckpt = _state(out)
    layers = masked_layers(model)
    assert layers and all(type(m).__name__ == "QuantConv2d" for m in layers.values())
    for n, m in layers.items():
        keep = get_mask(m)
        assert bool((m.weight.detach()[~keep] == 0).all()) and bool((m.quantized_weight()[~keep] == 0).all()), n
        assert "weight_shadow" not in m._buffers
    # the masks were chosen once in the prune stage: fine-tuning did not change them
    prune_model, _ = _state(out, "02-prune")
    for n, m in masked_layers(prune_model).items():
        assert torch.equal(get_mask(m), get_mask(layers[n])), n
    # the size counts a mask plus 4-bit codes for the pruned layers: smaller than dense 4-bit
    assert stages["ft4"]["size_bytes"] < stages["kd"]["fp32_bytes"] / 8
    ev = run_cli(["eval", os.path.join(out, "stages/03-ft4/best.pt"), "--json", os.path.join(out, "e.json")])
    assert ev.returncode == 0, ev.stderr
    assert json.load(open(os.path.join(out, "e.json")))["top1"] == pytest.approx(stages["ft4"]["best_top1"])


def test_prune_recipe_killed_mid_regrow_resumes_bit_identical(pruned_run, tmp_path):
    path, ref_out, _ = pruned_run
    out = str(tmp_path / "out")
    # 4 steps per epoch: step 6 is in the prune stage's second epoch, masks still regrowing
    res = run_cli(["run", path, "--out", out], env_extra={"PYCOMPRESS_DEBUG_KILL_AT": "prune:6"})
    assert res.returncode == -9, res.stdout + res.stderr
    ck = torch.load(os.path.join(out, "stages/02-prune/checkpoint.pt"), weights_only=True)
    assert any(k.endswith("weight_shadow") for k in ck["model"])  # the dense shadows were saved
    res = run_cli(["run", path, "--out", out, "--resume"])
    assert res.returncode == 0, res.stdout + res.stderr
    for stage in ("02-prune", "03-ft4"):
        a = _state(ref_out, stage)[0].state_dict()
        b = _state(out, stage)[0].state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (stage, k)


def _bad(**stage_changes):
    r = copy.deepcopy(PRUNE_TINY)
    r["stages"][2].update(stage_changes)
    return r


@pytest.mark.parametrize(
    "raw,parts",
    [
        (_bad(prune=None), ["stages[2] 'prune'", "missing required key 'prune'"]),
        (_bad(prune={"criterion": "global_magnitude"}), ["stages[2] 'prune': prune", "sparsity"]),
        (
            _bad(prune={"criterion": "global_magnitude", "sparsity": 0.5, "shedule": "regrow"}),
            ["stages[2] 'prune': prune", "shedule: unknown key"],
        ),
        (
            _bad(prune={"criterion": "global_magnitude", "sparsity": 0.5, "include": ["^nothing$"]}),
            ["stages[2] 'prune': prune", "selects no layer of model 'mobilenet_student'"],
        ),
        (
            _bad(target="teacher", distill=None),
            ["stages[2] 'prune'", "'prune' is not supported on a stage with target"],
        ),
    ],
)
def test_bad_prune_recipes_name_file_stage_and_key(raw, parts):
    with pytest.raises(RecipeError) as exc:
        validate(raw, "p.yaml")
    msg = str(exc.value)
    assert msg.startswith("p.yaml: ")
    for p in parts:
        assert p in msg, msg


def test_evaluate_stage_refuses_prune():
    raw = copy.deepcopy(PRUNE_TINY)
    raw["stages"][4]["prune"] = {"criterion": "threshold", "threshold": 0.1}
    with pytest.raises(RecipeError, match="'prune' does not apply to a 'evaluate' stage"):
        validate(raw, "p.yaml")


def test_resolved_recipe_spells_out_prune_defaults(pruned_run):
    _, out, _ = pruned_run
    resolved = yaml.safe_load(open(os.path.join(out, "recipe.yaml")))
    pr = resolved["stages"][2]["prune"]
    assert pr["schedule"] == "regrow" and pr["update_stop"] is None and pr["first"] is True


def test_sparsity_cli(pruned_run, tmp_path):
    _, out, _ = pruned_run
    js = str(tmp_path / "s.json")
    res = run_cli(["sparsity", os.path.join(out, "stages/02-prune/best.pt"), "--json", js])
    assert res.returncode == 0, res.stderr
    assert "compression rate" in res.stdout and "selected (" in res.stdout
    assert json.load(open(js))["selected"]["sparsity"] == pytest.approx(0.75, abs=0.002)
    res = run_cli(["sparsity", os.path.join(out, "stages/02-prune/best.pt"), "--markdown"])
    assert res.returncode == 0 and res.stdout.startswith("|")
    res = run_cli(["sparsity", str(tmp_path / "missing.pt")])
    assert res.returncode == 2 and "does not exist" in res.stderr
