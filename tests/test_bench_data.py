"""`pycompress bench data`: images/s of a recipe's training loader alone."""

from __future__ import annotations

import json

import yaml

from pycompress.cli import main

RECIPE = {
    "name": "tiny-data",
    "seed": 1,
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 8,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 40},
    },
    "model": {"name": "lenet5", "args": {"input_size": 16}},
    "stages": [{"name": "train", "kind": "train", "epochs": 1, "optimizer": {"name": "sgd", "lr": 0.1}}],
}


def _write(tmp_path, raw=RECIPE):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def test_bench_data_times_the_loader_per_worker_count(tmp_path, capsys):
    out = tmp_path / "data.json"
    # 40 images in batches of 8 (drop_last): 5 per pass, so 3 x 4 batches span several passes
    args = ["bench", "data", _write(tmp_path), "--batches", "4", "--repeats", "3", "--json", str(out)]
    assert main(args + ["--workers", "0", "--workers", "1"]) == 0
    table = capsys.readouterr().out
    assert "| synthetic | 0 | 8 |" in table and "| synthetic | 1 | 8 |" in table
    rows = json.loads(out.read_text())
    assert [r["workers"] for r in rows] == [0, 1]
    for r in rows:
        assert (
            r["ms_per_batch"] > 0 and abs(r["images_per_s"] - 8 / (r["ms_per_batch"] / 1e3)) < 1e-6 * r["images_per_s"]
        )
        assert r["pin_memory"] is False and r["device"] == "cpu"
    assert main(args) == 0  # default: the recipe's num_workers (0)
    assert [r["workers"] for r in json.loads(out.read_text())] == [0]


def test_bench_data_errors(tmp_path, capsys):
    assert main(["bench", "data", _write(tmp_path), "--workers", "-1"]) == 2
    assert "workers must be integers >= 0" in capsys.readouterr().err
    missing = json.loads(json.dumps(RECIPE))
    missing["data"] = {"dataset": "cifar10", "batch_size": 8}  # not on this machine: never downloaded
    assert main(["bench", "data", _write(tmp_path, missing), "--data-root", str(tmp_path / "nowhere")]) == 2
    assert "--data-root" in capsys.readouterr().err
