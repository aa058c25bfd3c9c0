"""pycompress.quant: fake quantizers against the formula, QAT layers on every backend, layer
selection, calibration, checkpoint round trips, re-preparation and model size."""

import copy
import io
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import prune

from pycompress import backends, models
from pycompress.ops import fake_quantize_ref
from pycompress.quant import (
    LSQ_EPS,
    FakeQuantizer,
    QuantConv2d,
    QuantLinear,
    QuantSpec,
    apply_plan,
    calibrate,
    is_qat,
    model_size,
    prepare_qat,
    qat_modules,
    qat_plan,
    strip_qat,
)

BACKENDS = backends.available("fake_quantize")


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def hand_quant(x, s, qmin, qmax):
    """The formula, written out: s * clamp(rint(x * (1/s)), qmin, qmax) (kernels multiply by 1/s)."""
    return torch.clamp(torch.round(x * torch.reciprocal(s)), qmin, qmax) * s


class Net(nn.Module):
    """Named children and nested Sequentials: layers stem, body.0 (depthwise), body.2, head.fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(4, 8, 1))
        self.head = nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flat=nn.Flatten(), fc=nn.Linear(8, 10)))

    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))))


def small_seq():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


# ----------------------------------------------------------------------------- FakeQuantizer vs formula


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["max", "frozen", "lsq"])
def test_weight_quantizer_matches_formula(bits, mode):
    w = torch.randn(4, 3, 3, 3)
    w[2] = 0.0  # a fully pruned output channel
    q = FakeQuantizer(bits, signed=True, axis=0, num_channels=4, mode=mode, kind="weight").init_from(w)
    out = q(w)
    m = w.abs().amax(dim=(1, 2, 3))
    s = torch.where(m > 0, m / max(2 ** (bits - 1) - 1, 1), torch.ones_like(m))  # qmax (1 for 1 bit)
    exact(out, hand_quant(w, s.view(-1, 1, 1, 1), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    exact(q.scale.detach(), s)
    assert (out[2] == 0).all() and torch.isfinite(out).all()
    codes = (out / s.view(-1, 1, 1, 1)).round()
    torch.testing.assert_close(codes * s.view(-1, 1, 1, 1), out)  # on the grid
    assert codes.min() >= -(2 ** (bits - 1)) and codes.max() <= 2 ** (bits - 1) - 1
    # the zero row also has finite gradients (straight-through, and LSQ for the scale)
    w2 = w.clone().requires_grad_()
    q(w2).sum().backward()
    assert torch.isfinite(w2.grad).all()
    if bits > 1:  # s = max|w| / qmax keeps every weight inside the clamp range: no gradient is cut
        assert (w2.grad == 1).all()
    if mode == "lsq":
        assert torch.isfinite(q.scale.grad).all() and q.scale.grad[2] == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantizer_unsigned_after_relu(bits):
    q = FakeQuantizer(bits, signed="auto", mode="frozen", kind="act", name="layer.act_quant")
    batches = [torch.relu(torch.randn(2, 3, 4, 4)) * k for k in (1.0, 2.0)]
    q.begin_calibration()
    for x in batches:
        assert q(x) is x  # observing passes data through unchanged
    assert q.end_calibration()
    assert q.is_signed is False and q.is_calibrated
    s = torch.stack([x.max() for x in batches]).max() / (2**bits - 1)
    exact(q.scale, s.reshape(1))
    x = torch.relu(torch.randn(2, 3, 4, 4)) * 3  # partly beyond the calibrated range: clamps
    exact(q(x), hand_quant(x, s, 0, 2**bits - 1))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_activation_quantizer_signed_otherwise(bits):
    q = FakeQuantizer(bits, signed="auto", mode="frozen", kind="act")
    x0 = torch.randn(2, 3, 4, 4)
    q.begin_calibration()
    q(x0)
    q.end_calibration()
    assert q.is_signed is True
    s = x0.abs().max() / (2 ** (bits - 1) - 1)
    exact(q.scale, s.reshape(1))
    x = torch.randn(2, 3, 4, 4) * 2
    exact(q(x), hand_quant(x, s, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
    # forced unsigned clips the negative part to 0
    qu = FakeQuantizer(bits, signed=False, mode="frozen", kind="act").init_from(x0)
    exact(qu(x), hand_quant(x, x0.max() / (2**bits - 1), 0, 2**bits - 1))


def test_lsq_gradients_and_grad_factor():
    w = torch.randn(3, 2, 2, 2)
    qw = FakeQuantizer(4, signed=True, axis=0, num_channels=3, mode="lsq", kind="weight").init_from(w * 0.7)
    assert isinstance(qw.scale, nn.Parameter)
    g = torch.randn_like(w)
    (qw(w) * g).sum().backward()
    s = qw.scale.detach().clone().requires_grad_()
    ref = fake_quantize_ref(w, s, torch.zeros(3), -8, 7, axis=0, grad_factor=1 / (8 * 7) ** 0.5)
    (ref * g).sum().backward()
    torch.testing.assert_close(qw.scale.grad, s.grad, rtol=1e-5, atol=1e-7)
    # activations: LSQ's N is the number of features per sample (3*4*4 here), not the batch size
    x = torch.randn(2, 3, 4, 4)
    qa = FakeQuantizer(3, signed=True, mode="lsq", kind="act").init_from(x * 0.5)
    (qa(x) * x).sum().backward()
    sa = qa.scale.detach().clone().requires_grad_()
    (fake_quantize_ref(x, sa, 0, -4, 3, grad_factor=1 / (48 * 3) ** 0.5) * x).sum().backward()
    torch.testing.assert_close(qa.scale.grad, sa.grad, rtol=1e-5, atol=1e-7)


def test_lsq_scale_stays_positive():
    q = FakeQuantizer(4, signed=True, mode="lsq", kind="act").init_from(torch.randn(8))
    with torch.no_grad():
        q.scale.fill_(-0.5)  # as if an optimizer step overshot
    x = torch.randn(8)
    out = q(x)
    exact(out, hand_quant(x, torch.tensor(LSQ_EPS), -8, 7))
    out.sum().backward()
    assert torch.isfinite(q.scale.grad).all() and q.scale.grad.abs().sum() > 0  # it can recover


def test_uncalibrated_activation_quantizer_raises_with_its_name():
    model = small_seq()
    prepare_qat(model, {"weight_bits": 4, "act_bits": 4})
    with pytest.raises(RuntimeError, match=r"'0\.act_quant' is not calibrated; run pycompress\.quant\.calibrate"):
        model(torch.randn(2, 2, 6, 6))
    with pytest.raises(ValueError, match="signed"):
        FakeQuantizer(4, signed="auto", mode="max")
    with pytest.raises(ValueError, match="bits"):
        FakeQuantizer(17)


def test_quantizer_state_dict_restores_exactly():
    q = FakeQuantizer(4, signed="auto", mode="lsq", kind="act")
    q.init_from(torch.relu(torch.randn(10)))
    assert set(q.state_dict()) == {"scale", "signed", "calibrated", "min_val", "max_val"}
    fresh = FakeQuantizer(4, signed="auto", mode="lsq", kind="act")
    assert not fresh.is_calibrated
    fresh.load_state_dict(q.state_dict())
    assert fresh.is_calibrated and fresh.is_signed is False
    x = torch.randn(10)
    exact(fresh(x), q(x))
    for k, v in q.state_dict().items():
        exact(fresh.state_dict()[k], v)


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["max", "frozen", "lsq"])
def test_qat_layers_match_reference_on_every_backend(backend, mode):
    conv = QuantConv2d(
        2,
        3,
        3,
        padding=1,
        weight_bits=4,
        act_bits=4,
        weight_scale=mode,
        act_scale="lsq" if mode == "lsq" else "frozen",
        act_signed=True,
    )
    lin = QuantLinear(
        5,
        4,
        weight_bits=3,
        act_bits=5,
        weight_scale=mode,
        act_scale="lsq" if mode == "lsq" else "frozen",
        act_signed=False,
    )
    x_conv, x_lin = torch.randn(2, 2, 4, 4), torch.relu(torch.randn(3, 5))
    conv.act_quant.init_from(x_conv * 0.5)  # part of x lies outside: the clamp branches run
    lin.act_quant.init_from(x_lin * 0.5)

    def run(layer, x, name):
        layer = copy.deepcopy(layer)
        x = x.clone().requires_grad_()
        with backends.use(name):
            out = layer(x)
            out.backward(torch.linspace(-1, 1, out.numel()).view_as(out))
        grads = {n: p.grad for n, p in layer.named_parameters()}
        return out.detach(), x.grad, grads

    for layer, x in ((conv, x_conv), (lin, x_lin)):
        out_r, gx_r, g_r = run(layer, x, "reference")
        out_b, gx_b, g_b = run(layer, x, backend)
        exact(out_b, out_r)
        exact(gx_b, gx_r)
        assert set(g_b) == set(g_r)
        for n in g_r:
            if n.endswith("scale"):  # a reduction: summation order may differ
                torch.testing.assert_close(g_b[n], g_r[n], rtol=1e-5, atol=1e-6, msg=f"{backend} {n}")
            else:
                exact(g_b[n], g_r[n])
        if mode == "lsq":
            assert {"weight_quant.scale", "act_quant.scale"} <= set(g_r)


def test_half_precision_and_autocast():
    model = small_seq()
    prepare_qat(model, {"weight_bits": 4, "act_bits": 8, "weight_scale": "lsq", "act_scale": "lsq"})
    x = torch.randn(2, 2, 6, 6)
    calibrate(model, [x])
    model.eval()
    ref = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    y.float().sum().backward()
    assert torch.isfinite(model[0].weight_quant.scale.grad).all()
    half = copy.deepcopy(model).to(torch.bfloat16)
    yh = half(x.bfloat16())
    assert yh.dtype == torch.bfloat16
    torch.testing.assert_close(yh.float(), ref, rtol=0.1, atol=0.1)


def test_16_bit_qat_is_close_to_float_forward_and_backward():
    model = small_seq()
    ref_model = copy.deepcopy(model)
    prepare_qat(model, {"weight_bits": 16, "act_bits": 16})
    x = torch.randn(4, 2, 6, 6)
    calibrate(model, [x])
    model.eval()
    ref_model.eval()
    # the calibration batch: every value lies inside its range (max/s == qmax), so no gradient is cut
    model(x).square().sum().backward()
    ref_model(x).square().sum().backward()
    for (n, p), (_, r) in zip(model.named_parameters(), ref_model.named_parameters()):
        torch.testing.assert_close(p.grad, r.grad, rtol=2e-3, atol=1e-4, msg=n)


def test_torch_compile_fullgraph_matches_eager():
    layer = QuantConv2d(2, 3, 3, padding=1, weight_bits=4, act_bits=4, weight_scale="max", act_scale="lsq")
    x = torch.randn(2, 2, 5, 5)
    layer.act_quant.init_from(x * 0.5)
    params = [layer.weight, layer.act_quant.scale]
    with backends.use("reference"):
        want = layer(x)
        want_g = torch.autograd.grad(want.sum(), params)
        got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        got_g = torch.autograd.grad(got.sum(), params)
    exact(got, want)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b)


def test_torch_compile_fullgraph_with_automatic_backend():
    # backend selection must not break the graph (it reads machine facts from the C extension)
    model = models.build("mobilenet_student", in_channels=1, num_classes=4)
    prepare_qat(model, {"weight_bits": 4, "act_bits": 8})
    x = torch.randn(2, 1, 16, 16)
    calibrate(model, [x], num_batches=1)
    want = model(x)
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    exact(got, want)


# ----------------------------------------------------------------------------- layers


def test_from_float_keeps_conv_geometry_and_parameters():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect")
    conv.eval()
    q = QuantConv2d.from_float(conv, weight_bits=8, act_bits=None)
    assert q.weight is conv.weight and q.bias is None and q.act_quant is None and not q.training
    for a in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(q, a) == getattr(conv, a)
    assert list(q.state_dict()) == ["weight"] + [
        f"weight_quant.{k}" for k in ("scale", "signed", "calibrated", "min_val", "max_val")
    ]
    x = torch.randn(1, 4, 7, 7)
    wq = q.weight_quant(conv.weight)
    exact(q(x), conv._conv_forward(x, wq, None))
    f = q.to_float()
    assert type(f) is nn.Conv2d and f.weight is conv.weight and f.padding_mode == "reflect" and f.dilation == (2, 2)
    baked = q.to_float(bake=True)
    assert baked.weight is not conv.weight and baked.weight.requires_grad
    exact(baked.weight.detach(), wq.detach())
    exact(baked(x), q(x))
    lin = nn.Linear(5, 2)
    ql = QuantLinear.from_float(lin, weight_bits=None, act_bits=6, act_signed=True)
    assert ql.weight_quant is None and ql.weight is lin.weight and ql.bias is lin.bias
    with pytest.raises(TypeError, match="plain"):
        QuantConv2d.from_float(q)


def test_qat_composes_with_torch_prune_masks():
    model = small_seq()
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    with torch.no_grad():
        model[0].weight_mask[1] = 0  # one fully pruned output channel
    float_keys = list(model.state_dict())
    prepare_qat(model, {"weight_bits": 4, "act_bits": None, "types": ["conv"]})
    conv = model[0]
    assert isinstance(conv, QuantConv2d) and {"weight_orig", "weight_mask"} <= set(
        dict(conv.named_buffers()) | dict(conv.named_parameters())
    )
    x = torch.randn(2, 2, 5, 5)
    model.eval()
    y = conv(x)
    w = conv.weight_orig * conv.weight_mask
    exact(y, conv._conv_forward(x, conv.weight_quant(w), conv.bias))
    assert (y[:, 1] == conv.bias[1]).all()
    strip_qat(model)
    assert list(model.state_dict()) == float_keys


# ----------------------------------------------------------------------------- selection


def names(plan):
    return {k: (v["weight_bits"], v["act_bits"]) for k, v in plan.items()}


def test_selection_types_include_exclude():
    assert list(prepare_qat(Net(), {"types": ["conv"]})) == ["stem", "body.0", "body.2"]
    assert list(prepare_qat(Net(), {"types": ["linear"]})) == ["head.fc"]
    assert list(prepare_qat(Net(), {"include": ["^body"]})) == ["body.0", "body.2"]
    assert list(prepare_qat(Net(), {"exclude": ["fc$", r"\.0$"]})) == ["stem", "body.2"]
    m = Net()
    prepare_qat(m, {"include": ["body"]})
    assert isinstance(m.body[0], QuantConv2d) and m.body[0].groups == 4 and type(m.stem) is nn.Conv2d


def test_selection_first_last_and_overrides():
    plan = prepare_qat(
        Net(), {"weight_bits": 4, "act_bits": 4, "first": "skip", "last": {"weight_bits": 8, "act_bits": None}}
    )
    assert names(plan) == {"body.0": (4, 4), "body.2": (4, 4), "head.fc": (8, None)}
    # first/last are the first/last *selected* layers
    plan = prepare_qat(Net(), {"types": ["conv"], "first": {"act_bits": None}, "last": "skip"})
    assert names(plan) == {"stem": (8, None), "body.0": (8, 8)}
    # overrides: later entries win, only the given keys; first/last are applied after them
    plan = prepare_qat(
        Net(),
        {
            "weight_bits": 4,
            "act_bits": 4,
            "first": {"act_bits": None},
            "overrides": [
                {"pattern": "body|stem", "weight_bits": 2},
                {"pattern": r"body\.2", "weight_bits": 6},
                {"pattern": "stem", "act_bits": 3},
            ],
        },
    )
    assert names(plan) == {"stem": (2, None), "body.0": (2, 4), "body.2": (6, 4), "head.fc": (4, 4)}
    # a layer left without any bits stays float
    plan = prepare_qat(Net(), {"overrides": [{"pattern": "fc", "weight_bits": None, "act_bits": None}]})
    assert "head.fc" not in plan


def test_selection_errors():
    with pytest.raises(ValueError, match="no layer matched"):
        prepare_qat(Net(), {"include": ["nothing"]})
    with pytest.raises(ValueError, match="neither weight_bits nor act_bits"):
        prepare_qat(Net(), {"weight_bits": None, "act_bits": None})
    with pytest.raises(ValueError, match="wrap it"):
        prepare_qat(nn.Conv2d(1, 1, 1), {})

    class MyConv(nn.Conv2d):
        pass

    # a subclass with (possibly) its own forward is left float, with a warning naming it (issue 19)
    net = nn.Sequential(nn.Conv2d(1, 1, 1), MyConv(1, 1, 1))
    with pytest.warns(UserWarning, match="left float: '1': a MyConv"):
        assert list(prepare_qat(net, {})) == ["0"]
    assert type(net[1]) is MyConv
    with pytest.raises(ValueError, match="'1'.*MyConv"):  # a plan naming it is refused
        apply_plan(nn.Sequential(nn.Conv2d(1, 1, 1), MyConv(1, 1, 1)), {"1": qat_plan(net)["0"]})
    with pytest.raises(ValueError, match="does not have"):
        apply_plan(
            Net(),
            {
                "nope": {
                    "type": "conv",
                    "weight_bits": 4,
                    "act_bits": 4,
                    "weight_scale": "max",
                    "act_scale": "frozen",
                    "act_signed": "auto",
                    "calib_batches": 1,
                }
            },
        )


@pytest.mark.parametrize(
    "d,key",
    [
        ({"wieght_bits": 4}, "wieght_bits"),
        ({"weight_bits": "4"}, "weight_bits"),
        ({"weight_bits": 17}, "weight_bits"),
        ({"act_bits": True}, "act_bits"),
        ({"types": ["conv3d"]}, "types"),
        ({"types": "conv"}, "types"),
        ({"include": ["("]}, "include"),
        ({"include": []}, "include"),
        ({"exclude": "fc"}, "exclude"),
        ({"first": "keep"}, "first"),
        ({"last": {"bits": 4}}, "last.bits"),
        ({"overrides": [{"weight_bits": 4}]}, "overrides[0]"),
        ({"overrides": [{"pattern": "a", "act_bits": 0}]}, "overrides[0].act_bits"),
        ({"weight_scale": "minmax"}, "weight_scale"),
        ({"act_scale": "max"}, "act_scale"),
        ({"act_signed": "yes"}, "act_signed"),
        ({"calib_batches": 0}, "calib_batches"),
    ],
)
def test_quantspec_rejects_bad_settings(d, key):
    with pytest.raises(ValueError, match=rf"QuantSpec: {__import__('re').escape(key)}"):
        QuantSpec.from_dict(d)


def test_quantspec_round_trips():
    d = {
        "weight_bits": 4,
        "act_bits": None,
        "types": ["conv"],
        "include": ["cnn"],
        "exclude": ["fc"],
        "first": "skip",
        "last": {"act_bits": 8},
        "overrides": [{"pattern": "x", "weight_bits": 2}],
        "weight_scale": "lsq",
        "act_scale": "lsq",
        "act_signed": False,
        "calib_batches": 2,
    }
    spec = QuantSpec.from_dict(d)
    assert spec.to_dict() == d
    assert QuantSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert QuantSpec.from_dict({}) == QuantSpec()


# ----------------------------------------------------------------------------- workflow


def test_prepare_calibrate_train_checkpoint_restore_strip():
    def build(seed):
        torch.manual_seed(seed)
        return models.build("mobilenet_student", in_channels=1, num_classes=10)

    model = build(0)
    float_keys = list(model.state_dict())
    plan = prepare_qat(
        model, {"weight_bits": 4, "act_bits": 4, "weight_scale": "lsq", "act_scale": "lsq", "first": {"act_bits": None}}
    )
    assert is_qat(model) and list(qat_modules(model)) == list(plan)
    assert plan["cnn.0.0"]["act_bits"] is None and model.cnn[0][0].act_quant is None
    data = [(torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))) for _ in range(3)]
    summary = calibrate(model, data, num_batches=2)
    assert summary["cnn.1.0.act_quant"]["signed"] is False  # after ReLU6
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    s0 = model.cnn[1][3].weight_quant.scale.detach().clone()
    model.train()
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(model.cnn[1][3].weight_quant.scale.detach(), s0)  # LSQ learned
    model.eval()
    x = torch.randn(2, 1, 28, 28)
    ref = model(x)

    buf = io.BytesIO()
    torch.save({"plan": json.dumps(qat_plan(model)), "state_dict": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    fresh = build(1)
    apply_plan(fresh, json.loads(ckpt["plan"]))
    fresh.load_state_dict(ckpt["state_dict"])
    fresh.eval()
    exact(fresh(x), ref)
    assert qat_plan(fresh) == plan

    strip_qat(fresh)
    assert not is_qat(fresh) and list(fresh.state_dict()) == float_keys
    from pycompress.nn import DepthwiseConv2d

    # the student's depthwise layers are pycompress.nn.DepthwiseConv2d; stripping QAT restores that class
    assert type(fresh.cnn[1][0]) is DepthwiseConv2d and fresh.cnn[1][0].groups == 16


def test_reprepare_8_then_4_bits_keeps_weights():
    model = small_seq()
    x = torch.randn(2, 2, 6, 6)
    prepare_qat(model, {"weight_bits": 8, "act_bits": 8})
    calibrate(model, [x])
    w = model[0].weight
    w0 = w.detach().clone()
    act8 = model[3].act_quant
    plan = prepare_qat(model, {"weight_bits": 4, "act_bits": 4})
    assert model[0].weight is w and torch.equal(w.detach(), w0)
    assert all(v["weight_bits"] == 4 for v in plan.values())
    assert model[3].act_quant is not act8 and not model[3].act_quant.is_calibrated
    with pytest.raises(RuntimeError, match="not calibrated"):
        model(x)
    calibrate(model, [x])
    model(x)
    # an unchanged configuration keeps its quantizers and their state
    aq = model[3].act_quant
    prepare_qat(model, {"weight_bits": 4, "act_bits": 4})
    assert model[3].act_quant is aq and aq.is_calibrated
    # only the scale mode changed: the calibration carries over into the learned scale
    prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "act_scale": "lsq"})
    assert isinstance(model[3].act_quant.scale, nn.Parameter) and model[3].act_quant.is_calibrated
    exact(model[3].act_quant.scale.detach(), aq.scale)
    # layers the new spec leaves out go back to float
    prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "types": ["linear"]})
    assert type(model[0]) is nn.Conv2d and model[0].weight is w and isinstance(model[7], QuantLinear)


def test_calibrate_batches_modes_and_errors():
    model = small_seq()
    prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "calib_batches": 2})
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="no batches"):
        calibrate(model, [])
    for k, v in model.state_dict().items():
        exact(v, before[k])
    with pytest.raises(TypeError, match="batch must be a tensor"):
        calibrate(model, [{"x": 1}])
    calls = []
    model[0].register_forward_hook(lambda *a: calls.append(1))
    model.train()
    model[1].eval()
    pulled = []

    def gen():
        for i in range(5):
            pulled.append(i)
            yield [torch.randn(2, 2, 6, 6), torch.zeros(2)]

    calibrate(model, gen())  # default: the spec's calib_batches
    assert len(calls) == 2 and pulled == [0, 1]
    assert model.training and model[0].training and not model[1].training
    calls.clear()
    calibrate(model, (torch.randn(2, 2, 6, 6) for _ in range(5)), num_batches=3)
    assert len(calls) == 3
    assert calibrate(model, [torch.randn(2, 2, 6, 6)], only_uncalibrated=True) == {}


def test_model_size_by_hand():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    )
    fp = model_size(model)
    # conv 72 + 4, BN 4 + 4 + running 4 + 4 (num_batches_tracked not counted), linear 20 + 5
    assert fp["bits"] == fp["fp32_bits"] == (76 + 16 + 25) * 32
    prepare_qat(model, {"weight_bits": 4, "act_bits": 8, "types": ["conv"]})
    size = model_size(model)
    conv_bits = 72 * 4 + 4 * 32 + 32 + 4 * 32  # 4-bit weights, 4 channel scales, 1 act scale, fp32 bias
    assert size["layers"]["0"] == {
        "params": 76,
        "weight_bits": 4,
        "act_bits": 8,
        "bits": conv_bits,
        "fp32_bits": 76 * 32,
    }
    assert size["layers"]["1"]["bits"] == 16 * 32 and size["layers"]["5"]["bits"] == 25 * 32
    assert size["bits"] == conv_bits + 16 * 32 + 25 * 32 == 1888
    assert size["bytes"] == 236 and size["fp32_bytes"] == 468 and size["mb"] == 236e-6
    assert size["compression"] == pytest.approx(3744 / 1888)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_qat_on_cuda_with_autocast():
    dev = torch.device("cuda")
    model = models.build("mobilenet_student", in_channels=1, num_classes=10).to(dev)
    plan = prepare_qat(model, {"weight_bits": 4, "act_bits": 4, "weight_scale": "lsq", "act_scale": "lsq"})
    assert model.cnn[1][0].weight_quant.scale.device.type == "cuda"
    x = torch.randn(4, 1, 28, 28)
    calibrate(model, [x])  # moved to the model's device
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with torch.autocast("cuda", dtype=torch.float16):
        loss = model(x.to(dev)).float().logsumexp(1).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(model.cnn[1][0].act_quant.scale.grad).all()
    model.eval()
    ref = model(x.to(dev))
    fresh = models.build("mobilenet_student", in_channels=1, num_classes=10).to(dev)
    apply_plan(fresh, plan)
    fresh.load_state_dict(model.state_dict())
    exact(fresh.eval()(x.to(dev)), ref)
    for name in backends.available("fake_quantize"):
        if name in ("cuda", "triton"):
            with backends.use(name):
                torch.testing.assert_close(model(x.to(dev)), ref, rtol=0, atol=0)


def test_quantizer_forward_skips_value_checks_and_loading_checks_the_scale(monkeypatch):
    """FakeQuantizer keeps its state valid itself, so its forward skips fake_quantize's per-call
    value checks (tens of microseconds on a CPU); a loaded scale is checked once instead."""
    import sys

    from pycompress.quant.quantizer import FakeQuantizer

    fq_mod = sys.modules["pycompress.ops.fake_quantize"]
    calls = []
    real = fq_mod._check_scale_values
    monkeypatch.setattr(fq_mod, "_check_scale_values", lambda s: calls.append(1) or real(s))
    q = FakeQuantizer(4, axis=0, num_channels=3, kind="weight")
    w = torch.randn(3, 5)
    q.init_from(w)
    out = q(w)
    assert calls == [] and out.shape == w.shape
    fq_mod.fake_quantize(w, q.scale, torch.zeros(3), -8, 7, 0)  # a direct call still checks
    assert calls == [1]
    state = q.state_dict()
    q2 = FakeQuantizer(4, axis=0, num_channels=3, kind="weight")
    q2.load_state_dict(state)
    assert torch.equal(q2(w), out)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        broken = {k: v.clone() for k, v in state.items()}
        broken["scale"][1] = bad
        with pytest.raises(ValueError, match="loaded scale must be positive and finite"):
            FakeQuantizer(4, axis=0, num_channels=3, kind="weight").load_state_dict(broken)
