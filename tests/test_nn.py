"""pycompress.nn: DepthwiseConv2d as a drop-in for nn.Conv2d, swap_depthwise (and fusion with BN +
activation), the QAT conv routing depthwise layers to the fused op, and the model zoo using it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from pycompress import backends
from pycompress.models import build
from pycompress.nn import DepthwiseConv2d, DepthwiseConvBNAct, conv2d, depthwise_supported, swap_depthwise
from tests.helpers import device_for

BACKENDS = [b for b in backends.available("depthwise_conv2d") if device_for(b).type == "cpu"]


def small_net(c=4):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, c, 3, 1, 1),
        nn.BatchNorm2d(c),
        nn.ReLU6(),
        nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, groups=c), nn.BatchNorm2d(c), nn.ReLU6(), nn.Conv2d(c, 2 * c, 1)),
        nn.Sequential(nn.Conv2d(2 * c, 2 * c, 5, 2, 2, groups=2 * c), nn.BatchNorm2d(2 * c), nn.ReLU()),
        nn.Conv2d(2 * c, 2 * c, 3, 3, groups=2 * c),  # stride 3: not supported, stays
        nn.Conv2d(2 * c, 2 * c, 3, 1, 1, groups=c),  # multiplier 2 / groups c: not depthwise, stays
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * c, 3),
    )


def _warm_bn(m, x):
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_model_gives_same_outputs_and_gradients(backend):
    ref = small_net()
    x = torch.randn(2, 1, 9, 9)
    got = copy.deepcopy(ref)
    assert swap_depthwise(got) == 2
    assert type(got[3][0]) is DepthwiseConv2d and type(got[4][0]) is DepthwiseConv2d
    assert type(got[5]) is nn.Conv2d and type(got[6]) is nn.Conv2d
    assert got.state_dict().keys() == ref.state_dict().keys()
    assert got[3][0].weight is not ref[3][0].weight  # deepcopy: independent copies
    with backends.use(backend):
        y = got(x)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(y)
    with backends.use(backend):
        ga = torch.autograd.grad(y, list(got.parameters()), g)
    gb = torch.autograd.grad(y_ref, list(ref.parameters()), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_inference_matches_eval_chain(backend):
    m = small_net()
    x = torch.randn(3, 1, 9, 9)
    _warm_bn(m, x)  # non-trivial running statistics
    m.eval()
    fused = copy.deepcopy(m)
    with pytest.raises(ValueError, match="eval"):
        swap_depthwise(copy.deepcopy(m).train(), fuse=True)
    assert swap_depthwise(fused, fuse=True) == 2
    assert isinstance(fused[3][0], DepthwiseConvBNAct) and isinstance(fused[3][1], nn.Identity)
    assert fused[4][0].act == "relu" and fused[3][0].act == "relu6"
    with torch.no_grad(), backends.use(backend):
        torch.testing.assert_close(fused(x), m(x), rtol=1e-4, atol=1e-5)


def test_depthwise_layer_checks_and_from_conv_shares_parameters():
    with pytest.raises(ValueError, match="stride"):
        DepthwiseConv2d(4, 3, stride=3)
    with pytest.raises(ValueError, match="square kernels"):
        DepthwiseConv2d(4, 4)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
    dw = DepthwiseConv2d.from_conv(conv)
    assert dw.weight is conv.weight and dw.bias is conv.bias
    assert "not depthwise" in depthwise_supported(nn.Conv2d(4, 8, 3, groups=4))
    assert "padding_mode" in depthwise_supported(nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"))
    with pytest.raises(ValueError, match="not depthwise"):
        DepthwiseConv2d.from_conv(nn.Conv2d(4, 8, 3, groups=4))


def test_conv2d_routes_only_supported_depthwise(monkeypatch):
    calls = []
    import pycompress.nn as pnn

    real = pnn.depthwise_conv2d
    monkeypatch.setattr(pnn, "depthwise_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(1, 4, 6, 6)
    conv2d(x, torch.randn(4, 1, 3, 3), None, 1, 1, 1, 4)
    assert calls == [1]
    conv2d(x, torch.randn(8, 1, 3, 3), None, 1, 1, 1, 4)  # multiplier 2
    conv2d(x, torch.randn(4, 1, 3, 3), None, 3, 1, 1, 4)  # stride 3
    conv2d(x, torch.randn(4, 4, 3, 3), None, 1, 1, 1, 1)  # dense
    assert calls == [1]


def test_conv2d_never_falls_back_when_a_backend_is_pinned(monkeypatch):
    """Under auto an unsupported depthwise geometry runs on F.conv2d; a pinned backend refuses it,
    naming why. Dense and multiplier-2 grouped convs are not the op and always run on F.conv2d."""
    x = torch.randn(1, 4, 9, 9)
    w = torch.randn(4, 1, 3, 3)
    ref = nn.functional.conv2d(x, w, None, 3, 1, 1, 4)
    assert torch.equal(conv2d(x, w, None, 3, 1, 1, 4), ref)
    for pin in ("cpu", "reference"):
        with backends.use(pin):
            with pytest.raises(backends.BackendError, match=f"backend '{pin}'.*stride 3"):
                conv2d(x, w, None, 3, 1, 1, 4)
            with pytest.raises(backends.BackendError, match="kernel 9x9"):
                conv2d(x, torch.randn(4, 1, 9, 9), None, 1, 4, 1, 4)
            with pytest.raises(backends.BackendError, match="padding 'same'"):
                conv2d(x, w, None, 1, "same", 1, 4)
            assert conv2d(x, torch.randn(8, 4, 3, 3), None, 1, 1, 1, 1).shape == (1, 8, 9, 9)
            assert conv2d(x, torch.randn(8, 1, 3, 3), None, 1, 1, 1, 4).shape == (1, 8, 9, 9)
    monkeypatch.setenv("PYCOMPRESS_BACKEND", "reference")
    with pytest.raises(backends.BackendError, match="stride 3"):
        conv2d(x, w, None, 3, 1, 1, 4)


def test_qat_depthwise_layers_use_the_fused_op(monkeypatch):
    from pycompress.quant import calibrate, prepare_qat, strip_qat

    m = build("mobilenet_student", in_channels=1, num_classes=4, width_mult=0.5)
    ref = build("mobilenet_student", in_channels=1, num_classes=4, width_mult=0.5, fused_depthwise=False)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 16, 16)
    spec = {"weight_bits": 4, "act_bits": 8}
    for net in (m, ref):
        prepare_qat(net, spec)
        calibrate(net, [(x, None)], num_batches=1)
    assert type(m.cnn[1][0]).__name__ == "QuantConv2d"
    import pycompress.nn as pnn

    calls = []
    real = pnn.depthwise_conv2d
    monkeypatch.setattr(pnn, "depthwise_conv2d", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.testing.assert_close(m(x), ref(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == 14  # 7 depthwise layers in each of the two models (QAT convs route both)
    plain = strip_qat(m)
    assert type(plain.cnn[1][0]) is DepthwiseConv2d and type(plain.cnn[1][3]) is nn.Conv2d


def test_zoo_student_uses_the_layer_and_keeps_keys():
    m = build("mobilenet_student", in_channels=3, num_classes=11)
    t = build("mobilenet_student", in_channels=3, num_classes=11, fused_depthwise=False)
    assert sum(type(x) is DepthwiseConv2d for x in m.modules()) == 7
    assert m.state_dict().keys() == t.state_dict().keys()
    with pytest.raises(TypeError, match="fused_depthwise"):
        build("mobilenet_student", in_channels=3, num_classes=11, fused_depthwise="yes")


def test_compile_deepcopy_and_autocast():
    m = build("mobilenet_student", in_channels=1, num_classes=4, width_mult=0.5).eval()
    x = torch.randn(2, 1, 16, 16)
    y = m(x)
    torch.testing.assert_close(copy.deepcopy(m)(x), y)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), y, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = m(x)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), y, rtol=0.1, atol=0.1)
