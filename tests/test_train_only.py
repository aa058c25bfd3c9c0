"""train_only: MicroNet's FC stage trains the classifier alone, every other layer frozen and in eval
mode (BatchNorm statistics fixed)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pycompress.recipe import RecipeError, validate
from pycompress.train import Trainer, freeze_except
from tests.helpers import run_cli, write_recipe


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 36, 3)
    )


def test_freeze_except_trains_the_classifier_alone():
    net = _net()
    info = freeze_except(net, ["^5$"])
    assert info["trainable"] == ["5"] and info["trainable_params"] == 4 * 36 * 3 + 3
    assert sorted(info["frozen"]) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    assert net[1] in info["eval_modules"] and net[3] in info["eval_modules"] and net not in info["eval_modules"]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    tr = Trainer(
        net,
        DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True, generator=torch.Generator()),
        epochs=2,
        optimizer={"name": "sgd", "lr": 0.1},
        eval_modules=info["eval_modules"],
        log=lambda line: None,
        progress=False,
    )
    tr.fit()
    after = net.state_dict()
    for k in before:  # conv weights and BatchNorm statistics untouched, the classifier trained
        same = torch.equal(before[k], after[k])
        assert same == (not k.startswith("5.")), k


def test_freeze_except_errors():
    with pytest.raises(ValueError, match="no module of the model matches.*top-level modules"):
        freeze_except(_net(), ["^fc$"])
    with pytest.raises(ValueError, match="no trainable parameter"):
        freeze_except(_net(), ["^2$"])  # the ReLU


TINY = {
    "name": "tiny-fc",
    "seed": 1,
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "augment": False,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 64},
    },
    "model": {"name": "lenet5", "args": {"input_size": 16}},
    "auto_export": False,
    "stages": [
        {"name": "train", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05}},
        {
            "name": "fc",
            "kind": "prune",
            "epochs": 1,
            "train_only": ["^fc2$"],
            "optimizer": {"name": "sgd", "lr": 0.01},
            "prune": {"criterion": "layer_magnitude", "sparsity": 0.5, "include": ["^fc2$"]},
        },
    ],
}


def test_recipe_fc_stage(tmp_path):
    out = str(tmp_path / "run")
    res = run_cli(["run", write_recipe(tmp_path, TINY), "--out", out, "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[fc] trains only fc2" in res.stdout

    def state(stage):
        return torch.load(os.path.join(out, "stages", stage, "best.pt"), weights_only=False)["model"]

    a, b = state("00-train"), state("01-fc")
    for k in a:
        assert torch.equal(a[k], b[k]) == (not k.startswith("fc2.")), k
    assert float((b["fc2.weight"] == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_recipe_validation():
    bad = dict(TINY, stages=[dict(TINY["stages"][0], train_only=["(unclosed"])])
    with pytest.raises(RecipeError, match="'train_only': '\\(unclosed' is not a valid regex"):
        validate(bad)
    bad = dict(TINY, stages=[TINY["stages"][0], {"name": "e", "kind": "evaluate", "train_only": ["fc"]}])
    with pytest.raises(RecipeError, match="'train_only' does not apply to a 'evaluate' stage"):
        validate(bad)
    r = validate(dict(TINY, stages=[dict(TINY["stages"][0], train_only="fc2")]))
    assert r.stages[0].train_only == ["fc2"]
