"""VGG for CIFAR, as in bearpaw/pytorch-classification: conv3x3 (+BN) + ReLU stacks with five 2x2
max-pools and a single Linear(512, num_classes) classifier (32x32 -> 1x1 before it).

Two deliberate, documented extensions that change nothing on 32x32 inputs: the max-pools use
``ceil_mode=True`` (identical on even sizes; lets 28x28 reach 1x1 via 28-14-7-4-2-1) and an
adaptive average pool precedes the classifier (so inputs larger than 32 also work).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._common import check_choice
from .registry import register, register_alias

CFGS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    13: [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(cfg, in_channels: int, batch_norm: bool) -> nn.Sequential:
    layers = []
    c = in_channels
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
        else:
            layers.append(nn.Conv2d(c, v, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            c = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(self, features: nn.Sequential, num_classes: int = 10):
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(512, num_classes)
        self._init_weights()

    def _init_weights(self):
        # bearpaw vgg: conv ~ N(0, sqrt(2 / (k*k*out))), bias 0; BN 1/0; Linear ~ N(0, 0.01), bias 0
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


@register("vgg")
def vgg(*, in_channels: int, num_classes: int, depth: int = 16, batch_norm: bool = True) -> nn.Module:
    """CIFAR VGG-{11,13,16,19}. Input: any H, W >= 17 (five ceil-mode 2x pools); 32x32 is the
    original, 28x28 works."""
    check_choice("vgg", "depth", depth, sorted(CFGS))
    if not isinstance(batch_norm, bool):
        raise ValueError(f"model 'vgg': batch_norm must be a bool, got {batch_norm!r}")
    return VGG(make_features(CFGS[depth], in_channels, batch_norm), num_classes)


for _d in sorted(CFGS):
    register_alias(f"vgg{_d}", "vgg", depth=_d, batch_norm=False)
    register_alias(f"vgg{_d}_bn", "vgg", depth=_d, batch_norm=True)
