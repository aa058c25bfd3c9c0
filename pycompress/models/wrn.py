"""Wide ResNet (Zagoruyko & Komodakis), as in bearpaw/pytorch-classification (xternalz port).

depth = 6n + 4; stages of 16k / 32k / 64k channels (k = widen_factor) after a 16-channel stem;
pre-activation blocks BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with a 1x1 conv shortcut where the
width changes. WRN-28-10 (36.5M parameters) is the MicroNet challenge reference.
The final 8x8 average pool is adaptive here (identical on 32x32 inputs).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_float, check_int, init_kaiming_bn
from .registry import register


class WideBasic(nn.Module):
    def __init__(self, in_planes, out_planes, stride, dropout=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut = None
        if not self.equal_in_out:
            self.conv_shortcut = nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False)

    def forward(self, x):
        # As in the original: when the width changes, the shortcut conv sees the pre-activated
        # input; otherwise the identity shortcut carries the raw input.
        if self.equal_in_out:
            out = self.relu1(self.bn1(x))
            shortcut = x
        else:
            x = self.relu1(self.bn1(x))
            out = x
            shortcut = self.conv_shortcut(x)
        out = self.relu2(self.bn2(self.conv1(out)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return shortcut + out


class WideResNet(nn.Module):
    def __init__(self, depth=28, num_classes=10, widen_factor=10, dropout=0.0, in_channels=3):
        super().__init__()
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_stage(ch[0], ch[1], n, 1, dropout)
        self.block2 = self._make_stage(ch[1], ch[2], n, 2, dropout)
        self.block3 = self._make_stage(ch[2], ch[3], n, 2, dropout)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.n_channels = ch[3]
        init_kaiming_bn(self, linear_bias_zero=True)

    @staticmethod
    def _make_stage(in_planes, out_planes, n, stride, dropout):
        layers = [
            WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, dropout)
            for i in range(n)
        ]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.block3(self.block2(self.block1(x)))
        x = self.relu(self.bn1(x))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register("wrn")
def wrn(
    *, in_channels: int, num_classes: int, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0
) -> nn.Module:
    """Wide ResNet WRN-depth-widen_factor. Input: any H, W >= 5 (two stride-2 stages; designed for
    32x32, 28x28 works)."""
    check_int("wrn", "depth", depth)
    check_int("wrn", "widen_factor", widen_factor)
    check_float("wrn", "dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    if depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"model 'wrn': depth must be 6n+4 (n >= 1: 10, 16, 22, 28, 40, ...), got {depth}")
    return WideResNet(depth, num_classes, widen_factor, dropout, in_channels)
