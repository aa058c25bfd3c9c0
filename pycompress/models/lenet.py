"""LeNet-300-100 and Caffe-style LeNet-5, as used by DeepHoyer (PyTorch default init)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ._common import check_int
from .registry import register


class LeNet300(nn.Module):
    """Flatten, fc 300, ReLU, fc 100, ReLU, fc num_classes (784-300-100-10 for 1x28x28)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        self.in_features = in_channels * input_size * input_size
        self.fc1 = nn.Linear(self.in_features, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def _lenet5_feature_size(input_size: int) -> int:
    s = input_size - 4  # conv 5x5, no padding
    s //= 2
    s -= 4
    s //= 2
    return s


class LeNet5(nn.Module):
    """Caffe LeNet: conv 20 5x5, ReLU, maxpool 2, conv 50 5x5, ReLU, maxpool 2, fc 500, ReLU,
    fc num_classes. 431,080 parameters for 1x28x28 and 10 classes."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, input_size: int = 28):
        super().__init__()
        s = _lenet5_feature_size(input_size)
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Linear(50 * s * s, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        return self.fc2(x)


@register("lenet300")
def lenet300(*, in_channels: int, num_classes: int, input_size: int = 28) -> nn.Module:
    """LeNet-300-100. Input: exactly in_channels x input_size x input_size (default 28)."""
    check_int("lenet300", "input_size", input_size)
    return LeNet300(in_channels, num_classes, input_size)


@register("lenet5")
def lenet5(*, in_channels: int, num_classes: int, input_size: int = 28) -> nn.Module:
    """LeNet-5 (Caffe). Input: exactly input_size x input_size, input_size >= 12 (28 for MNIST,
    32 for CIFAR)."""
    check_int("lenet5", "input_size", input_size)
    if _lenet5_feature_size(input_size) < 1:
        raise ValueError(f"model 'lenet5': input_size must be >= 12, got {input_size}")
    return LeNet5(in_channels, num_classes, input_size)
