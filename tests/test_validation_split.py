"""data.validation: a seeded hold-out of training images chooses best epochs and rounds; the test
set is evaluated once per stage for the report (issue 17)."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import torch
import yaml

from pycompress import data as D
from pycompress.recipe import RecipeError, dump_recipe, validate
from pycompress.recipe.runner import RunError, Runner, load_model, run_recipe
from pycompress.train import evaluate


def _write_fashion(root, n_train=40, n_test=10):
    d = root / "fashion-mnist"
    d.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        D.write_idx(d / f"{stem}-images-idx3-ubyte", rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8))
        D.write_idx(d / f"{stem}-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def _raw(**data):
    return {
        "name": "val",
        "data": {"dataset": "fashion_mnist", "batch_size": 8, "eval_batch_size": 16, **data},
        "model": {"name": "lenet5"},
        "stages": [{"name": "t", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.01}}],
    }


def _split(tmp_path, **data):
    r = Runner(validate(_raw(**data)), str(tmp_path / "run"), data_root=str(tmp_path), progress=False)
    r._data()
    return r


def test_split_is_seeded_disjoint_and_not_augmented(tmp_path):
    _write_fashion(tmp_path)
    r = _split(tmp_path, validation=12, augment=True)
    train, val = r.train_set, r.val_loader.dataset
    assert (len(train), len(val)) == (28, 12)
    assert set(train.indices).isdisjoint(val.indices) and sorted(train.indices + val.indices) == list(range(40))
    assert train.indices == sorted(train.indices)  # the loader's generator alone shuffles
    assert train.dataset.augment is not None and val.dataset.augment is None
    plain, _ = D.build_dataset("fashion_mnist", "train", data_root=str(tmp_path), augment=False)
    x, y = val[3]
    assert torch.equal(x, plain[val.indices[3]][0]) and y == plain[val.indices[3]][1]
    assert r.data_desc["val_samples"] == 12 and r.data_desc["train_samples"] == 28 and r.selection == "validation"
    # the recipe seed does not move the split; validation_seed does
    raw = _raw(validation=12)
    raw["seed"] = 5
    r5 = Runner(validate(raw), str(tmp_path / "r5"), data_root=str(tmp_path), progress=False)
    r5._data()
    assert r5.val_loader.dataset.indices == val.indices
    assert _split(tmp_path, validation=12, validation_seed=1).val_loader.dataset.indices != val.indices


def test_no_split_selects_on_the_test_set(tmp_path):
    _write_fashion(tmp_path)
    r = _split(tmp_path)
    assert r.val_loader is None and r.selection == "test" and len(r.train_set) == 40


def test_split_larger_than_the_training_set_is_an_error(tmp_path):
    _write_fashion(tmp_path)
    with pytest.raises(RunError, match=r"data.validation is 40 but the fashion_mnist training split has only 40"):
        _split(tmp_path, validation=40)


def test_schema(tmp_path):
    assert "validation" not in dump_recipe(validate(_raw()))  # runs started before the key resume
    dumped = yaml.safe_load(dump_recipe(validate(_raw(validation=5))))["data"]
    assert dumped["validation"] == 5 and dumped["validation_seed"] == 0
    with pytest.raises(RecipeError, match="'validation' must be >= 0"):
        validate(_raw(validation=-1))
    with pytest.raises(RecipeError, match="'validation_seed' is set but 'validation'"):
        validate(_raw(validation_seed=3))


def test_run_selects_on_validation_and_reports_the_test_set(tmp_path):
    raw = {
        "name": "v",
        "seed": 1,
        "data": {"dataset": "synthetic", "batch_size": 16, "eval_batch_size": 32, "options": {"length": 96}},
        "model": {"name": "mobilenet_student", "args": {"base": 4}},
        "stages": [
            {"name": "t", "kind": "train", "epochs": 3, "optimizer": {"name": "sgd", "lr": 0.05}},
            {"name": "bn", "kind": "bn_recalibrate", "batches": 2, "rounds": 2},
            {"name": "ptq", "kind": "ptq", "quantize": {"weight_bits": 8, "act_bits": 8}},
            {"name": "e", "kind": "evaluate"},
            {"name": "export", "kind": "export", "formats": ["pcz"]},
        ],
    }
    raw["data"]["validation"] = 32
    out = str(tmp_path / "run")
    report = run_recipe(validate(raw), out, progress=False)
    runner = Runner(validate(raw), str(tmp_path / "probe"), progress=False)
    runner._data()
    st = {s["name"]: s for s in report["stages"]}
    rows = list(csv.DictReader(open(os.path.join(out, "stages", "00-t", "metrics.csv"))))
    assert {int(r["eval_samples"]) for r in rows} == {32}  # every epoch evaluated on the 32 held-out images
    best = max(range(len(rows)), key=lambda i: (float(rows[i]["eval_top1"]), -i))
    assert st["t"]["best_epoch"] == best + 1 and st["t"]["val_top1"] == pytest.approx(float(rows[best]["eval_top1"]))
    # the stage's top1 is its best checkpoint on the 96 test images, measured once
    model, _ = load_model(os.path.join(out, st["t"]["best"]))
    ev = evaluate(model, runner.test_loader)
    assert st["t"]["top1"] == pytest.approx(ev["top1"]) and st["t"]["test_samples"] == 96
    for name in ("t", "bn", "ptq", "e"):
        assert st[name]["selection"] == "validation" and st[name]["val_top1"] is not None, name
    assert st["bn"]["rounds"][st["bn"]["best_round"]]["top1"] == st["bn"]["val_top1"]
    assert report["selection"] == "validation" and report["student"]["val_top1"] == st["e"]["val_top1"]
    assert report["student"]["top1"] == st["export"]["top1"]  # measured on the file, on the test set
    md = open(os.path.join(out, "report.md")).read()
    assert "64 train / 32 validation / 96 test images" in md
    assert "chosen on the validation split (32 training images held out, seed 0)" in md
    assert "| val top-1 (selected) | test top-1 |" in md and "| model | test top-1 (%) |" in md
