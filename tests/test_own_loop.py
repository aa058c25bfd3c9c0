"""pycompress.loop: compression in a training loop of one's own. The example script runs and writes a
4-bit, 50%-sparse artifact that loads; the same model compressed by a recipe and by the loop with the
same settings, seeds and data order ends bit-identical (masks, quantizer scales, every tensor); bad
arguments fail with clear messages."""

from __future__ import annotations

import copy
import importlib.util
import os

import pytest
import torch
import torch.nn as nn

from pycompress import export, models
from pycompress.data import build_dataset, make_loader
from pycompress.loop import Compression, calibration_seed, epoch_seed, seed_loader
from pycompress.prune import get_mask
from pycompress.train import seed_everything
from tests.helpers import ROOT


# ------------------------------------------------------------------------------ the example
def _example():
    spec = importlib.util.spec_from_file_location("own_loop_example", os.path.join(ROOT, "examples", "own_loop.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_script_writes_a_loadable_compressed_artifact(tmp_path, capsys):
    ex = _example()
    out = str(tmp_path / "m.pcz")
    res = ex.main(["--epochs", "2", "--steps", "2", "--pretrain-steps", "2", "--batch-size", "8", "--out", out])
    printed = capsys.readouterr().out
    assert "sparsity: 50.0%" in printed and "quantized layers: 21" in printed and "bytes" in printed
    assert os.path.isfile(out) and export.is_artifact(out)
    assert res["file_bytes"] == os.path.getsize(out)
    # a quarter of the float file or less: 4-bit codes plus a 1-bit mask where that is smaller
    assert res["file_bytes"] < res["fp32_bytes"] / 4
    assert [r["epoch"] for r in res["history"]] == [1, 2] and res["history"][-1]["sparsity"] == pytest.approx(0.5)
    # the exported file as pycompress.export.load rebuilds it: bit widths and zeros
    net = export.load(out)
    layers = {n: m for n, m in net.named_modules() if isinstance(m, export.QUANTIZED_LAYERS)}
    assert len(layers) == 21
    assert layers["conv1"].weight_bits == 8 and layers["fc"].weight_bits == 8
    assert {m.weight_bits for n, m in layers.items() if n not in ("conv1", "fc")} == {4}
    assert {n: m.weight_bits for n, m in layers.items()} == res["weight_bits"]
    conv_codes = [m.weight_codes for m in layers.values() if isinstance(m, nn.Conv2d)]
    zeros = sum(int((c == 0).sum()) for c in conv_codes) / sum(c.numel() for c in conv_codes)
    assert zeros >= 0.5  # global magnitude: at least the target (a kept weight may round to code 0)
    assert int((layers["fc"].weight_codes == 0).sum()) < layers["fc"].weight_codes.numel() // 4  # not pruned
    assert res["top1"] == pytest.approx(res["export_top1"])  # the file measured twice, same accuracy


# ------------------------------------------------------------------------------ same as a recipe
OPTS = {"num_classes": 4, "image_size": 16, "in_channels": 1, "length": 64}
KD = {"kind": "hinton", "alpha": 0.5, "temperature": 4}
SEED = 3
STAGES = [
    {
        "name": "prune",
        "kind": "prune",
        "epochs": 1,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "distill": KD,
        "prune": {
            "criterion": "global_magnitude",
            "sparsity": 0.5,
            "schedule": "gradual",
            "update_interval": 1,
            "end_step": 3,
            "types": ["conv"],
        },
        "eval_batches": 1,
    },
    {
        "name": "qat",
        "kind": "quantize",
        "epochs": 2,
        "max_steps_per_epoch": 3,
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "schedule": {"name": "warmup_cosine"},
        "distill": KD,
        "quantize": {"weight_bits": 4, "act_bits": 8, "weight_scale": "lsq", "act_scale": "lsq", "calib_batches": 2},
        "eval_batches": 1,
    },
]


def _teacher(path):
    t = models.build("lenet5", in_channels=1, num_classes=4, input_size=16)
    t.load_state_dict(torch.load(path, weights_only=True))
    return t


def _own_loop(path_teacher, name_suffix=""):
    """The recipe's stages through Compression: the runner's seeds (fresh weights from seed * 2, each
    epoch from (seed, stage name, epoch), calibration from seed * 7 + stage index) and its loader."""
    train_set, _ = build_dataset("synthetic", "train", **OPTS)
    loader = make_loader(train_set, 16, shuffle=True, drop_last=True)  # the runner's training loader
    seed_everything(SEED * 2)
    student = models.build("mobilenet_student", in_channels=1, num_classes=4, width_mult=0.5)
    after = []
    for index, st in enumerate(STAGES):
        comp = Compression(
            student,
            prune=st.get("prune"),
            quantize=st.get("quantize"),
            distill=st["distill"],
            teacher=_teacher(path_teacher),
            seed=SEED,
            name=st["name"] + name_suffix,
        )
        if "quantize" in st:
            comp.calibrate(loader, seed=calibration_seed(SEED, index))
        steps = min(len(loader), st.get("max_steps_per_epoch") or len(loader))
        optimizer = comp.start(st["optimizer"], epochs=st["epochs"], steps_per_epoch=steps, schedule=st.get("schedule"))
        for _ in range(st["epochs"]):
            comp.begin_epoch(loader)
            for i, (x, y) in enumerate(loader):
                if i == steps:
                    break
                loss, _ = comp.loss(x, y)
                optimizer.zero_grad()
                loss.backward()
                comp.step()
            comp.end_epoch()
        after.append({k: v.clone() for k, v in student.state_dict().items()})
    return student, after


def test_own_loop_matches_the_recipe_bit_for_bit(tmp_path):
    from pycompress.recipe import run_recipe, validate

    torch.manual_seed(11)
    tpath = str(tmp_path / "teacher.pt")
    torch.save(models.build("lenet5", in_channels=1, num_classes=4, input_size=16).state_dict(), tpath)
    raw = {
        "name": "own-loop-twin",
        "seed": SEED,
        "device": "cpu",
        "auto_export": False,
        "data": {"dataset": "synthetic", "batch_size": 16, "eval_batch_size": 64, "options": OPTS},
        "model": {"name": "mobilenet_student", "args": {"width_mult": 0.5}},
        "teacher": {"name": "lenet5", "args": {"input_size": 16}, "checkpoint": tpath},
        "stages": copy.deepcopy(STAGES),
    }
    out = str(tmp_path / "run")
    run_recipe(validate(raw, "twin.yaml"), out, progress=False, log=lambda line: None)

    def state(stage, f):
        return torch.load(os.path.join(out, "stages", stage, f), map_location="cpu", weights_only=False)["model"]

    # the prune stage's best epoch (its only one) is where the qat stage starts; qat's last epoch
    recipe_states = [state("00-prune", "best.pt"), state("01-qat", "checkpoint.pt")]
    student, mine = _own_loop(tpath)
    convs = [n for n, m in student.named_modules() if isinstance(m, nn.Conv2d)]
    for stage, theirs, ours in zip(("prune", "qat"), recipe_states, mine):
        assert set(theirs) == set(ours), stage
        masks = [k for k in theirs if k.endswith("weight_mask")]
        assert sorted(masks) == sorted(f"{n}.weight_mask" for n in convs), stage
        for k in masks:
            assert torch.equal(theirs[k], ours[k]), f"{stage}: mask {k}"
        diff = [k for k in theirs if not torch.equal(theirs[k], ours[k])]
        assert not diff, f"{stage}: {len(diff)} tensors differ, e.g. {diff[:3]}"
    scales = [k for k in recipe_states[1] if k.endswith("_quant.scale")]
    assert len(scales) == 2 * (len(convs) + 1)  # weight and input of every conv and the classifier
    for k in scales:
        assert torch.equal(recipe_states[1][k], mine[1][k]), k
    learned = [n for n, _ in student.named_parameters() if n.endswith("_quant.scale")]
    assert sorted(learned) == sorted(scales)  # LSQ: trained, so a different data order would show
    # the per-epoch seeds are what makes it equal: another loop name draws other batches
    _, other = _own_loop(tpath, name_suffix="-x")
    assert not torch.equal(other[0]["cnn.1.0.weight"], mine[0]["cnn.1.0.weight"])


# ------------------------------------------------------------------------------ the API
def _lenet():
    torch.manual_seed(0)
    return models.build("lenet5", in_channels=1, num_classes=4, input_size=16)


def _loader(n=32, bs=8):
    ds, _ = build_dataset("synthetic", "train", num_classes=4, image_size=16, in_channels=1, length=n)
    return make_loader(ds, bs, shuffle=True, drop_last=True)


def test_epoch_seed_is_the_trainers():
    import zlib

    assert epoch_seed(3, "qat", 1) == (3 * 1_000_003 + zlib.crc32(b"qat") * 7_919 + 1) % 2**63
    assert calibration_seed(3, 2) == 23
    loader = _loader()
    seed_loader(loader, 5)
    a = [y for _, y in loader]
    seed_loader(loader, 5)
    assert all(torch.equal(u, v) for u, v in zip(a, [y for _, y in loader]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prune": {"criterion": "global_magnitude", "sparsity": 1.5}}, "PruneSpec: sparsity"),
        ({"prune": {"criterion": "magnitude"}}, "PruneSpec: criterion"),
        ({"quantize": {"weight_bits": 40}}, "QuantSpec: weight_bits"),
        ({"quantize": {"wieght_bits": 4}}, "QuantSpec"),
        ({"distill": {"kind": "hinton"}}, "distill needs a teacher"),
        ({"teacher": nn.Linear(2, 2)}, "teacher was given without distill"),
        ({"distill": {"kind": "nope"}, "teacher": nn.Linear(2, 2)}, "nope"),
        ({"seed": "0"}, "seed must be an integer"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Compression(_lenet(), **kwargs)


def test_call_order_is_checked():
    loader = _loader()
    comp = Compression(_lenet(), quantize={"weight_bits": 4, "act_bits": 8})
    with pytest.raises(RuntimeError, match="not calibrated"):
        comp.start({"name": "sgd", "lr": 0.1}, epochs=1, steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="nothing to calibrate"):
        Compression(_lenet()).calibrate(loader)
    comp.calibrate(loader)
    with pytest.raises(ValueError, match="'lr'"):
        comp.start({"name": "sgd"}, epochs=1, steps_per_epoch=2)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        comp.start({"name": "sgd", "lr": 0.1}, epochs=1, steps_per_epoch=0)
    opt = comp.start({"name": "sgd", "lr": 0.1}, epochs=1, steps_per_epoch=2)
    with pytest.raises(RuntimeError, match="before start"):
        comp.calibrate(loader)
    with pytest.raises(RuntimeError, match="begin_epoch"):
        comp.step()
    comp.begin_epoch(loader)
    for x, y in loader:
        loss, logits = comp.loss(x, y)
        assert logits.shape == (8, 4)
        opt.zero_grad()
        loss.backward()
        if comp.global_step == 2:
            with pytest.raises(RuntimeError, match="steps_per_epoch=2"):
                comp.step()
            break
        comp.step()
    row = comp.end_epoch()
    assert row["epoch"] == 1 and row["steps"] == 2 and "sparsity" not in row
    with pytest.raises(RuntimeError, match="epoch"):
        comp.begin_epoch(loader)


def test_stale_optimizer_and_missing_lsq_scales_are_caught():
    model = _lenet()
    early = torch.optim.SGD(model.parameters(), lr=0.1)  # before prepare_qat replaced the layers
    comp = Compression(model, quantize={"weight_bits": 4, "act_bits": None, "weight_scale": "lsq"})
    with pytest.raises(ValueError, match="LSQ"):
        comp.start(early, epochs=1, steps_per_epoch=1)
    comp.start(torch.optim.SGD(comp.model.parameters(), lr=0.1), epochs=1, steps_per_epoch=1)


def test_own_optimizer_with_pruning_keeps_pruned_weights_zero():
    loader = _loader()
    model = _lenet()
    comp = Compression(model, prune={"criterion": "layer_magnitude", "sparsity": 0.6}, seed=1, name="mine")
    opt = comp.start(torch.optim.Adam(model.parameters(), lr=1e-2), epochs=2, steps_per_epoch=len(loader))
    for _ in range(2):
        comp.begin_epoch(loader)
        for x, y in loader:
            loss, _ = comp.loss(x, y)
            opt.zero_grad()
            loss.backward()
            comp.step()
        assert comp.end_epoch()["sparsity"] >= 0.6
    rep = comp.sparsity()
    assert rep.selected_sparsity >= 0.6 and comp.pruner.layers == ["conv1", "conv2", "fc1", "fc2"]
    before = {}
    for name in comp.pruner.layers:  # Adam moved the kept weights, never a pruned one
        layer = model.get_submodule(name)
        keep = get_mask(layer)
        assert keep is not None and not bool(layer.weight[~keep].any()), name
        before[name] = layer.weight.detach().clone()
    # a later run of the pruned model keeps its masks fixed (as a later recipe stage does)
    again = Compression(model, quantize={"weight_bits": 4, "act_bits": None, "weight_scale": "als"})
    assert again.pruner is not None and [type(h).__name__ for h in again.hooks] == ["Pruner", "ALSRefit"]
    opt = again.start({"name": "sgd", "lr": 0.05}, epochs=1, steps_per_epoch=len(loader))
    again.begin_epoch(loader)
    for x, y in loader:
        loss, _ = again.loss(x, y)
        opt.zero_grad()
        loss.backward()
        again.step()
    again.end_epoch()
    assert again.sparsity().selected_sparsity == pytest.approx(rep.selected_sparsity)
    for name, w in before.items():
        assert torch.equal(get_mask(model.get_submodule(name)), w != 0), name  # the same masks
    assert again.hooks[1].refits == 2  # at start and after the epoch's last step
