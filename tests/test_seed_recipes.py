"""The seed systems' recipes (SPEC.md sections 1-3): every one validates, and the MicroNet pipeline
runs end to end on tiny generated CIFAR-100 pickles (the real on-disk format) with the recipe's own
stages, only sizes and epochs shrunk."""

from __future__ import annotations

import copy
import json
import os
import pickle

import numpy as np
import pytest
import torch
import yaml

from pycompress.recipe import load_recipe
from tests.helpers import ROOT, run_cli, write_recipe

SEED_RECIPES = [
    "micronet_cifar100.yaml",
    "micronet_fashion.yaml",
    "hw7_food11.yaml",
    "hw7_fashion.yaml",
    "deephoyer_lenet300.yaml",
    "deephoyer_lenet5.yaml",
    "deephoyer_cifar.yaml",
]


@pytest.mark.parametrize("name", SEED_RECIPES)
def test_seed_recipe_validates(name):
    r = load_recipe(os.path.join(ROOT, "recipes", name))
    assert r.stages and r.stages[-1].kind == "export"


def _write_cifar100(root, n_train=32, n_test=12):
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", n_train), ("test", n_test)):
        x = rng.randint(0, 256, size=(n, 3072)).astype(np.uint8)
        y = rng.randint(0, 100, n).tolist()
        with open(d / split, "wb") as f:
            pickle.dump({b"data": x, b"fine_labels": y, b"coarse_labels": [0] * n}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)]}, f)


def _short_stages(raw: dict) -> dict:
    """The recipe's stages as they are, each one epoch (no schedule), a short BN recalibration and
    mask regrowth (in place; returns raw)."""
    for s in raw["stages"]:
        if "epochs" in s:
            s["epochs"] = 1
        if s.get("kind") == "bn_recalibrate":
            s.update(batches=2, rounds=1)
        p = s.get("prune") or {}
        if "update_stop" in p:
            p.update(update_interval=2, update_stop=3)
        s.pop("schedule", None)
    return raw


def _shrunk(raw: dict) -> dict:
    """The MicroNet recipe's stages as they are, with tiny models, batches and epochs."""
    raw = copy.deepcopy(raw)
    raw["data"].update(batch_size=8, eval_batch_size=12, num_workers=0)
    raw["model"]["args"] = {"depth": 10, "growth_rate": 4}
    raw["teacher"]["args"] = {"depth": 10, "growth_rate": 6}
    return _short_stages(raw)


def _run(tmp_path, raw: dict, data):
    """Run ``raw`` on the generated ``data``: (run directory, CLI result, report)."""
    if raw["data"].get("validation"):  # the shipped recipes hold out images; the generated sets are tiny
        raw["data"]["validation"] = 6
    path = write_recipe(tmp_path, raw)
    out = str(tmp_path / "run")
    res = run_cli(["run", path, "--out", out, "--data-root", str(data), "--no-progress"])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out, res, json.load(open(os.path.join(out, "report.json")))


def _recipe(name: str) -> dict:
    return yaml.safe_load(open(os.path.join(ROOT, "recipes", name)))


def _state(out, stage):
    return torch.load(os.path.join(out, "stages", stage, "best.pt"), map_location="cpu", weights_only=False)


def test_micronet_cifar100_pipeline_on_generated_cifar100(tmp_path):
    data = tmp_path / "data"
    _write_cifar100(data)
    out, res, report = _run(tmp_path, _shrunk(_recipe("micronet_cifar100.yaml")), data)
    stages = {s["name"]: s for s in report["stages"]}
    assert all(s["status"] == "done" for s in stages.values())
    # every stage's MicroNet score, and the final one in the report
    for name in ("student", "prune", "act4", "weight4", "bn_recal", "fc_prune", "fc_quant"):
        assert stages[name]["micronet"]["score"] > 0, name
    assert report["student"]["micronet"]["score"] < stages["student"]["micronet"]["score"]
    md = open(os.path.join(out, "report.md")).read()
    assert "MicroNet score of the final model" in md and "| MicroNet score |" in md
    # the artifacts: fp32 codes (.pcz) and fp16, each evaluated on the test set
    arts = {a["format"]: a for a in report["artifacts"]}
    assert set(arts) == {"pcz", "fp16"} and all(a["top1"] is not None for a in arts.values())
    # the final model: 4-bit ALS conv weights (first conv: float input), 4-bit conv inputs, a 6-bit
    # classifier with a float input; convs 75% pruned (global), the classifier 50%
    ck = _state(out, "07-fc_quant")
    plan = ck["arch"]["qat"]
    convs = {n: p for n, p in plan.items() if n != "fc"}
    first = next(iter(convs))
    assert first == "conv1" and convs[first]["weight_bits"] == 4 and convs[first]["act_bits"] is None
    assert all(
        p["weight_bits"] == 4 and p["act_bits"] == 4 and p["weight_scale"] == "als"
        for n, p in convs.items()
        if n != first
    )
    assert plan["fc"]["weight_bits"] == 6 and plan["fc"]["act_bits"] is None
    from pycompress.recipe import load_model

    model, _ = load_model(os.path.join(out, "stages", "07-fc_quant", "best.pt"))
    from pycompress.prune import get_mask, masked_layers

    masks = {n: get_mask(m) for n, m in masked_layers(model).items()}
    conv_keep = sum(int(m.sum()) for n, m in masks.items() if n != "fc")
    conv_total = sum(m.numel() for n, m in masks.items() if n != "fc")
    assert conv_keep / conv_total == pytest.approx(0.25, abs=0.01)
    assert float(masks["fc"].float().mean()) == pytest.approx(0.5, abs=0.01)
    # the FC steps trained the classifier alone: every other tensor as bn_recal left it
    before, after = _state(out, "05-bn_recal")["model"], ck["model"]
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("fc.") for k in changed)
    assert "[fc_prune] trains only fc" in res.stdout


def _write_food11(root, per_class=2, size=(40, 36)):
    from PIL import Image

    rng = np.random.RandomState(1)
    for folder, n in (("training", per_class), ("validation", 1)):
        (root / folder).mkdir(parents=True)
        for c in range(11):
            for k in range(n):
                px = rng.randint(0, 256, size=size[::-1] + (3,)).astype(np.uint8)
                Image.fromarray(px).save(root / folder / f"{c}_{k}.jpg")
    (root / "testing").mkdir()


def test_hw7_food11_pipeline_on_a_generated_folder(tmp_path):
    pytest.importorskip("torch_pruning", reason="the slim stage needs torch-pruning (installed by scripts/setup.sh)")
    data = tmp_path / "food"
    _write_food11(data)
    raw = _recipe("hw7_food11.yaml")
    raw["data"].update(batch_size=8, eval_batch_size=11, num_workers=0, options={"image_size": 32})
    _, _, report = _run(tmp_path, _short_stages(raw), data)
    stages = {s["name"]: s for s in report["stages"]}
    slim = stages["slim"]["slim"]
    assert len(slim["rounds"]) == 5 and slim["params_ratio"] < 0.9  # 5 rounds of width x 0.95, physically smaller
    arts = {a["format"]: a for a in report["artifacts"]}
    assert set(arts) == {"pcz", "fp16", "uint8"}
    b32, b16, b8 = arts["pcz"]["file_bytes"], arts["fp16"]["file_bytes"], arts["uint8"]["file_bytes"]
    assert b8 < b16 < b32 and all(a["top1"] is not None for a in arts.values())
    assert report["data"]["num_classes"] == 11


def _write_cifar10(root, n_train=24, n_test=10):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.RandomState(2)

    def arrays(n):
        return rng.randint(0, 256, size=(n, 3072)).astype(np.uint8), rng.randint(0, 10, n).tolist()

    for i in range(1, 6):
        x, y = arrays(n_train // 5 + 1)
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": x, b"labels": y}, f)
    x, y = arrays(n_test)
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": x, b"labels": y}, f)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


def test_deephoyer_cifar_pipeline_on_generated_cifar10(tmp_path):
    data = tmp_path / "data"
    _write_cifar10(data)
    raw = _recipe("deephoyer_cifar.yaml")
    raw["data"].update(batch_size=8, eval_batch_size=10, num_workers=0)
    raw["model"]["args"] = {"depth": 8}
    out, _, report = _run(tmp_path, _short_stages(raw), data)
    assert report["student"]["sparsity"]["selected"] > 0  # the std-ratio threshold pruned something
    assert os.path.exists(os.path.join(out, "stages", "01-prune", "sparsity.txt"))
