"""Shared helpers for the model zoo: argument checks and the initialisations of the seed codebases."""

from __future__ import annotations

import torch.nn as nn


def check_int(model: str, arg: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"model {model!r}: {arg} must be an int >= {minimum}, got {value!r}")
    return value


def check_float(
    model: str, arg: str, value, *, low: float, high: float, low_inclusive: bool = True, high_inclusive: bool = True
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"model {model!r}: {arg} must be a number, got {value!r}")
    ok_low = value >= low if low_inclusive else value > low
    ok_high = value <= high if high_inclusive else value < high
    if not (ok_low and ok_high):
        lb = "[" if low_inclusive else "("
        hb = "]" if high_inclusive else ")"
        raise ValueError(f"model {model!r}: {arg} must be in {lb}{low}, {high}{hb}, got {value!r}")
    return float(value)


def check_choice(model: str, arg: str, value, choices):
    if value not in choices:
        raise ValueError(f"model {model!r}: {arg} must be one of {list(choices)}, got {value!r}")
    return value


def init_kaiming_bn(module: nn.Module, *, linear_bias_zero: bool = False) -> None:
    """pytorch-classification init: conv ~ N(0, sqrt(2 / (k*k*out))) (= kaiming normal, fan_out,
    relu), conv bias 0, BN weight 1 / bias 0. Linear keeps PyTorch's default unless
    ``linear_bias_zero`` (WRN zeroes the FC bias)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_bias_zero and m.bias is not None:
            nn.init.zeros_(m.bias)
