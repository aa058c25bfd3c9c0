"""DenseNet(-BC) for CIFAR, as in bearpaw/pytorch-classification (used by the MicroNet entry).

Stem conv3x3(in -> 2*growth), three dense blocks separated by transitions (BN, ReLU, conv1x1 to
floor(compression * channels), avgpool 2), then BN, ReLU, global average pool, fc. With
bottleneck=True each layer is BN-ReLU-conv1x1(4*growth)-BN-ReLU-conv3x3(growth) and depth must
satisfy (depth - 4) % 6 == 0; without it each layer is BN-ReLU-conv3x3(growth) and
(depth - 4) % 3 == 0. ``compression`` is the fraction kept at transitions: bearpaw's
``compressionRate=2`` (the MicroNet setting) is ``compression=0.5``.
The final 8x8 average pool is adaptive here (identical on 32x32 inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_float, check_int, init_kaiming_bn
from .registry import register


class _Bottleneck(nn.Module):
    def __init__(self, inplanes, growth_rate, dropout=0.0):
        super().__init__()
        planes = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, growth_rate, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return torch.cat((x, out), 1)


class _Basic(nn.Module):
    def __init__(self, inplanes, growth_rate, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, growth_rate, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = dropout

    def forward(self, x):
        out = self.conv1(self.relu(self.bn1(x)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return torch.cat((x, out), 1)


class _Transition(nn.Module):
    def __init__(self, inplanes, outplanes):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, outplanes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return F.avg_pool2d(self.conv1(self.relu(self.bn1(x))), 2)


class DenseNet(nn.Module):
    def __init__(
        self, depth=100, num_classes=10, growth_rate=12, compression=0.5, bottleneck=True, dropout=0.0, in_channels=3
    ):
        super().__init__()
        n = (depth - 4) // 6 if bottleneck else (depth - 4) // 3
        block = _Bottleneck if bottleneck else _Basic
        self.growth_rate = growth_rate
        self.dropout = dropout
        self.inplanes = growth_rate * 2
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, 3, padding=1, bias=False)
        self.dense1 = self._make_dense(block, n)
        self.trans1 = self._make_transition(compression)
        self.dense2 = self._make_dense(block, n)
        self.trans2 = self._make_transition(compression)
        self.dense3 = self._make_dense(block, n)
        self.bn = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)
        init_kaiming_bn(self)

    def _make_dense(self, block, blocks):
        layers = []
        for _ in range(blocks):
            layers.append(block(self.inplanes, self.growth_rate, self.dropout))
            self.inplanes += self.growth_rate
        return nn.Sequential(*layers)

    def _make_transition(self, compression):
        inplanes = self.inplanes
        outplanes = int(math.floor(inplanes * compression))
        self.inplanes = outplanes
        return _Transition(inplanes, outplanes)

    def forward(self, x):
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register("densenet_bc")
def densenet_bc(
    *,
    in_channels: int,
    num_classes: int,
    depth: int = 100,
    growth_rate: int = 12,
    compression: float = 0.5,
    bottleneck: bool = True,
    dropout: float = 0.0,
) -> nn.Module:
    """DenseNet-BC (MicroNet student: depth 100, growth 12; teacher: depth 172, growth 30).
    Input: any H, W >= 4 (two 2x average pools; designed for 32x32, 28x28 works)."""
    name = "densenet_bc"
    check_int(name, "depth", depth)
    check_int(name, "growth_rate", growth_rate)
    if not isinstance(compression, bool) and isinstance(compression, (int, float)) and compression > 1:
        raise ValueError(
            f"model {name!r}: compression is the fraction of channels kept at transitions, in "
            f"(0, 1]; got {compression!r} (bearpaw's compressionRate={compression!r} is "
            f"compression={1 / compression:g})"
        )
    check_float(name, "compression", compression, low=0.0, high=1.0, low_inclusive=False)
    check_float(name, "dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    if not isinstance(bottleneck, bool):
        raise ValueError(f"model {name!r}: bottleneck must be a bool, got {bottleneck!r}")
    if bottleneck and (depth < 10 or (depth - 4) % 6 != 0):
        raise ValueError(
            f"model {name!r}: with bottleneck=True depth must satisfy (depth - 4) % 6 == 0 "
            f"(e.g. 40, 100, 172, 190), got {depth}"
        )
    if not bottleneck and (depth < 7 or (depth - 4) % 3 != 0):
        raise ValueError(
            f"model {name!r}: with bottleneck=False depth must satisfy (depth - 4) % 3 == 0 (e.g. 40, 100), got {depth}"
        )
    return DenseNet(depth, num_classes, growth_rate, compression, bottleneck, dropout, in_channels)
