"""MicroNet scoring (pycompress.score): hand counts on LeNet-5 and on a 2-layer QAT net with sparsity
and mixed bit widths, the challenge's WideResNet-28-10 reference figures, the 16-bit freebie and
the accumulator option, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from pycompress.models import build
from pycompress.score import CIFAR100_OPS, CIFAR100_PARAMS, score_model
from tests.helpers import run_cli


def test_lenet5_hand_count():
    m = build("lenet5", in_channels=1, num_classes=10, input_size=28)
    r = score_model(m, (1, 28, 28), freebie=False)
    # conv1 1->20 5x5: 24x24x20 = 11,520 outputs, K = 25: 288,000 mults, 24 + 1 (bias) adds each;
    # ReLU 11,520 mults; maxpool 2x2: 3 comparisons for each of 2,880 outputs;
    # conv2 20->50 5x5: 8x8x50 = 3,200 outputs, K = 500; ReLU 3,200; maxpool: 3 x 800;
    # fc1 800->500 (+ ReLU 500), fc2 500->10: K mults and K - 1 + 1 adds per output
    mults = 288_000 + 11_520 + 1_600_000 + 3_200 + 400_000 + 500 + 5_000
    adds = 288_000 + 8_640 + 1_600_000 + 2_400 + 400_000 + 5_000
    assert (r["mults"], r["adds"]) == (mults, adds)
    assert r["params"] == 431_080 and r["ops"] == mults + adds and not r["freebie"]
    assert r["score"] == pytest.approx(431_080 / 36.5e6 + (mults + adds) / 10.49e9)
    # a float model takes the freebie: parameters and multiplications at 16 bits, additions at 32
    f = score_model(m, (1, 28, 28))
    assert f["freebie"] and f["params"] == 431_080 / 2 and f["ops"] == mults / 2 + adds
    # 16-bit accumulators: additions at half
    assert score_model(m, (1, 28, 28), freebie=False, acc_bits=16)["ops"] == mults + adds / 2
    names = [row["name"] for row in r["layers"]]
    assert names.count("relu") == 3 and names.count("pool") == 2 and r["uncounted"] == []


def _two_layer():
    from pycompress.quant import QuantSpec, calibrate, prepare_qat

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    with torch.no_grad():  # values far from 0 (no code rounds to 0) except the pruned ones
        w = torch.sign(torch.randn(4, 1, 3, 3)) * 1.0
        w[:2] = 0  # 2 of 4 filters pruned: density 1/2
        net[0].weight.copy_(w)
        fc = torch.sign(torch.randn(3, 144)) * 0.5
        fc[:, :36] = 0  # a quarter of the classifier pruned: density 3/4
        net[4].weight.copy_(fc)
    prepare_qat(net, QuantSpec.from_dict({"weight_bits": 4, "act_bits": 8, "last": {"weight_bits": 8}}))
    calibrate(net, [torch.randn(2, 1, 8, 8)])
    return net


def test_two_layer_qat_net_with_sparsity_and_mixed_bits_hand_count():
    net = _two_layer()
    conv, fc = net[0], net[4]
    assert (conv.weight_quant.bits, conv.act_quant.bits, fc.weight_quant.bits, fc.act_quant.bits) == (4, 8, 8, 8)
    r = score_model(net, (1, 8, 8))
    assert not r["freebie"]  # 4-bit weights: no 16-bit freebie
    # conv: 6x6x4 = 144 outputs, K = 9, density 1/2: 648 mults at max(4, 8) = 8 bits, (4.5 - 1) x 144 = 504
    #   adds at 32 bits, 144 output-scale mults at 32 bits; storage min(36 x 4, 18 x 4 + 36 mask) = 108 bits
    #   + 4 fp32 channel scales; BatchNorm: 4 fp32 biases, 144 adds; ReLU: 144 mults
    # fc: K = 144, density 3/4: 324 mults at 8 bits, (108 - 1) x 3 + 3 (bias) = 324 adds, 3 scale mults;
    #   storage min(432 x 8, 324 x 8 + 432) = 3,024 bits, 3 fp32 biases, 3 fp32 scales
    bits = 108 + 4 * 32 + 4 * 32 + 3_024 + 3 * 32 + 3 * 32
    ops = (648 * 8 / 32 + 504 + 144) + 144 + 144 + (324 * 8 / 32 + 324 + 3)
    assert r["params"] == bits / 32 and r["ops"] == ops
    assert (r["mults"], r["adds"]) == (648 + 144 + 144 + 324 + 3, 504 + 144 + 324)
    rows = {row["name"]: row for row in r["layers"]}
    assert rows["0"]["density"] == 0.5 and rows["0"]["sparse"] and rows["4"]["density"] == 0.75
    assert rows["0"]["mult_bits"] == 8 and rows["0"]["params"] == (108 + 128) / 32


def test_wrn_28_10_reference_figures_within_one_percent():
    """The challenge's reference: WideResNet-28-10 on a 32x32 CIFAR-100 image has 36.5M parameters
    and 10.49B math operations. The convention that gives them: every parameter at 32 bits (weights,
    biases; BatchNorm counted by its bias, its scale merged, as the public counting notebook does),
    multiplications = the MACs of the convs and the classifier, additions = (K - 1) per conv / linear
    output (+1 with a bias), plus 1 per output for every BatchNorm bias and residual add, ReLU as one
    multiplication, the global average pool's adds: 36,527,908 parameters (all parameters with the
    BatchNorm scales: 36,536,884) and 10,489,981,952 operations."""
    m = build("wrn", in_channels=3, num_classes=100, depth=28, widen_factor=10)
    r = score_model(m, (3, 32, 32), freebie=False)
    assert r["params"] == pytest.approx(CIFAR100_PARAMS, rel=0.01)
    assert r["ops"] == pytest.approx(CIFAR100_OPS, rel=0.01)
    assert r["score"] == pytest.approx(2.0, rel=0.01) and r["uncounted"] == []
    assert sum(p.numel() for p in m.parameters()) == pytest.approx(36.5e6, rel=0.01)
    # the residual adds outside the modules are counted: 12 blocks
    assert sum(1 for row in r["layers"] if row["type"] == "functional") == 12


def test_bad_arguments():
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="acc_bits"):
        score_model(m, (1, 2, 2), acc_bits=0)
    with pytest.raises(ValueError, match="ref_ops"):
        score_model(m, (1, 2, 2), ref_ops=-1)
    with pytest.raises(ValueError, match="input_shape"):
        score_model(m, (2, 2))


def test_cli_on_a_name_and_a_checkpoint(tmp_path):
    out = tmp_path / "s.json"
    res = run_cli(["score", "lenet5", "--input-size", "1x28x28", "--no-freebie", "--json", str(out)])
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["params"] == 431_080 and data["layers"] and "score = " in res.stdout and "conv1" in res.stdout
    bad = run_cli(["score", "no_such_model"])
    assert bad.returncode == 2 and "no_such_model" in bad.stderr
