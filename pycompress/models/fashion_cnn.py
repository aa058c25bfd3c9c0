"""A small VGG-style CNN sized for Fashion-MNIST under a byte budget (issue 17's recipe,
``recipes/fashion_best.yaml``).

Layout (``widths = [c1, c2, c3]``, ``depth`` convs per stage)::

    features = [Conv3x3(in -> c1), BN, ReLU] + (depth - 1) x [Conv3x3(c1 -> c1), BN, ReLU], MaxPool2,
               [Conv3x3(c1 -> c2), BN, ReLU] + ...                                         MaxPool2,
               [Conv3x3(c2 -> c3), BN, ReLU] + ...
    pool       = AdaptiveAvgPool2d(1)
    classifier = [Dropout(dropout)], Linear(c3, num_classes)

Every conv is bias-free and followed by its BatchNorm, so the export folds each BatchNorm into
its conv (a bias + a per-channel scale per output channel in the file). Unlike the food-11
student, the parameters sit where the resolution is (28x28 -> 14x14 -> 7x7 for Fashion-MNIST's
28x28 images, no padding needed), which at ~70K weights buys more accuracy per stored bit than
the student's 256-channel 2x2 blocks. Any input of at least 4x4 works (two 2x max-pools, then a
global average pool). Kaiming-normal conv init (fan_out), BN weight 1 / bias 0.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from ._common import check_float, check_int, init_kaiming_bn
from .registry import register


class FashionCNN(nn.Module):
    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        layers: List[nn.Module] = []
        c_in = in_channels
        for s, c in enumerate(widths):
            if s > 0:
                layers.append(nn.MaxPool2d(2, 2))
            for _ in range(depth):
                layers += [nn.Conv2d(c_in, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
                c_in = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        head: List[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        self.classifier = nn.Sequential(*head, nn.Linear(c_in, num_classes))
        init_kaiming_bn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


@register("fashion_cnn")
def fashion_cnn(
    *,
    in_channels: int,
    num_classes: int,
    widths: Sequence[int] = (16, 32, 64),
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Module:
    """Small VGG-style CNN: ``len(widths)`` stages of ``depth`` 3x3 conv + BN + ReLU (a 2x max-pool
    between stages), global average pool, dropout, linear. widths: 1-6 channel counts >= 1;
    depth >= 1; dropout in [0, 1). Input: H, W >= 2^(len(widths) - 1)."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= 6:
        raise ValueError(f"model 'fashion_cnn': widths must be a list of 1 to 6 channel counts, got {widths!r}")
    for i, c in enumerate(widths):
        check_int("fashion_cnn", f"widths[{i}]", c)
    check_int("fashion_cnn", "depth", depth)
    check_float("fashion_cnn", "dropout", dropout, low=0.0, high=1.0, high_inclusive=False)
    return FashionCNN(in_channels, num_classes, [int(c) for c in widths], depth, float(dropout))
