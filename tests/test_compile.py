"""`compile:` on a training stage (and `pycompress run --compile`): the student's training step under
torch.compile, with pycompress's ops inside, gives the eager result within noise and no graph
breaks."""

from __future__ import annotations

import copy

import pytest
import torch

from pycompress.recipe import RecipeError, run_recipe, validate

TINY = {
    "name": "tiny-compile",
    "seed": 5,
    "kernel_backend": "auto",
    "device": "cpu",
    "data": {
        "dataset": "synthetic",
        "batch_size": 16,
        "eval_batch_size": 64,
        "options": {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 64},
    },
    "model": {"name": "lenet5", "args": {"input_size": 16}},
    "stages": [
        {
            "name": "float",
            "kind": "train",
            "epochs": 2,
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "compile": True,
        },
        {
            "name": "qat4",
            "kind": "quantize",
            "epochs": 1,
            "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
            "quantize": {"weight_bits": 4, "act_bits": 8, "calib_batches": 2},
            "prune": {"criterion": "layer_magnitude", "sparsity": 0.5},
            "compile": {"mode": "default"},
        },
    ],
}


def _recipe(raw):
    return validate(copy.deepcopy(raw), "tiny-compile.yaml")


def test_compile_key_is_validated():
    r = _recipe(TINY)
    assert r.stages[0].compile == {} and r.stages[1].compile == {"mode": "default"}
    off = copy.deepcopy(TINY)
    off["stages"][0]["compile"] = False
    assert _recipe(off).stages[0].compile is None
    for bad, msg in (
        ({"mode": "fastest"}, "compile.mode"),
        ({"backend": "inductor"}, "unknown key 'backend'"),
        ("yes", "must be true, false or a mapping"),
        ({"fullgraph": "no"}, "compile.fullgraph"),
    ):
        raw = copy.deepcopy(TINY)
        raw["stages"][0]["compile"] = bad
        with pytest.raises(RecipeError, match=msg):
            _recipe(raw)
    raw = copy.deepcopy(TINY)
    raw["stages"].append({"name": "final", "kind": "evaluate", "compile": True})
    with pytest.raises(RecipeError, match="'compile' does not apply to a 'evaluate' stage"):
        _recipe(raw)
    raw["stages"][-1]["compile"] = False  # false is the default: allowed anywhere
    _recipe(raw)


@pytest.mark.slow
def test_compiled_stages_match_eager_without_graph_breaks(tmp_path):
    torch.manual_seed(0)
    logs = []
    compiled = run_recipe(_recipe(TINY), str(tmp_path / "compiled"), progress=False, log=logs.append)
    eager_raw = copy.deepcopy(TINY)
    for s in eager_raw["stages"]:
        s.pop("compile")
    eager = run_recipe(_recipe(eager_raw), str(tmp_path / "eager"), progress=False, log=lambda line: None)
    by_name = {s["name"]: s for s in compiled["stages"]}
    eager_by_name = {s["name"]: s for s in eager["stages"]}
    for name in ("float", "qat4"):
        c, e = by_name[name], eager_by_name[name]
        assert c["graph_breaks"] == 0, (name, c)
        assert c["compile_seconds"] > 0 and "graph_breaks" not in e
        # the same training within floating-point noise: compiled kernels round differently
        assert abs(c["best_top1"] - e["best_top1"]) <= 12.5, (name, c["best_top1"], e["best_top1"])
    assert any("torch.compile: first step" in line and "0 graph breaks" in line for line in logs), logs
    # the pruned weights stay exactly zero under the compiled step
    assert by_name["qat4"]["sparsity"]["selected"] == pytest.approx(0.5, abs=0.01)


def test_run_compile_flag_and_bench_step_payback(tmp_path):
    from pycompress.bench.step import Row, format_table
    from pycompress.recipe import Runner

    raw = copy.deepcopy(TINY)
    raw["stages"][0].pop("compile")
    recipe = _recipe(raw)
    assert Runner(recipe, str(tmp_path / "a")).stage_compile(recipe.stages[0]) is None
    on = Runner(recipe, str(tmp_path / "b"), compile=True)
    assert on.stage_compile(recipe.stages[0]) == {} and on.stage_compile(recipe.stages[1]) == {"mode": "default"}

    def row(variant, ms, compile_s=None):
        return Row("qat4", variant, ms, ms, 1000 / ms, 16, 10, 3, compile_s=compile_s, graph_breaks=0)

    text = format_table([row("cpu", 50.0), row("compiled", 40.0, compile_s=20.0)])
    assert "first step took 20.0 s (0 graph breaks); it pays after about 2000 steps (vs cpu)" in text
    text = format_table([row("cpu", 40.0), row("compiled", 45.0, compile_s=20.0)])
    assert "never" in text
