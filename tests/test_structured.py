"""Structured pruning with physical removal: removal is a no-op on function for dead channels on every
zoo model, the parameter count drops by exactly the announced amount, plans rebuild the network,
masks carry over, and the selection rules (ratio, scope, threshold, rounding, exclusions) hold."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision

from pycompress import models, prune, quant
from pycompress.prune import structured as S

pytest.importorskip("torch_pruning", reason="structured pruning needs torch-pruning (installed by scripts/setup.sh)")

ZOO = [
    ("lenet300", {}, (1, 28, 28)),
    ("lenet5", {"input_size": 28}, (1, 28, 28)),
    ("mobilenet_student", {}, (1, 32, 32)),
    ("resnet20", {}, (3, 32, 32)),
    ("preresnet", {"depth": 20}, (3, 32, 32)),
    ("wrn", {"depth": 10, "widen_factor": 2}, (3, 32, 32)),
    ("vgg11_bn", {}, (3, 32, 32)),
    ("densenet_bc", {"depth": 40, "growth_rate": 12}, (3, 32, 32)),
    ("resnet18", {}, (3, 32, 32)),
    ("tv_mobilenet_v2", {}, (3, 32, 32)),
]


def _build(name, kwargs, shape):
    if name == "tv_mobilenet_v2":
        return torchvision.models.mobilenet_v2(num_classes=10)
    return models.build(name, in_channels=shape[0], num_classes=10, **kwargs)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) - 0.5)


def _layer_params(m):
    if isinstance(m, nn.Conv2d):
        return m.out_channels * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1] + (
            m.out_channels if m.bias is not None else 0
        )
    if isinstance(m, nn.Linear):
        return m.out_features * m.in_features + (m.out_features if m.bias is not None else 0)
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return 2 * m.num_features if m.affine else 0
    return 0


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_removing_dead_channels_is_a_no_op(name, kwargs, shape):
    model = _build(name, kwargs, shape).eval()
    _randomize(model)
    groups = S.channel_groups(model, input_shape=shape)
    assert groups, name
    # a third of every group's channels (at least one kept), made dead: every producer of those
    # channels (conv / linear rows and biases, BatchNorm gamma and beta) zeroed
    picks = {g["root"]: list(range(0, g["channels"] - 1, 3)) for g in groups if g["channels"] > 1}
    mods = dict(model.named_modules())
    expect_in, expect_out = {}, {}
    members = S.group_members(model, picks, input_shape=shape)
    with torch.no_grad():
        for root, idxs in picks.items():
            for layer, role, ix in members[root]:
                m = mods[layer]
                target = expect_out if role == "out" else expect_in
                target.setdefault(layer, set()).update(ix)
                if role != "out":
                    continue
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.weight[ix] = 0
                    m.bias[ix] = 0
                else:
                    m.weight[ix] = 0
                    if m.bias is not None:
                        m.bias[ix] = 0
    # the expected parameter count: every layer cut by exactly the announced indices
    expected = sum(p.numel() for p in model.parameters())
    for layer, m in mods.items():
        if layer not in expect_in and layer not in expect_out:
            continue
        before = _layer_params(m)
        shrunk = copy.deepcopy(m)
        o, i = len(expect_out.get(layer, ())), len(expect_in.get(layer, ()))
        if isinstance(m, nn.Conv2d):
            dw = m.groups == m.out_channels > 1
            shrunk.out_channels -= o
            shrunk.in_channels -= o if dw else i
            shrunk.groups = shrunk.out_channels if dw else m.groups
        elif isinstance(m, nn.Linear):
            shrunk.out_features -= o
            shrunk.in_features -= i
        else:
            shrunk.num_features -= o
        expected += _layer_params(shrunk) - before
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y0 = model(x)
    plan = S.remove_channels(model, picks, input_shape=shape)
    with torch.no_grad():
        y1 = model(x)
    assert torch.allclose(y0, y1, rtol=1e-5, atol=1e-5 * float(y0.abs().max())), float((y0 - y1).abs().max())
    assert sum(p.numel() for p in model.parameters()) == expected
    if name != "tv_mobilenet_v2":  # rebuild from the plan (zoo models record how they were built)
        fresh = _build(name, kwargs, shape)
        S.apply_plan(fresh, plan)
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert torch.equal(fresh.eval()(x), y1)


@pytest.mark.parametrize("name,kwargs,shape", ZOO, ids=[z[0] for z in ZOO])
def test_slim_every_zoo_model(name, kwargs, shape):
    model = _build(name, kwargs, shape).eval()
    _randomize(model)
    crit = "l2" if name.startswith("lenet") else "bn_gamma"
    res = S.slim(model, {"criterion": crit, "ratio": 0.5, "round_to": 1}, input_shape=shape)
    assert res.params_after < 0.8 * res.params_before
    for g in res.groups:
        assert g["after"] == max(1, int(g["before"] * 0.5 + 0.5))
    with torch.no_grad():
        assert model(torch.randn(2, *shape)).shape == (2, 10)


def test_student_groups_and_classifier_kept():
    m = models.build("mobilenet_student", in_channels=1, num_classes=10)
    groups = {g["root"]: g for g in S.channel_groups(m, input_shape=(1, 32, 32))}
    # the pointwise conv of block i feeds block i+1's depthwise conv, BN and pointwise input
    assert groups["cnn.1.3"]["members"] == ["cnn.1.3", "cnn.2.0", "cnn.2.1", "cnn.2.3"]
    assert "fc.0" not in groups  # the classifier never loses outputs
    assert groups["cnn.7.3"]["members"] == ["cnn.7.3", "fc.0"]  # its inputs shrink


def test_resnet_residual_coupling():
    m = models.build("resnet20", in_channels=3, num_classes=10)
    groups = {g["root"]: g for g in S.channel_groups(m, input_shape=(3, 32, 32))}
    stem = groups["conv1"]["members"]
    # the stem's channels run through every stage-1 residual add: coupled with each block's conv2
    for b in range(3):
        assert f"layer1.{b}.conv2" in stem and f"layer1.{b}.bn2" in stem and f"layer1.{b}.conv1" in stem


def _student_trained_bn():
    torch.manual_seed(0)
    m = models.build("mobilenet_student", in_channels=1, num_classes=10).eval()
    _randomize(m)
    return m


def test_ratio_rounding_and_min_channels():
    m = _student_trained_bn()
    res = S.slim(m, {"criterion": "bn_gamma", "ratio": 0.3}, input_shape=(1, 32, 32))
    after = {g["root"]: g["after"] for g in res.groups}
    assert after["cnn.1.3"] == 24  # 32 * 0.7 = 22.4 -> nearest multiple of 8
    assert after["cnn.4.3"] == 176  # 256 * 0.7 = 179.2 -> 176
    assert after["cnn.0.0"] == 8  # 16 * 0.7 = 11.2 -> the nearest multiple of 8 is 8


def test_ratio_rounding_exact_rules():
    assert S._keep_count(16, 0.3, 8, 1) == 8
    assert S._keep_count(32, 0.3, 8, 1) == 24
    assert S._keep_count(256, 0.3, 8, 1) == 176
    assert S._keep_count(6, 0.5, 8, 1) == 3  # smaller than round_to: not rounded
    assert S._keep_count(8, 0.99, 8, 1) == 8  # at least one multiple
    assert S._keep_count(5, 0.99, 1, 2) == 2  # min_channels
    assert S._keep_count(10, 0.999, 1, 1) == 1


def test_layer_ratios_exclude_and_threshold():
    m = _student_trained_bn()
    res = S.slim(
        m,
        {
            "criterion": "bn_gamma",
            "ratio": 0.25,
            "round_to": 1,
            "ratios": [{"pattern": r"^cnn\.4\.3$", "ratio": 0.5}],
            "exclude": [r"^cnn\.5\.3$"],
        },
        input_shape=(1, 32, 32),
    )
    after = {g["root"]: (g["before"], g["after"]) for g in res.groups}
    assert after["cnn.4.3"] == (256, 128) and after["cnn.3.3"] == (128, 96)
    assert "cnn.5.3" not in after  # excluded: its group is left alone
    m = _student_trained_bn()
    with torch.no_grad():
        m.cnn[3][1].weight[[1, 5, 9]] = 0.0  # dead channels of the group rooted at cnn.2.3
    res = S.slim(m, {"criterion": "bn_gamma", "threshold": 0.0}, input_shape=(1, 32, 32))
    after = {g["root"]: (g["before"], g["after"]) for g in res.groups}
    assert after["cnn.2.3"] == (64, 61) and all(b == a for r, (b, a) in after.items() if r != "cnn.2.3")


def test_global_scope_ranks_all_channels_together():
    m = _student_trained_bn()
    with torch.no_grad():  # one block's gammas far below every other: global removes mostly there
        m.cnn[5][1].weight.mul_(1e-3)
    res = S.slim(m, {"criterion": "bn_gamma", "ratio": 0.2, "scope": "global", "round_to": 1}, input_shape=(1, 32, 32))
    after = {g["root"]: (g["before"], g["after"]) for g in res.groups}
    removed = sum(b - a for b, a in after.values())
    total = sum(b for b, _ in after.values())
    assert removed == int(0.2 * total + 0.5)
    b, a = after["cnn.4.3"]  # the group whose BN (cnn.5.1) was scaled down loses every removed channel
    assert b - a == removed


def test_masks_carry_over_exactly():
    m = _student_trained_bn()
    prune.prune_model(m, {"criterion": "global_magnitude", "sparsity": 0.6})
    before = {n: prune.get_mask(l).clone() for n, l in prune.masked_layers(m).items()}
    res = S.slim(m, {"criterion": "bn_gamma", "ratio": 0.5, "round_to": 1}, input_shape=(1, 32, 32))
    after = prune.masked_layers(m)
    assert set(after) == set(before)
    for n, layer in after.items():
        mk = prune.get_mask(layer)
        assert mk.shape == layer.weight.shape
        assert bool((layer.weight.detach()[~mk] == 0).all())
    # the kept channels' masks are the old masks' rows / columns
    g = {x["root"]: x for x in res.groups}["cnn.3.3"]
    assert g["after"] < g["before"]
    assert after["cnn.4.3"].weight.shape[1] == g["after"]
    # every kept weight that was nonzero is still nonzero (nothing else was masked)
    total_kept = sum(int(prune.get_mask(l).sum()) for l in after.values())
    assert total_kept == sum(int((l.weight != 0).sum()) for l in after.values())


def test_refusals():
    m = _student_trained_bn()
    quant.prepare_qat(m, {"weight_bits": 4, "act_bits": None})
    with pytest.raises(S.SlimError, match="quantization-aware"):
        S.slim(m, {"criterion": "bn_gamma", "ratio": 0.3}, input_shape=(1, 32, 32))
    m = models.build("lenet5", in_channels=1, num_classes=10)
    with pytest.raises(S.SlimError, match="nothing to prune"):
        S.slim(m, {"criterion": "bn_gamma", "ratio": 0.3}, input_shape=(1, 28, 28))
    m = _student_trained_bn()
    with pytest.raises(S.SlimError, match="every group holds an excluded layer"):
        S.slim(m, {"criterion": "bn_gamma", "ratio": 0.3, "exclude": ["cnn"]}, input_shape=(1, 32, 32))
    for bad, match in [
        ({"ratio": 1.0}, "in \\(0, 1\\)"),
        ({"ratio": 0}, "in \\(0, 1\\)"),
        ({}, "either a ratio"),
        ({"ratio": 0.3, "threshold": 0.1}, "either a ratio"),
        ({"ratio": 0.3, "criterion": "x"}, "criterion"),
        ({"ratio": 0.3, "round_to": 0}, "round_to"),
        ({"ratio": 0.3, "exclude": ["("]}, "regular expression"),
        ({"ratio": 0.3, "typo": 1}, "unknown key"),
    ]:
        with pytest.raises(S.SlimError, match=match):
            S.SlimSpec.from_dict({"criterion": "bn_gamma", **bad} if "criterion" not in bad else bad)


def test_rounds_compose_to_the_total_ratio():
    spec = S.SlimSpec(criterion="bn_gamma", ratio=1 - 0.95**5, rounds=5)
    assert spec.round_ratio() == pytest.approx(0.05)  # hw7: width x 0.95 per round


class _Shuffle(nn.Module):
    """A ShuffleNet-style channel shuffle (view + transpose): Torch-Pruning cannot map indices through it."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.fc(torch.relu(self.b2(self.c2(x))).mean((2, 3)))


def test_untraceable_graph_is_refused_and_the_model_kept():
    m = _Shuffle().eval()
    _randomize(m)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        y0 = m(x)
    with pytest.raises(S.SlimError, match="cannot follow _Shuffle.*nothing was removed"):
        S.slim(m, {"criterion": "bn_gamma", "ratio": 0.5, "round_to": 1}, input_shape=(3, 8, 8))
    after = m.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(m(x), y0)
