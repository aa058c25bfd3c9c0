"""The MobileNet-v1-style student of the food-11 homework 7 (network compression).

Layout follows the homework exactly so that its state dicts load and its network-slimming code
(which indexes ``cnn.{i}.{0,1,3}``) applies:

    cnn.0 = [Conv3x3(in, 16), BN, ReLU6, MaxPool2]
    cnn.i = [DW Conv3x3(c_{i-1}), BN(c_{i-1}), ReLU6, PW Conv1x1(c_{i-1} -> c_i), (MaxPool2 for i<=3)]
            for i = 1..7
    cnn.8 = AdaptiveAvgPool2d(1)
    fc    = Sequential(Linear(c_7, num_classes))   -> state-dict keys fc.0.weight / fc.0.bias

All convs carry a bias (nn.Conv2d default) and PyTorch's default init is kept, as in the homework.
The depthwise convs are ``pycompress.nn.DepthwiseConv2d`` (the same parameters and state-dict keys
as nn.Conv2d, computed by pycompress's depthwise kernel on the selected backend) unless
``fused_depthwise=False``.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn

from ._common import check_float, check_int
from .registry import register

MULTIPLIER = (1, 2, 4, 8, 16, 16, 16, 16)
SCALED_BLOCKS = range(3, 7)  # width_mult applies to the output widths of blocks 3..6 only


def student_widths(base: int = 16, width_mult: float = 1.0) -> List[int]:
    """Output channels of blocks 0..7: base*[1,2,4,8,16,16,16,16], blocks 3..6 times width_mult
    (truncated to int, as the homework does)."""
    widths = [base * m for m in MULTIPLIER]
    for i in SCALED_BLOCKS:
        widths[i] = int(widths[i] * width_mult)
    return widths


class MobileNetStudent(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 11,
        base: int = 16,
        width_mult: float = 1.0,
        fused_depthwise: bool = True,
    ):
        super().__init__()
        from ..nn import DepthwiseConv2d

        bw = student_widths(base, width_mult)
        self.widths = bw
        blocks = [
            nn.Sequential(
                nn.Conv2d(in_channels, bw[0], 3, 1, 1),
                nn.BatchNorm2d(bw[0]),
                nn.ReLU6(),
                nn.MaxPool2d(2, 2, 0),
            )
        ]
        for i in range(1, 8):
            c_in, c_out = bw[i - 1], bw[i]
            dw = DepthwiseConv2d(c_in, 3, 1, 1) if fused_depthwise else nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in)
            layers = [
                dw,
                nn.BatchNorm2d(c_in),
                nn.ReLU6(),
                nn.Conv2d(c_in, c_out, 1),
            ]
            if i <= 3:
                layers.append(nn.MaxPool2d(2, 2, 0))
            blocks.append(nn.Sequential(*layers))
        blocks.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.cnn = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(bw[7], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.cnn(x)
        out = out.view(out.size(0), -1)
        return self.fc(out)


@register("mobilenet_student")
def mobilenet_student(
    *, in_channels: int, num_classes: int, width_mult: float = 1.0, base: int = 16, fused_depthwise: bool = True
) -> nn.Module:
    """Food-11 homework student. Input: any H, W >= 16 (four 2x max-pools: 28 -> 14 -> 7 -> 3 -> 1;
    256 -> 16). width_mult > 0 scales blocks 3..6 (slimming uses < 1); each scaled width must stay >= 1.
    fused_depthwise: the depthwise convs run on pycompress.ops.depthwise_conv2d (default) or on
    torch's nn.Conv2d (False); the parameters and state-dict keys are the same either way."""
    if not isinstance(fused_depthwise, bool):
        raise TypeError(f"model 'mobilenet_student': fused_depthwise must be true or false, got {fused_depthwise!r}")
    check_int("mobilenet_student", "base", base)
    check_float("mobilenet_student", "width_mult", width_mult, low=0.0, high=float("inf"), low_inclusive=False)
    widths = student_widths(base, width_mult)
    if min(widths) < 1:
        raise ValueError(
            f"model 'mobilenet_student': width_mult={width_mult} leaves a block with 0 channels (widths {widths})"
        )
    return MobileNetStudent(in_channels, num_classes, base, width_mult, fused_depthwise)
