"""pycompress.profile: parameters, MACs and activation memory counted by hooks and checked against
hand counts; model specs (name, checkpoint, artifact); latency; the `profile` command line."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch.nn as nn

from pycompress import export, models, profile, prune, quant
from pycompress.train import save_checkpoint


def _lenet5():
    return models.build("lenet5", in_channels=1, num_classes=10, input_size=28)


def _student():
    return models.build("mobilenet_student", in_channels=1, num_classes=10)


def _by_name(prof):
    return {r["name"]: r for r in prof["layers"]}


# ------------------------------------------------------------------------------ hand counts
def test_lenet5_hand_count():
    prof = profile.profile_model(_lenet5(), (1, 28, 28))
    # conv1: 20 filters 5x5 on 1 channel, 28 -> 24: 20*24*24 outputs x 1*5*5 MACs each
    conv1 = 20 * 24 * 24 * 1 * 25  # 288,000
    # pool -> 12; conv2: 50 filters 5x5 on 20 channels, 12 -> 8
    conv2 = 50 * 8 * 8 * 20 * 25  # 1,600,000
    # pool -> 4; fc1: 50*4*4 = 800 -> 500; fc2: 500 -> 10
    fc1 = 500 * 800  # 400,000
    fc2 = 10 * 500  # 5,000
    assert (conv1, conv2, fc1, fc2) == (288_000, 1_600_000, 400_000, 5_000)
    assert prof["macs"] == conv1 + conv2 + fc1 + fc2 == 2_293_000
    params = (20 * 25 + 20) + (50 * 20 * 25 + 50) + (800 * 500 + 500) + (500 * 10 + 10)
    assert prof["params"] == params == 431_080
    rows = _by_name(prof)
    assert [r["name"] for r in prof["layers"]] == ["conv1", "conv2", "fc1", "fc2"]  # relu / pool: no params, no MACs
    assert {n: r["macs"] for n, r in rows.items()} == {"conv1": conv1, "conv2": conv2, "fc1": fc1, "fc2": fc2}
    assert rows["conv1"]["output_shape"] == [20, 24, 24] and rows["fc1"]["output_shape"] == [500]
    assert rows["conv1"]["type"] == "Conv2d" and rows["fc2"]["type"] == "Linear"
    assert rows["conv2"]["activation_bytes"] == 50 * 8 * 8 * 4
    # every leaf output (the shared in-place ReLU and the shared pool count at each call), fp32
    acts = (20 * 24 * 24) * 2 + 20 * 12 * 12 + (50 * 8 * 8) * 2 + 50 * 4 * 4 + 500 * 2 + 10
    assert prof["activation_bytes"] == 4 * acts
    assert prof["nonzero_macs"] == prof["macs"]  # dense float weights
    assert prof["input_shape"] == [1, 28, 28]


def _student_hand_count(in_channels=1, size=32, num_classes=10):
    widths = models.student_widths(16, 1.0)  # [16, 32, 64, 128, 256, 256, 256, 256]
    assert widths == [16, 32, 64, 128, 256, 256, 256, 256]
    r = size
    macs = widths[0] * r * r * in_channels * 9  # first conv 3x3, padding 1: same resolution
    params = widths[0] * in_channels * 9 + widths[0] + 2 * widths[0]  # conv + bias, BN gamma / beta
    r //= 2  # max-pool after block 0
    for i in range(1, 8):
        c_in, c_out = widths[i - 1], widths[i]
        macs += c_in * r * r * 9  # depthwise 3x3: one input channel per output
        macs += c_out * r * r * c_in  # pointwise 1x1
        params += (c_in * 9 + c_in) + 2 * c_in + (c_out * c_in + c_out)
        if i <= 3:
            r //= 2  # max-pools after blocks 1..3
    macs += num_classes * widths[7]  # linear 256 -> 10 after global average pool
    params += num_classes * widths[7] + num_classes
    return macs, params


def test_mobilenet_student_hand_count():
    macs, params = _student_hand_count()
    assert macs == 1_557_504 and params == 256_234
    prof = profile.profile_model(_student(), (1, 32, 32))
    assert prof["macs"] == macs
    assert prof["params"] == params
    rows = _by_name(prof)
    assert rows["cnn.1.0"]["type"] == "DepthwiseConv2d"
    assert rows["cnn.1.0"]["macs"] == 16 * 16 * 16 * 9 and rows["cnn.1.0"]["output_shape"] == [16, 16, 16]
    assert rows["cnn.7.3"]["macs"] == 256 * 2 * 2 * 256
    assert rows["fc.0"]["macs"] == 2560
    assert rows["cnn.0.1"]["macs"] == 0 and rows["cnn.0.1"]["params"] == 32  # BN: params, no MACs
    assert sum(r["macs"] for r in prof["layers"]) == macs


def test_linear_counts_leading_dims_and_grouped_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4, bias=False)
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return self.fc(self.conv(x))  # linear over the last dim: 12 x 4 rows of 4

    prof = profile.profile_model(Net(), (8, 8, 8))
    rows = _by_name(prof)
    assert rows["conv"]["macs"] == 12 * 4 * 4 * (8 // 4) * 9
    assert rows["fc"]["macs"] == 12 * 4 * 6 * 4
    assert rows["fc"]["output_shape"] == [12, 4, 6]


# ------------------------------------------------------------------------------ QAT, pruning
def test_qat_counts_like_float_and_excludes_scales():
    float_prof = profile.profile_model(_student(), (1, 32, 32))
    torch.manual_seed(0)
    m = _student()
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8})
    quant.calibrate(m, [torch.randn(8, 1, 32, 32)], 1)
    assert any("weight_quant" in n or "act_quant" in n for n, _ in m.named_buffers())
    prof = profile.profile_model(m, (1, 32, 32))
    assert prof["macs"] == float_prof["macs"]
    assert prof["params"] == float_prof["params"]
    rows = _by_name(prof)
    assert rows["cnn.1.3"]["type"] == "QuantConv2d" and rows["fc.0"]["type"] == "QuantLinear"
    # the fake quantizers are not leaves of their own: the layer list is the float one
    assert [r["name"] for r in prof["layers"]] == [r["name"] for r in float_prof["layers"]]
    assert prof["activation_bytes"] == float_prof["activation_bytes"]
    assert 0 < prof["nonzero_macs"] <= prof["macs"]


def test_qat_lsq_scales_are_not_params():
    m = _lenet5()
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8, "weight_scale": "lsq", "act_scale": "lsq"})
    quant.calibrate(m, [torch.randn(4, 1, 28, 28)], 1)
    assert any("weight_quant" in n for n, _ in m.named_parameters())
    assert profile.profile_model(m, (1, 28, 28))["params"] == 431_080


@pytest.mark.parametrize("criterion", ["global_magnitude", "layer_magnitude"])
def test_pruned_nonzero_macs(criterion):
    m = _student()
    float_macs = profile.profile_model(m, (1, 32, 32))["macs"]
    prune.prune_model(m, {"criterion": criterion, "sparsity": 0.75})
    prof = profile.profile_model(m, (1, 32, 32))
    assert prof["macs"] == float_macs
    # independently: each nonzero weight of a conv costs one MAC per output position, of a linear one
    want, kept, total = 0, 0, 0
    res = {"cnn.0.0": 32 * 32}
    r = 16
    for i in range(1, 8):
        res[f"cnn.{i}.0"] = res[f"cnn.{i}.3"] = r * r
        r = r // 2 if i <= 3 else r
    res["fc.0"] = 1
    mods = dict(m.named_modules())
    for name, positions in res.items():
        nnz = int(torch.count_nonzero(mods[name].weight))
        want += nnz * positions
        kept, total = kept + nnz, total + mods[name].weight.numel()
    assert prof["nonzero_macs"] == want
    assert abs(kept / total - 0.25) < 0.01  # 75% of the weights are zero
    ratio = prof["nonzero_macs"] / prof["macs"]
    if criterion == "layer_magnitude":
        assert abs(ratio - 0.25) < 0.01, ratio  # every layer at 75%: the MACs follow
    else:
        # one global threshold keeps more of the small-fan-in layers (the first conv, the depthwise
        # convs: larger default-init weights), which do most MACs per weight: ~43% of the MACs remain
        assert 0.25 < ratio < 0.5, ratio
    for row in prof["layers"]:
        if row["macs"]:
            assert abs(row["nonzero_macs"] - row["macs"] * row["density"]) < 1


# ------------------------------------------------------------------------------ hooks, modes
def test_hooks_removed_and_modes_restored():
    m = _student().train()
    m.cnn[2][1].eval()  # a mixed state: one BatchNorm frozen
    profile.profile_model(m, (1, 32, 32))
    assert all(not mod._forward_hooks for mod in m.modules())
    assert m.training and not m.cnn[2][1].training and m.cnn[2][0].training  # each module's own mode back


def test_hooks_removed_on_error():
    m = _lenet5()
    with pytest.raises(ValueError, match="1x1x32x32"):
        profile.profile_model(m, (1, 32, 32))  # built for 28x28: fc1 gets the wrong size
    assert all(not mod._forward_hooks for mod in m.modules())
    assert m.training


# ------------------------------------------------------------------------------ model specs
def test_spec_name_defaults_and_arguments():
    m, shape, info = profile.load_for_profile("mobilenet_student")
    assert shape == (3, 32, 32) and info["kind"] == "name" and info["num_classes"] == 10
    assert m.cnn[0][0].in_channels == 3 and m.fc[0].out_features == 10 and not m.training
    m, shape, info = profile.load_for_profile(
        "mobilenet_student", model_args={"width_mult": 0.5}, num_classes=7, input_size="1x28x28"
    )
    assert shape == (1, 28, 28) and m.fc[0].out_features == 7 and m.widths[3] == 64
    m, shape, _ = profile.load_for_profile("lenet5", input_size=(1, 28, 28))  # input_size passed on
    assert profile.profile_model(m, shape)["macs"] == 2_293_000


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="known models: .*mobilenet_student"):
        profile.load_for_profile("no_such_model")
    with pytest.raises(ValueError, match="missing.pt"):
        profile.load_for_profile(str(tmp_path / "missing.pt"))
    bad = tmp_path / "junk.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt.*not a readable pycompress checkpoint"):
        profile.load_for_profile(str(bad))
    with pytest.raises(ValueError, match="unexpected argument"):
        profile.load_for_profile("mobilenet_student", model_args={"widht_mult": 0.5})
    with pytest.raises(ValueError, match="input size"):
        profile.load_for_profile("mobilenet_student", input_size="3x32")


def test_parse_model_args():
    assert profile.parse_model_args("width_mult=0.5,depth=20") == {"width_mult": 0.5, "depth": 20}
    assert profile.parse_model_args(["a=true", "b=[1, 2],c=x"]) == {"a": True, "b": [1, 2], "c": "x"}
    with pytest.raises(ValueError, match="key=value"):
        profile.parse_model_args("width_mult")


def _arch(name="mobilenet_student"):
    return {"model": name, "args": {}, "in_channels": 1, "num_classes": 10, "qat": None}


def test_spec_checkpoint(tmp_path):
    m = _student()
    path = str(tmp_path / "best.pt")
    save_checkpoint(
        path,
        {
            "model": m.state_dict(),
            "arch": _arch(),
            "data": {"dataset": "synthetic", "in_channels": 1, "image_size": [32, 32]},
        },
    )
    model, shape, info = profile.load_for_profile(path)
    assert shape == (1, 32, 32) and info["kind"] == "checkpoint" and info["model"] == "mobilenet_student"
    assert profile.profile_model(model, shape)["macs"] == _student_hand_count()[0]
    _, shape, _ = profile.load_for_profile(path, input_size="1x64x64")  # overridable
    assert shape == (1, 64, 64)
    with pytest.raises(ValueError, match="input channels"):
        profile.load_for_profile(path, input_size="3x32x32")
    with pytest.raises(ValueError, match="--model-args"):
        profile.load_for_profile(path, model_args={"width_mult": 0.5})


def test_spec_artifact(tmp_path):
    m = _student()
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": 8})
    quant.calibrate(m, [torch.randn(8, 1, 28, 28)], 1)
    prune_free_prof = profile.profile_model(m, (1, 28, 28))
    path = str(tmp_path / "m.pcz")
    export.save(m.eval(), path, data={"dataset": "synthetic", "in_channels": 1, "image_size": [28, 28]})
    model, shape, info = profile.load_for_profile(path)
    assert shape == (1, 28, 28) and info["kind"] == "artifact" and info["qat"]
    prof = profile.profile_model(model, shape)
    assert prof["macs"] == prune_free_prof["macs"] == _student_hand_count(size=28)[0]
    rows = _by_name(prof)
    assert rows["cnn.1.3"]["type"] == "QuantizedConv2d" and rows["cnn.1.3"]["params"] == 16 * 32 + 32
    assert "cnn.0.1" not in rows  # BatchNorm folded away: its parameters are gone, MACs the same
    bn_params = sum(mod.weight.numel() * 2 for mod in m.modules() if isinstance(mod, nn.BatchNorm2d))
    assert prof["params"] == prune_free_prof["params"] - bn_params
    # nonzero MACs from the artifact's weight codes equal the QAT layer's codes
    assert prof["nonzero_macs"] == prune_free_prof["nonzero_macs"]


# ------------------------------------------------------------------------------ latency
def test_measure_latency():
    m = _lenet5().train()
    threads = torch.get_num_threads()
    rows = profile.measure_latency(m, (1, 28, 28), batch_sizes=(1, 2), repeats=2, warmup=1, threads=1)
    assert [(r["device"], r["batch"]) for r in rows] == [("cpu", 1), ("cpu", 2)]
    for r in rows:
        assert r["ms"] > 0 and r["ms_min"] > 0 and r["images_per_s"] > 0 and r["ms_min"] <= r["ms"]
        assert r["threads"] == 1
    assert m.training and torch.get_num_threads() == threads
    with pytest.raises(ValueError, match="batch"):
        profile.measure_latency(m, (1, 28, 28), batch_sizes=(0,))


# ------------------------------------------------------------------------------ command line
def _parse(argv):
    p = profile.add_arguments(argparse.ArgumentParser(prog="pycompress profile"))
    return p.parse_args(argv)


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "p.json"
    args = _parse(
        [
            "lenet5",
            "--input-size",
            "1x28x28",
            "--batch",
            "1",
            "--batch",
            "2",
            "--repeats",
            "2",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert args.batch == [1, 2] and args.device == "cpu"
    assert profile.cli_main(args) == 0
    text = capsys.readouterr().out
    assert "conv2" in text and "69.8%" in text and "431,080 parameters" in text and "2.293 M MACs" in text
    assert "latency cpu  batch    2" in text
    res = json.loads(out.read_text())
    for key in ("params", "macs", "nonzero_macs", "activation_bytes", "layers", "latency", "input_shape", "model"):
        assert key in res
    assert res["macs"] == 2_293_000 and res["params"] == 431_080 and res["input_shape"] == [1, 28, 28]
    assert [r["batch"] for r in res["latency"]] == [1, 2] and res["model"]["model"] == "lenet5"


def test_cli_model_args_no_latency(capsys):
    args = _parse(["mobilenet_student", "--model-args", "width_mult=0.5", "--num-classes", "11", "--no-latency"])
    assert profile.cli_main(args) == 0
    text = capsys.readouterr().out
    assert "width_mult=0.5" in text and "latency" not in text


def test_cli_errors(capsys):
    assert profile.cli_main(argparse.Namespace(model="no_such_model", no_latency=True)) == 2
    err = capsys.readouterr().err
    assert err.startswith("pycompress profile: error: ") and "lenet5" in err and "mobilenet_student" in err
    assert profile.cli_main(_parse(["lenet5", "--model-args", "nope"])) == 2
    assert "key=value" in capsys.readouterr().err
    assert (
        profile.cli_main(_parse(["lenet5", "--input-size", "1x32x32", "--model-args", "input_size=28", "--no-latency"]))
        == 2
    )
    assert "1x1x32x32" in capsys.readouterr().err
