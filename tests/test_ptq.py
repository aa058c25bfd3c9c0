"""Activation observers (min-max, percentile) and post-training quantization
(pycompress.quant.quantize_post_training)."""

import copy
import json
import re

import pytest
import torch
import torch.nn as nn

from pycompress.quant import (
    FakeQuantizer,
    QuantConv2d,
    QuantSpec,
    apply_plan,
    calibrate,
    prepare_qat,
    qat_modules,
    qat_plan,
    quantize_post_training,
    scale_from_range,
)
from pycompress.quant import quantizer as quantizer_mod
from tests.helpers import accuracy, train_on_quadrants


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def observe(q, batches):
    q.begin_calibration()
    for x in batches:
        assert q(x) is x  # observing passes data through unchanged
    assert q.end_calibration()
    return q


def state(q):
    return {k: v.clone() for k, v in q.state_dict().items()}


# ----------------------------------------------------------------------------- the observer


@pytest.mark.parametrize("axis,signed", [(None, "auto"), (None, True), (1, "auto"), (1, False)])
def test_percentile_100_is_minmax_bit_exact(axis, signed):
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, 5, generator=g) * (i + 1) + 0.3 * i for i in range(3)]
    c = 3 if axis is not None else 1
    qa = observe(FakeQuantizer(6, signed=signed, axis=axis, num_channels=c), batches)
    qb = observe(
        FakeQuantizer(6, signed=signed, axis=axis, num_channels=c, observer="percentile", percentile=100), batches
    )
    sa, sb = state(qa), state(qb)
    assert sa.keys() == sb.keys()
    for k in sa:
        exact(sa[k], sb[k])
    assert qa.is_signed == qb.is_signed
    for x in batches:
        exact(qa(x), qb(x))


def test_percentile_100_is_minmax_through_calibrate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    data = [torch.randn(3, 2, 8, 8) for _ in range(3)]
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    prepare_qat(a, {"weight_bits": 4, "act_bits": 4})
    prepare_qat(b, {"weight_bits": 4, "act_bits": 4, "act_observer": "percentile", "act_percentile": 100})
    assert calibrate(a, data) == calibrate(b, data)
    x = torch.randn(2, 2, 8, 8)
    exact(a(x), b(x))


def test_percentile_clips_outliers():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 16, 16, generator=g)
    bulk = torch.ones_like(x, dtype=torch.bool)
    idx = torch.randperm(x.numel(), generator=g)[:5]  # 5 huge outliers in 8192 values
    x.view(-1)[idx] = 200.0
    bulk.view(-1)[idx] = False
    mm = observe(FakeQuantizer(8), [x])
    pc = observe(FakeQuantizer(8, observer="percentile", percentile=99), [x])
    assert mm.is_signed and pc.is_signed
    assert pc.scale.item() < mm.scale.item() / 20
    mse_mm = ((mm(x) - x)[bulk] ** 2).mean()
    mse_pc = ((pc(x) - x)[bulk] ** 2).mean()
    assert mse_pc < mse_mm / 10
    assert pc.min_val.item() < 0 < pc.max_val.item() < 5  # what the scale came from


def test_mean_of_batch_percentiles_by_hand():
    g = torch.Generator().manual_seed(2)
    x1 = torch.rand(4, 3, 7, 7, generator=g) * 3.0 + 0.5  # all >= 0.5 ...
    x2 = torch.rand(5, 3, 7, 7, generator=g) * 5.0 + 0.5
    x2[0, 0, 0, 0] = -0.25  # ... but one negative value
    p = 99.0
    q = observe(FakeQuantizer(4, signed="auto", observer="percentile", percentile=p), [x1, x2])
    qq = torch.tensor([1 - p / 100, p / 100])
    lo1, hi1 = torch.quantile(x1.flatten(), qq)
    lo2, hi2 = torch.quantile(x2.flatten(), qq)
    lo, hi = (lo1 + lo2) / 2, (hi1 + hi2) / 2
    assert lo > 0  # the percentile range is non-negative, ...
    assert q.is_signed is True  # ... the true minimum is not: "auto" takes the true minimum
    exact(q.min_val, lo.reshape(1))
    exact(q.max_val, hi.reshape(1))
    exact(q.scale, scale_from_range(lo.reshape(1), hi.reshape(1), 4, True))
    # without the negative value: unsigned
    x2[0, 0, 0, 0] = 1.0
    q = observe(FakeQuantizer(4, signed="auto", observer="percentile", percentile=p), [x1, x2])
    assert q.is_signed is False

    # per channel (axis 1): the same rule per channel
    qc = observe(FakeQuantizer(4, signed=True, axis=1, num_channels=3, observer="percentile", percentile=p), [x1, x2])
    rows = [x.transpose(0, 1).reshape(3, -1) for x in (x1, x2)]
    (l1, h1), (l2, h2) = (torch.quantile(r, qq, dim=1) for r in rows)
    exact(qc.min_val, (l1 + l2) / 2)
    exact(qc.max_val, (h1 + h2) / 2)
    exact(qc.scale, scale_from_range((l1 + l2) / 2, (h1 + h2) / 2, 4, True))


def test_large_batches_are_subsampled_deterministically(monkeypatch):
    monkeypatch.setattr(quantizer_mod, "QUANTILE_MAX_ELEMENTS", 1000)
    x = torch.randn(3, 4, 20, 20, generator=torch.Generator().manual_seed(3))  # 4800 elements: every 5th
    q = observe(FakeQuantizer(8, observer="percentile", percentile=99.9), [x])
    lo, hi = torch.quantile(x.flatten()[::5], torch.tensor([1 - 0.999, 0.999]))
    exact(q.min_val, lo.reshape(1))
    exact(q.max_val, hi.reshape(1))
    # per channel: 4 channels x 1200 each, every 5th of each channel
    qc = observe(FakeQuantizer(8, axis=1, num_channels=4, observer="percentile", percentile=99.9), [x])
    lo, hi = torch.quantile(x.transpose(0, 1).reshape(4, -1)[:, ::5], torch.tensor([1 - 0.999, 0.999]), dim=1)
    exact(qc.min_val, lo)
    exact(qc.max_val, hi)


def test_observer_settings_refused_with_the_key():
    for d, key in [
        ({"act_observer": "mean"}, "act_observer"),
        ({"act_observer": None}, "act_observer"),
        ({"act_percentile": 50}, "act_percentile"),
        ({"act_percentile": 100.5}, "act_percentile"),
        ({"act_percentile": True}, "act_percentile"),
        ({"act_percentile": "99"}, "act_percentile"),
        ({"act_percentile": float("nan")}, "act_percentile"),
        ({"act_obsrever": "minmax"}, "act_obsrever"),
    ]:
        with pytest.raises(ValueError, match=rf"QuantSpec: {key}"):
            QuantSpec.from_dict(d)
    with pytest.raises(ValueError, match="observer"):
        FakeQuantizer(8, observer="histogram")
    with pytest.raises(ValueError, match="percentile"):
        FakeQuantizer(8, observer="percentile", percentile=10)
    with pytest.raises(ValueError, match="mode 'max'"):
        FakeQuantizer(8, mode="max", observer="percentile")
    with pytest.raises(ValueError, match="act_observer"):
        QuantConv2d(1, 1, 1, act_observer="max")
    with pytest.raises(ValueError, match="act_percentile"):
        QuantConv2d(1, 1, 1, act_percentile=0)

    net = nn.Sequential(nn.Conv2d(1, 2, 3))
    entry = qat_plan(_prepared(net))["0"]
    for bad, key in [
        ({"act_observer": "mean"}, "act_observer"),
        ({"act_percentile": 50.0}, "act_percentile"),
        ({"act_percentile": "high"}, "act_percentile"),
    ]:
        with pytest.raises(ValueError, match=re.escape(f"plan['0'].{key}")):
            apply_plan(nn.Sequential(nn.Conv2d(1, 2, 3)), {"0": {**entry, **bad}})
    with pytest.raises(ValueError, match=r"unknown keys \['act_obs'\]"):
        apply_plan(nn.Sequential(nn.Conv2d(1, 2, 3)), {"0": {**entry, "act_obs": "minmax"}})


def _prepared(net, **spec):
    net = copy.deepcopy(net)
    prepare_qat(net, {"weight_bits": 4, "act_bits": 8, **spec})
    return net


def test_quantspec_observer_round_trip_and_old_dicts():
    spec = QuantSpec.from_dict({"act_observer": "percentile", "act_percentile": 99})
    assert spec.act_percentile == 99.0 and isinstance(spec.act_percentile, float)
    d = spec.to_dict()
    assert d["act_observer"] == "percentile" and d["act_percentile"] == 99.0
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == spec
    # at their defaults the new keys stay out of to_dict (a spec written before them is unchanged)
    assert "act_observer" not in QuantSpec().to_dict() and "act_percentile" not in QuantSpec().to_dict()
    assert QuantSpec.from_dict(QuantSpec().to_dict()) == QuantSpec()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 3))


def test_plan_without_the_new_keys_still_applies():
    model = _prepared(_net())
    data = [torch.randn(3, 2, 8, 8) for _ in range(2)]
    calibrate(model, data)
    old_plan = {
        n: {k: v for k, v in e.items() if k not in ("act_observer", "act_percentile")}
        for n, e in qat_plan(model).items()
    }
    fresh = _net()
    apply_plan(fresh, json.loads(json.dumps(old_plan)))
    fresh.load_state_dict(model.state_dict())
    for e in qat_plan(fresh).values():
        assert e["act_observer"] == "minmax" and e["act_percentile"] == 99.99
    assert qat_plan(fresh) == qat_plan(model)
    x = torch.randn(2, 2, 8, 8)
    exact(fresh(x), model(x))


def test_qat_plan_round_trip_keeps_observer():
    model = _prepared(_net(), act_observer="percentile", act_percentile=99.5)
    calibrate(model, [torch.randn(3, 2, 8, 8) for _ in range(2)])
    plan = json.loads(json.dumps(qat_plan(model)))
    assert all(e["act_observer"] == "percentile" and e["act_percentile"] == 99.5 for e in plan.values())
    fresh = _net()
    apply_plan(fresh, plan)
    fresh.load_state_dict(model.state_dict())
    for name, m in qat_modules(fresh).items():
        aq, ref = m.act_quant, qat_modules(model)[name].act_quant
        assert aq.observer == "percentile" and aq.percentile == 99.5 and aq.config() == ref.config()
        exact(aq.scale, ref.scale)
        assert aq.is_signed == ref.is_signed
    assert qat_plan(fresh) == plan
    x = torch.randn(2, 2, 8, 8)
    exact(fresh(x), model(x))


def test_reprepare_observer_change_needs_calibration():
    data = [torch.randn(3, 2, 8, 8) for _ in range(2)]
    model = _prepared(_net())
    calibrate(model, data)
    prepare_qat(model, {"weight_bits": 4, "act_bits": 8, "act_percentile": 99.0})  # unused by minmax
    assert all(m.act_quant.is_calibrated for m in qat_modules(model).values())
    spec = {"weight_bits": 4, "act_bits": 8, "act_observer": "percentile", "act_percentile": 99.0}
    prepare_qat(model, spec)
    assert not any(m.act_quant.is_calibrated for m in qat_modules(model).values())
    # first layer: the true minimum is < 0, the percentile range is not: signed
    x = data[0].abs()
    x[0, 0, 0, 0] = -1e-3
    calibrate(model, [x])
    first = model[0].act_quant
    assert first.is_signed is True and first.min_val.item() >= 0
    before = first.scale.clone()
    # only the scale mode changes: the percentile range, its signedness and scale are kept
    prepare_qat(model, {**spec, "act_scale": "lsq"})
    assert model[0].act_quant.is_calibrated and model[0].act_quant.is_signed is True
    exact(model[0].act_quant.scale.detach(), before)


# ----------------------------------------------------------------------------- post-training quantization


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc(self.features(x))


@pytest.fixture(scope="module")
def trained():
    """TinyCNN trained 40 steps on the quadrant task under strong noise (~88%, not 100%, so a change
    of accuracy can show); 1 point of accuracy = 41 test images."""
    return train_on_quadrants(TinyCNN, steps=40, n_test=4096, noise=1.2)


def test_ptq_8bit_keeps_accuracy(trained):
    model, batches, test = trained
    acc = accuracy(model, test)
    assert 80 < acc < 97
    q = copy.deepcopy(model).train()
    out = quantize_post_training(q, {"weight_bits": 8, "act_bits": 8}, batches, num_batches=4)
    assert not any(m.training for m in q.modules())
    assert out["plan"] == qat_plan(q) and len(out["plan"]) == 3
    assert set(out["calibration"]) == {f"{n}.act_quant" for n in out["plan"]}
    assert abs(accuracy(q, test) - acc) < 1.0
    with torch.no_grad():
        ref, got = model(test[0]), q(test[0])
    assert (got - ref).abs().mean() < 0.03 * ref.abs().mean()
    assert (got - ref).abs().max() < 0.2 * ref.abs().max()


@pytest.mark.parametrize("observer", ["minmax", "percentile"])
def test_ptq_4bit_weights(trained, observer):
    model, batches, test = trained
    q = copy.deepcopy(model)
    out = quantize_post_training(q, {"weight_bits": 4, "act_bits": 8, "act_observer": observer}, batches)
    assert all(e["weight_bits"] == 4 and e["act_observer"] == observer for e in out["plan"].values())
    for m in qat_modules(q).values():
        w = m.quantized_weight().detach()
        codes = w / m.weight_quant.scale.view(-1, *[1] * (w.dim() - 1))
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)  # integer codes ...
        assert codes.round().abs().max() <= 7  # ... on the 4-bit grid
    assert accuracy(q, test) > accuracy(model, test) - 3


def test_ptq_weight_scale_modes_agree(trained):
    model, batches, test = trained
    outs = []
    for mode in ("max", "frozen", "lsq"):
        q = copy.deepcopy(model)
        quantize_post_training(q, {"weight_bits": 4, "act_bits": 8, "weight_scale": mode}, batches, num_batches=2)
        with torch.no_grad():
            outs.append(q(test[0][:64]))
    exact(outs[0], outs[1])
    exact(outs[0], outs[2])


def test_ptq_round_trip_exact(trained):
    model, batches, test = trained
    q = copy.deepcopy(model)
    out = quantize_post_training(
        q,
        {"weight_bits": 4, "act_bits": 4, "act_observer": "percentile", "act_percentile": 99.9},
        batches,
        num_batches=3,
        device="cpu",
    )
    saved = {"plan": json.loads(json.dumps(out["plan"])), "state_dict": copy.deepcopy(q.state_dict())}
    fresh = TinyCNN()
    apply_plan(fresh, saved["plan"])
    fresh.load_state_dict(saved["state_dict"])
    fresh.eval()
    with torch.no_grad():
        exact(fresh(test[0]), q(test[0]))


def test_ptq_empty_batches_raise(trained):
    with pytest.raises(RuntimeError, match="no batches"):
        quantize_post_training(copy.deepcopy(trained[0]), {}, [])
