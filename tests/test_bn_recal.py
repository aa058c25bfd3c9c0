"""pycompress.train.recalibrate_bn: BatchNorm running statistics re-estimated after the network
changed (MicroNet's step after quantization), nothing else touched."""

import copy

import pytest
import torch
import torch.nn as nn

from pycompress.prune import prune_model
from pycompress.quant import FakeQuantizer, calibrate, prepare_qat
from pycompress.train import recalibrate_bn
from tests.helpers import accuracy, train_on_quadrants


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


class Net(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.drop(self.conv2(x))))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def trained():
    """Net trained 60 steps on the quadrant task (~93%, not 100%); 1 point of accuracy = 20 test images."""
    return train_on_quadrants(Net, steps=60, n_test=2048)


def bns(model):
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_stats(model):
    return [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in bns(model)]


def corrupt(model):
    with torch.no_grad():
        for bn in bns(model):
            bn.running_var *= 25
            bn.running_mean += 3


def hand_stats(model, batches):
    """Per BN: the mean over batches of the per-batch channel means and unbiased variances of its
    input, with every BN normalising by batch statistics (as during recalibration)."""
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.eval()
    seen = {id(bn): [] for bn in bns(m)}
    hooks = [
        bn.register_forward_pre_hook(lambda mod, inp: seen[id(mod)].append(inp[0].detach().clone())) for bn in bns(m)
    ]
    with torch.no_grad():
        for x, _ in batches:
            m(x)
    for h in hooks:
        h.remove()
    out = []
    for bn in bns(m):
        xs = seen[id(bn)]
        means = torch.stack([x.mean(dim=(0, 2, 3)) for x in xs]).mean(0)
        vars_ = torch.stack([x.var(dim=(0, 2, 3), unbiased=True) for x in xs]).mean(0)
        out.append((means, vars_))
    return out


def test_restores_accuracy_and_true_statistics(trained):
    model, batches, test = trained
    acc = accuracy(model, test)
    assert 85 < acc < 99
    bad = copy.deepcopy(model)
    corrupt(bad)
    assert accuracy(bad, test) < acc - 20
    weights = {k: v.clone() for k, v in bad.state_dict().items() if "running" not in k and "tracked" not in k}
    out = recalibrate_bn(bad, batches, num_batches=len(batches))
    assert out == {"layers": 2, "batches": 8, "images": 512}
    assert accuracy(bad, test) >= acc - 1.0
    for bn, (mean, var) in zip(bns(bad), hand_stats(model, batches)):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert bn.num_batches_tracked.item() == 8
    for k, v in bad.state_dict().items():
        if k in weights:
            exact(v, weights[k])
    assert not bad.training and all(bn.momentum == 0.1 for bn in bns(bad))


def test_num_batches_limits_and_tensor_batches(trained):
    model, batches, _ = trained
    m = copy.deepcopy(model)
    out = recalibrate_bn(m, (x for x, _ in batches), num_batches=3, device="cpu")
    assert out == {"layers": 2, "batches": 3, "images": 192}
    for bn, (mean, var) in zip(bns(m), hand_stats(model, batches[:3])):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert recalibrate_bn(m, batches[:2], num_batches=100)["batches"] == 2


def test_reset_false_continues_the_average(trained):
    model, batches, _ = trained
    once, twice = copy.deepcopy(model), copy.deepcopy(model)
    recalibrate_bn(once, batches[:4], num_batches=4)
    recalibrate_bn(twice, batches[:2], num_batches=2)
    recalibrate_bn(twice, batches[2:4], num_batches=2, reset=False)
    for (m1, v1, n1), (m2, v2, n2) in zip(bn_stats(once), bn_stats(twice)):
        torch.testing.assert_close(m1, m2, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v1, v2, rtol=1e-6, atol=1e-7)
        assert n1.item() == n2.item() == 4


def test_modes_and_momenta_restored(trained):
    model, batches, _ = trained
    m = copy.deepcopy(model).train()
    m.fc.eval()
    m.bn2.eval()
    m.bn1.momentum, m.bn2.momentum = 0.3, None
    modes = {n: mod.training for n, mod in m.named_modules()}
    during = []
    hook = m.conv2.register_forward_hook(lambda *a: during.append({n: mod.training for n, mod in m.named_modules()}))
    recalibrate_bn(m, batches, num_batches=2)
    hook.remove()
    assert len(during) == 2
    for d in during:  # only the BatchNorms in train mode meanwhile
        assert d == {n: n in ("bn1", "bn2") for n in d}
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert (m.bn1.momentum, m.bn2.momentum) == (0.3, None)


def test_exception_midway_restores_everything(trained):
    model, batches, _ = trained
    m = copy.deepcopy(model).train()
    m.bn2.momentum = 0.2
    modes = {n: mod.training for n, mod in m.named_modules()}
    before = bn_stats(m)
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("boom")

    hook = m.bn2.register_forward_hook(boom)
    with pytest.raises(KeyError, match="boom"):
        recalibrate_bn(m, batches, num_batches=4)
    hook.remove()
    assert {n: mod.training for n, mod in m.named_modules()} == modes
    assert (m.bn1.momentum, m.bn2.momentum) == (0.1, 0.2)
    for a, b in zip(before, bn_stats(m)):
        for x, y in zip(a, b):
            exact(x, y)


def test_errors(trained):
    model, batches, _ = trained
    m = copy.deepcopy(model)
    before = bn_stats(m)
    with pytest.raises(RuntimeError, match="no batches"):
        recalibrate_bn(m, [], num_batches=2)
    with pytest.raises(RuntimeError, match="no batches"):
        recalibrate_bn(m, iter(()), num_batches=2)
    for a, b in zip(before, bn_stats(m)):
        for x, y in zip(a, b):
            exact(x, y)
    assert not m.training and m.bn1.momentum == 0.1
    with pytest.raises(ValueError, match="has no BatchNorm layer to recalibrate"):
        recalibrate_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), batches, num_batches=1)
    with pytest.raises(ValueError, match="has no BatchNorm layer to recalibrate"):
        recalibrate_bn(nn.Sequential(nn.BatchNorm2d(1, track_running_stats=False)), batches, num_batches=1)
    for bad in (0, -1, 1.5, True, None):
        with pytest.raises(ValueError, match="num_batches"):
            recalibrate_bn(m, batches, num_batches=bad)
    with pytest.raises(TypeError, match="a batch must be"):
        recalibrate_bn(m, [{"x": 1}], num_batches=1)


def test_dropout_is_off(trained):
    model, batches, _ = trained
    with_drop = Net(dropout=0.5)
    with_drop.load_state_dict(model.state_dict())
    with_drop.train()
    without = copy.deepcopy(model)
    torch.manual_seed(123)
    recalibrate_bn(with_drop, batches, num_batches=4)
    recalibrate_bn(without, batches, num_batches=4)
    assert with_drop.training and with_drop.drop.training  # restored
    for a, b in zip(bn_stats(with_drop), bn_stats(without)):
        for x, y in zip(a, b):
            exact(x, y)
    with_drop.eval()
    x = batches[0][0]
    with torch.no_grad():
        exact(with_drop(x), with_drop(x))
        exact(with_drop(x), without(x))


def quantizer_state(model):
    return {
        f"{n}.{k}": v.detach().clone()
        for n, q in model.named_modules()
        if isinstance(q, FakeQuantizer)
        for k, v in q.state_dict().items()
    }


def test_qat_model(trained):
    model, batches, test = trained
    q = copy.deepcopy(model)
    prepare_qat(q, {"weight_bits": 4, "act_bits": 8, "weight_scale": "max"})
    calibrate(q, batches, num_batches=2)
    q.eval()
    acc_q = accuracy(q, test)
    qstate, weights = quantizer_state(q), {n: p.detach().clone() for n, p in q.named_parameters()}
    assert len(qstate) > 0
    before = bn_stats(q)
    corrupt(q)
    out = recalibrate_bn(q, batches, num_batches=len(batches))
    assert out["layers"] == 2
    after = quantizer_state(q)
    assert after.keys() == qstate.keys()
    for k in qstate:
        exact(after[k], qstate[k])
    for n, p in q.named_parameters():
        exact(p, weights[n])
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(before, bn_stats(q)))  # new statistics
    for bn, (mean, var) in zip(bns(q), hand_stats(q, batches)):  # those of the quantized network
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-4, atol=1e-5)
    assert accuracy(q, test) >= acc_q - 2.0


def test_pruned_model_keeps_masks_and_zeros(trained):
    model, batches, _ = trained
    p = copy.deepcopy(model)
    prune_model(p, {"criterion": "global_magnitude", "sparsity": 0.6})
    masked = {k: v.clone() for k, v in p.state_dict().items() if k.endswith("weight_mask")}
    assert masked
    weights = {n: w.detach().clone() for n, w in p.named_parameters()}
    zeros = {n: w == 0 for n, w in weights.items() if n.endswith("weight")}
    assert any(z.any() for z in zeros.values())
    recalibrate_bn(p, batches, num_batches=4)
    state = p.state_dict()
    for k, v in masked.items():
        exact(state[k], v)
    for n, w in p.named_parameters():
        exact(w, weights[n])
        if n in zeros:
            assert (w[zeros[n]] == 0).all()
