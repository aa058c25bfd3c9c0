"""CIFAR ResNet and pre-activation ResNet, as in bearpaw/pytorch-classification.

Depth 6n+2 with BasicBlock or 9n+2 with Bottleneck; stages of 16/32/64 planes (times 4 for
bottleneck), stride 2 at stages 2 and 3. ResNet shortcuts are conv1x1 + BN (option B);
PreResNet shortcuts are a bare conv1x1. The final 8x8 average pool of the original is an
adaptive average pool here: identical on 32x32 inputs, and other sizes (28x28) also work.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._common import check_choice, check_int, init_kaiming_bn
from .registry import register, register_alias


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + residual)


class PreActBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(x))
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        return out + residual


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(x))
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv1(out)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return out + residual


def _num_blocks(model: str, depth, block: str) -> int:
    check_int(model, "depth", depth)
    check_choice(model, "block", block, ("basic", "bottleneck"))
    if block == "basic":
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"model {model!r}: depth must be 6n+2 (n >= 1: 8, 14, 20, 32, 44, 56, 110, ...) "
                f"with block='basic', got {depth}"
            )
        return (depth - 2) // 6
    if depth < 11 or (depth - 2) % 9 != 0:
        raise ValueError(
            f"model {model!r}: depth must be 9n+2 (n >= 1: 11, 20, 29, 47, 164, ...) "
            f"with block='bottleneck', got {depth}"
        )
    return (depth - 2) // 9


class CifarResNet(nn.Module):
    """bearpaw ``resnet``: conv3x3(in->16), BN, ReLU, 3 stages, avgpool, fc."""

    def __init__(self, depth=20, num_classes=10, block="basic", in_channels=3):
        super().__init__()
        n = _num_blocks("cifar_resnet", depth, block)
        blk = BasicBlock if block == "basic" else Bottleneck
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(blk, 16, n)
        self.layer2 = self._make_layer(blk, 32, n, stride=2)
        self.layer3 = self._make_layer(blk, 64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * blk.expansion, num_classes)
        init_kaiming_bn(self)

    def _make_layer(self, blk, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * blk.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * blk.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * blk.expansion),
            )
        layers = [blk(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * blk.expansion
        layers += [blk(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class PreResNet(nn.Module):
    """bearpaw ``preresnet``: conv3x3(in->16), 3 pre-activation stages, BN, ReLU, avgpool, fc."""

    def __init__(self, depth=20, num_classes=10, block="basic", in_channels=3):
        super().__init__()
        n = _num_blocks("preresnet", depth, block)
        blk = PreActBasicBlock if block == "basic" else PreActBottleneck
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.layer1 = self._make_layer(blk, 16, n)
        self.layer2 = self._make_layer(blk, 32, n, stride=2)
        self.layer3 = self._make_layer(blk, 64, n, stride=2)
        self.bn = nn.BatchNorm2d(64 * blk.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * blk.expansion, num_classes)
        init_kaiming_bn(self)

    def _make_layer(self, blk, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * blk.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * blk.expansion, 1, stride=stride, bias=False),
            )
        layers = [blk(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * blk.expansion
        layers += [blk(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register("cifar_resnet")
def cifar_resnet(*, in_channels: int, num_classes: int, depth: int = 20, block: str = "basic") -> nn.Module:
    """CIFAR ResNet. Input: any H, W >= 5 (two stride-2 stages; designed for 32x32, 28x28 works)."""
    return CifarResNet(depth, num_classes, block, in_channels)


@register("preresnet")
def preresnet(*, in_channels: int, num_classes: int, depth: int = 20, block: str = "basic") -> nn.Module:
    """Pre-activation CIFAR ResNet. Input: as cifar_resnet."""
    return PreResNet(depth, num_classes, block, in_channels)


register_alias("resnet20", "cifar_resnet", depth=20, block="basic")
register_alias("resnet56", "cifar_resnet", depth=56, block="basic")
register_alias("resnet110", "cifar_resnet", depth=110, block="basic")
