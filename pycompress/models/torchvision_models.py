"""torchvision models (the food-11 teacher). Weights are never downloaded."""

from __future__ import annotations

import torch.nn as nn

from .registry import register


@register("resnet18")
def resnet18(*, in_channels: int, num_classes: int) -> nn.Module:
    """torchvision ResNet-18, weights=None. When in_channels != 3 the stem conv1 is replaced by
    Conv2d(in_channels, 64, 7, stride 2, padding 3, bias=False) with torchvision's kaiming init.
    Input: any H, W >= 1 (adaptive pool; 224 or 256 is the design, 28x28 ends at 1x1)."""
    import torchvision  # lazy: importing torchvision costs seconds

    from .external import adapt_stem

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if in_channels != 3:
        adapt_stem(model, "resnet18", in_channels)  # conv1, as torchvision:<name> models get it
    return model
