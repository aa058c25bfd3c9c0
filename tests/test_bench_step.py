"""`pycompress bench step`: a recipe's training stages set up as `pycompress run` sets them up, timed
on synthetic batches per backend, for the float student and for plain torch."""

from __future__ import annotations

import json

import pytest
import torch

from pycompress import backends
from pycompress.bench import step
from pycompress.cli import main
from pycompress.nn import DepthwiseConv2d
from pycompress.prune import has_masks
from pycompress.prune.optim import MaskedOptimizer
from pycompress.quant import is_qat
from pycompress.recipe import load_recipe
from tests.helpers import run_cli, write_recipe

TINY = {
    "name": "tiny-step",
    "seed": 1,
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 8,
        "eval_batch_size": 16,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 32},
    },
    "model": {"name": "mobilenet_student", "args": {"width_mult": 0.25}},
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
            "name": "prune",
            "kind": "prune",
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.02, "momentum": 0.9},
            "distill": "kldiv:1",
            "prune": {"criterion": "global_magnitude", "sparsity": 0.5, "schedule": "oneshot", "types": ["conv"]},
        },
        {
            "name": "qat4",
            "kind": "quantize",
            "epochs": 1,
            "optimizer": {"name": "adamw", "lr": 5e-4},
            "distill": {"kind": "hinton", "alpha": 0.5, "temperature": 4},
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 1},
        },
        {"name": "final", "kind": "evaluate"},
    ],
}

FAST = ["--steps", "1", "--repeats", "1", "--warmup", "1", "--batch", "4", "--threads", "1"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()  # --threads sets torch's thread count for the process
    yield
    torch.set_num_threads(n)


@pytest.fixture()
def recipe_path(tmp_path):
    return write_recipe(tmp_path, TINY)


def test_json_rows_for_qat_and_prune_stages(recipe_path, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["bench", "step", recipe_path, "--stage", "prune", "--stage", "qat4", *FAST, "--json", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and rows
    expected = step.default_backends(torch.device("cpu")) + ["float", "torch"]
    for stage in ("prune", "qat4"):
        got = [r["variant"] for r in rows if r["stage"] == stage]
        assert got == expected
    for r in rows:
        assert r["ms"] > 0 and r["images_per_s"] > 0 and r["batch"] == 4
        assert r["vs_torch"] == pytest.approx(
            next(x["ms"] for x in rows if x["stage"] == r["stage"] and x["variant"] == "torch") / r["ms"]
        )
    for head in ("ms/step", "images/s", "vs reference", "vs torch", "vs float"):
        assert head in printed
    assert "qat4" in printed and "prune" in printed


def test_stages_are_set_up_as_the_runner_does(recipe_path):
    recipe = load_recipe(recipe_path)
    torch.set_num_threads(1)
    b = step._StageBuilder(recipe, device="cpu", batch=4, steps=1)
    try:
        b.prepare(1)  # the teacher stage before it: structure only
        trainer, model = b.build_stage(1)
        assert has_masks(model) and isinstance(trainer.optimizer, MaskedOptimizer) and trainer.hooks
        assert trainer.distiller is not None
        x, y = trainer.train_loader.batches[0]
        assert tuple(x.shape) == (4, 1, 16, 16) and int(y.max()) < 4
        trainer, model = b.build_float(1, torch_layers=False)
        assert not has_masks(model) and not trainer.hooks and type(trainer.optimizer) is torch.optim.SGD
        assert any(type(m) is DepthwiseConv2d for m in model.modules())
        trainer, model = b.build_float(1, torch_layers=True)
        assert not any(isinstance(m, DepthwiseConv2d) for m in model.modules())

        b.prepare(2)  # the qat stage follows the pruned one: QAT layers and the masks kept
        trainer, model = b.build_stage(2)
        assert is_qat(model) and has_masks(model) and isinstance(trainer.optimizer, MaskedOptimizer)
        trainer, model = b.build_float(2, torch_layers=False)
        assert not is_qat(model) and not has_masks(model)
        step._warm_up(trainer, 1, 1)
        ms = [step._time_repeat(trainer, 1) for _ in range(2)]
        assert len(ms) == 2 and all(t > 0 for t in ms)
    finally:
        b.close()


def test_only_the_backends_asked_for(recipe_path, tmp_path, capsys):
    out = tmp_path / "rows.json"
    rc = main(["bench", "step", recipe_path, "--stage", "teacher", "--backend", "reference", *FAST, "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    rows = json.loads(out.read_text())
    assert [r["variant"] for r in rows] == ["reference", "float", "torch"]
    assert all(r["vs_reference"] is not None and r["vs_float"] is not None for r in rows)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stage", "nope"], "has no stage 'nope'"),
        (["--stage", "final"], "does not train"),
        (["--backend", "bogus"], "--backend must be one of"),
        (["--backend", "auto"], "not 'auto'"),
    ],
)
def test_errors_exit_2(recipe_path, capsys, args, message):
    rc = main(["bench", "step", recipe_path, *args, *FAST])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_unavailable_backend_exits_2(recipe_path, capsys):
    missing = next((b for b in ("cuda", "cpu") if backends.status(b) is not None), None)
    if missing is None:
        pytest.skip("every backend is available here")
    assert main(["bench", "step", recipe_path, "--backend", missing, *FAST]) == 2
    assert "not available" in capsys.readouterr().err


def test_missing_recipe_exits_2(tmp_path, capsys):
    assert main(["bench", "step", str(tmp_path / "none.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_subprocess(recipe_path):
    res = run_cli(["bench", "step", recipe_path, "--stage", "qat4", "--backend", "reference", *FAST])
    assert res.returncode == 0, res.stderr
    lines = [ln.split() for ln in res.stdout.splitlines()]
    assert [ln[1] for ln in lines if ln and ln[0] == "qat4"] == ["reference", "float", "torch"]


def test_input_info_without_data():
    i = step.input_info("fashion_mnist", {"pad": 2})
    assert (i.in_channels, i.image_size, i.num_classes) == (1, (32, 32), 10)
    assert step.input_info("cifar100", {}).num_classes == 100
    with pytest.raises(step.BenchStepError):
        step.input_info("no-such-set", {})
