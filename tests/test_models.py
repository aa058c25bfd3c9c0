"""Model zoo: registry API, shapes/backward on small inputs, exact parameter counts, errors."""

import pytest
import torch
import torch.nn as nn

from pycompress import models
from pycompress.models import build, names

# Real CPU forward + backward, one entry per distinct code path, with small architecture kwargs
# (the 2-core test budget). Every registered name is also run with its default arguments on the
# meta device below (shapes and autograd without compute).
REAL = {
    "lenet300": {},
    "lenet5": {},
    "mobilenet_student": {},
    "resnet18": {},
    "resnet20": {},
    "cifar_resnet": {"depth": 11, "block": "bottleneck"},
    "preresnet": {"depth": 8},
    "preresnet-bottleneck": {"depth": 11, "block": "bottleneck"},
    "densenet_bc": {"depth": 22},
    "densenet_bc-basic": {"depth": 13, "bottleneck": False, "dropout": 0.2},
    "wrn": {"depth": 10, "widen_factor": 2, "dropout": 0.3},
    "vgg11": {},
    "vgg11_bn": {},
}
# Models whose input size is a constructor argument.
SIZED = {"lenet300", "lenet5"}

# (in_channels, H=W) every registered model must accept.
INPUTS = [(1, 28), (3, 32)]

EXPECTED_NAMES = {
    "lenet300",
    "lenet5",
    "mobilenet_student",
    "resnet18",
    "cifar_resnet",
    "resnet20",
    "resnet56",
    "resnet110",
    "preresnet",
    "densenet_bc",
    "wrn",
    "vgg",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_names_sorted_and_complete():
    got = names()
    assert got == sorted(got)
    assert EXPECTED_NAMES <= set(got)


def _run(name, in_channels, size, kwargs, device):
    kwargs = dict(kwargs)
    if name in SIZED:
        kwargs["input_size"] = size
    with torch.device(device):
        model = build(name, in_channels=in_channels, num_classes=7, **kwargs)
        model.train()
        x = torch.randn(2, in_channels, size, size)
        out = model(x)
        assert out.shape == (2, 7)
        assert out.dtype == torch.float32
        out.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads)
    return grads


@pytest.mark.parametrize("key", sorted(REAL))
@pytest.mark.parametrize("in_channels,size", INPUTS)
def test_builds_forward_backward_cpu(key, in_channels, size):
    name = key.split("-")[0]
    grads = _run(name, in_channels, size, REAL[key], "cpu")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", sorted(EXPECTED_NAMES))
@pytest.mark.parametrize("in_channels,size", INPUTS)
def test_every_name_default_args_forward_backward_meta(name, in_channels, size):
    _run(name, in_channels, size, {}, "meta")


def test_mobilenet_student_large_input_and_eval_mode():
    m = build("mobilenet_student", in_channels=3, num_classes=11).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 48)).shape == (1, 11)


@pytest.mark.parametrize("name", ["wrn", "densenet_bc", "cifar_resnet"])
def test_default_architectures_forward_on_meta(name):
    # Shape-check the full default models (WRN-28-10, DenseNet-BC-100-12) without compute.
    with torch.device("meta"):
        model = build(name, in_channels=3, num_classes=100)
        out = model(torch.empty(2, 3, 32, 32))
    assert out.shape == (2, 100)


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        # 784*300+300 + 300*100+100 + 100*10+10
        ("lenet300", dict(in_channels=1, num_classes=10), 266_610),
        # conv 1*20*25+20, conv 20*50*25+50, fc 800*500+500, fc 500*10+10
        ("lenet5", dict(in_channels=1, num_classes=10), 431_080),
        # 3x32x32 LeNet-300-100: 3072*300+300 + 30100 + 1010
        ("lenet300", dict(in_channels=3, num_classes=10, input_size=32), 953_010),
        # bearpaw/pytorch-classification ResNets with conv1x1+BN shortcuts (option B)
        ("resnet20", dict(num_classes=10), 272_474),
        ("resnet56", dict(num_classes=10), 855_770),
        ("resnet110", dict(num_classes=10), 1_730_714),
        ("cifar_resnet", dict(num_classes=10, depth=164, block="bottleneck"), 1_704_154),
        # pre-activation: shortcuts are bare conv1x1, so ResNet-20 minus 2 BNs (2*32 + 2*64)
        ("preresnet", dict(num_classes=10, depth=20), 272_474 - 192),
        # DenseNet-BC-100-12 (MicroNet student): 0.769M on CIFAR-10, 0.800M on CIFAR-100
        ("densenet_bc", dict(num_classes=10), 769_162),
        ("densenet_bc", dict(num_classes=100), 800_032),
        # torchvision ResNet-18 with an 11-class head (food-11 teacher)
        ("resnet18", dict(num_classes=11), 11_182_155),
        # CIFAR VGG-16-BN: 14.71M conv/BN + 512*10+10 classifier
        ("vgg16_bn", dict(num_classes=10), 14_728_266),
    ],
)
def test_parameter_counts(name, kwargs, expected):
    with torch.device("meta"):
        model = build(name, **kwargs)
    assert n_params(model) == expected


def test_wrn_28_10_parameter_count_on_meta():
    # The MicroNet score reference: WRN-28-10 has 36.5M parameters (36,479,194 for 10 classes;
    # 36,536,884 for CIFAR-100). Built on the meta device: no memory, no compute.
    with torch.device("meta"):
        assert n_params(build("wrn", depth=28, widen_factor=10, num_classes=10)) == 36_479_194
        assert n_params(build("wrn", num_classes=100)) == 36_536_884


def _student_expected(in_channels, num_classes, widths):
    total = in_channels * widths[0] * 9 + widths[0] + 2 * widths[0]  # block 0: conv+bias, BN
    for i in range(1, 8):
        c_in, c_out = widths[i - 1], widths[i]
        total += c_in * 9 + c_in  # depthwise 3x3 + bias
        total += 2 * c_in  # BN
        total += c_in * c_out + c_out  # pointwise 1x1 + bias
    return total + widths[7] * num_classes + num_classes


def test_mobilenet_student_exact_count():
    # Homework student, width 1, 3 input channels, 11 classes (all convs have a bias):
    #   block 0: 3*16*9+16 conv + 32 BN                          =     480
    #   block 1 (16->32): 160 dw + 32 BN + 544 pw                =     736
    #   block 2 (32->64): 320 + 64 + 2112                        =   2,496
    #   block 3 (64->128): 640 + 128 + 8320                      =   9,088
    #   block 4 (128->256): 1280 + 256 + 33024                   =  34,560
    #   blocks 5, 6, 7 (256->256): 3 * (2560 + 512 + 65792)      = 206,592
    #   fc 256*11+11                                             =   2,827
    #                                                      total = 256,779  (~257k)
    model = build("mobilenet_student", in_channels=3, num_classes=11)
    assert n_params(model) == 256_779
    assert _student_expected(3, 11, [16, 32, 64, 128, 256, 256, 256, 256]) == 256_779
    # Fashion-MNIST variant: 1 input channel, 10 classes
    m1 = build("mobilenet_student", in_channels=1, num_classes=10)
    assert n_params(m1) == _student_expected(1, 10, [16, 32, 64, 128, 256, 256, 256, 256])


def test_mobilenet_student_layout_matches_homework():
    m = build("mobilenet_student", in_channels=3, num_classes=11)
    assert len(m.cnn) == 9 and isinstance(m.cnn[8], nn.AdaptiveAvgPool2d)
    b0 = m.cnn[0]
    assert isinstance(b0[0], nn.Conv2d) and b0[0].kernel_size == (3, 3) and b0[0].padding == (1, 1)
    assert isinstance(b0[1], nn.BatchNorm2d) and isinstance(b0[2], nn.ReLU6)
    assert isinstance(b0[3], nn.MaxPool2d)
    for i in range(1, 8):
        blk = m.cnn[i]
        dw, bn, act, pw = blk[0], blk[1], blk[2], blk[3]
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert bn.num_features == dw.out_channels and isinstance(act, nn.ReLU6)
        assert pw.kernel_size == (1, 1) and pw.in_channels == dw.out_channels
        assert len(blk) == (5 if i <= 3 else 4)
        if i <= 3:
            assert isinstance(blk[4], nn.MaxPool2d)
    keys = set(m.state_dict())
    assert {"cnn.1.0.weight", "cnn.1.1.weight", "cnn.1.3.weight", "fc.0.weight"} <= keys


@pytest.mark.parametrize("size,expected_spatial", [(28, [14, 7, 3, 1]), (256, [128, 64, 32, 16])])
def test_mobilenet_student_input_sizes(size, expected_spatial):
    in_ch = 1 if size == 28 else 3
    m = build("mobilenet_student", in_channels=in_ch, num_classes=11).eval()
    x = torch.randn(2, in_ch, size, size)
    spatial = []
    with torch.no_grad():
        for i in range(4):
            x = m.cnn[i](x)
            spatial.append(x.shape[-1])
        out = m(torch.randn(2, in_ch, size, size))
    assert spatial == expected_spatial
    assert out.shape == (2, 11)


@pytest.mark.parametrize("wm", [0.5, 0.95, 0.95**3])
def test_mobilenet_student_width_mult_scales_blocks_3_to_6_only(wm):
    m = build("mobilenet_student", in_channels=3, num_classes=11, width_mult=wm)
    base = [16, 32, 64, 128, 256, 256, 256, 256]
    want = [c if not 3 <= i <= 6 else int(c * wm) for i, c in enumerate(base)]
    got = [m.cnn[0][0].out_channels] + [m.cnn[i][3].out_channels for i in range(1, 8)]
    assert got == want
    assert all(isinstance(c, int) for c in got)
    assert m.fc[0].in_features == 256
    assert models.student_widths(16, wm) == want
    assert n_params(m) == _student_expected(3, 11, want)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 11)


def test_resnet18_in_channels_replaces_conv1_only():
    m3 = build("resnet18", in_channels=3, num_classes=11)
    m1 = build("resnet18", in_channels=1, num_classes=11)
    assert m3.conv1.in_channels == 3 and m1.conv1.in_channels == 1
    assert (m1.conv1.out_channels, m1.conv1.kernel_size, m1.conv1.stride) == (64, (7, 7), (2, 2))
    assert m1.fc.out_features == 11


def test_init_conventions():
    m = build("resnet20")
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in bns)
    conv = m.layer3[0].conv1  # 64 out, 3x3: std sqrt(2 / (9 * 64))
    assert abs(conv.weight.std().item() - (2 / (9 * 64)) ** 0.5) < 0.01


def test_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        build("resnet21")
    msg = str(e.value)
    assert "resnet21" in msg and "resnet20" in msg and "mobilenet_student" in msg


def test_unknown_kwarg_names_model_and_argument():
    with pytest.raises(TypeError, match=r"cifar_resnet.*'widen_factor'"):
        build("cifar_resnet", widen_factor=2)
    with pytest.raises(TypeError, match=r"lenet5.*'dropout'"):
        build("lenet5", dropout=0.5)


def test_alias_rejects_fixed_argument():
    with pytest.raises(TypeError, match=r"resnet20.*depth"):
        build("resnet20", depth=56)
    with pytest.raises(TypeError, match=r"vgg16_bn.*batch_norm"):
        build("vgg16_bn", batch_norm=False)


@pytest.mark.parametrize(
    "name,kwargs,pattern",
    [
        ("cifar_resnet", dict(depth=21), r"cifar_resnet.*6n\+2"),
        ("cifar_resnet", dict(depth=21, block="bottleneck"), r"cifar_resnet.*9n\+2"),
        ("cifar_resnet", dict(block="wide"), r"cifar_resnet.*block"),
        ("preresnet", dict(depth=19), r"preresnet.*6n\+2"),
        ("densenet_bc", dict(depth=101), r"densenet_bc.*\(depth - 4\) % 6"),
        ("densenet_bc", dict(depth=41, bottleneck=False), r"densenet_bc.*\(depth - 4\) % 3"),
        ("densenet_bc", dict(compression=2), r"densenet_bc.*compression"),
        ("wrn", dict(depth=27), r"wrn.*6n\+4"),
        ("wrn", dict(dropout=1.5), r"wrn.*dropout"),
        ("vgg", dict(depth=17), r"vgg.*depth"),
        ("mobilenet_student", dict(width_mult=0.0), r"mobilenet_student.*width_mult"),
        ("mobilenet_student", dict(width_mult=0.001), r"mobilenet_student.*0 channels"),
        ("lenet5", dict(input_size=8), r"lenet5.*input_size"),
        ("lenet300", dict(input_size=0), r"lenet300.*input_size"),
        ("resnet20", dict(in_channels=0), r"resnet20.*in_channels"),
        ("resnet20", dict(num_classes=2.5), r"resnet20.*num_classes"),
    ],
)
def test_invalid_values_raise_value_error(name, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build(name, **kwargs)


def test_register_custom_model_and_duplicate():
    name = "_test_tiny_model"
    if name not in names():

        @models.register(name)
        def _tiny(*, in_channels, num_classes, hidden=4):
            return nn.Sequential(nn.Flatten(), nn.LazyLinear(hidden), nn.Linear(hidden, num_classes))

    assert name in names()
    assert models.accepted_kwargs(name) == {"hidden": 4}
    out = build(name, in_channels=1, num_classes=3, hidden=5)(torch.randn(2, 1, 4, 4))
    assert out.shape == (2, 3)
    with pytest.raises(ValueError, match="already registered"):
        models.register(name)(lambda *, in_channels, num_classes: nn.Identity())
    with pytest.raises(TypeError, match="must accept"):
        models.register("_test_bad_factory")(lambda *, num_classes: nn.Identity())
