"""Knowledge distillation: losses built by name and a frozen-teacher wrapper.

Usage::

    from pycompress.distill import Distiller, build_loss

    distiller = Distiller(teacher, loss={"kind": "hinton", "alpha": 0.5, "temperature": 20})
    # or loss="kldiv:1" (MicroNet: KL(p_student || p_teacher), T = 1, no label term)
    for x, y in loader:
        t_logits = distiller.teacher_outputs(x)       # eval mode, no_grad, requires_grad False
        s_logits = student(x)
        loss = distiller.loss(s_logits, t_logits, y)

See :mod:`pycompress.distill.losses` for the loss kinds and their exact formulas.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .losses import (
    ALIASES,
    KINDS,
    CombinedLoss,
    DistillLoss,
    build_loss,
    js_div_logits,
    kl_div_logits,
    soft_cross_entropy,
)

__all__ = [
    "ALIASES",
    "KINDS",
    "CombinedLoss",
    "DistillLoss",
    "Distiller",
    "build_loss",
    "freeze_teacher",
    "js_div_logits",
    "kl_div_logits",
    "soft_cross_entropy",
]


def freeze_teacher(teacher: nn.Module) -> nn.Module:
    """Put ``teacher`` in eval mode and set ``requires_grad=False`` on all its parameters."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class Distiller(nn.Module):
    """Holds a frozen teacher and a distillation loss.

    The teacher is put in eval mode and its parameters get ``requires_grad=False``. It stays in
    eval mode when ``.train()`` is called on the wrapper (and is put back into eval mode before
    every forward, should someone call ``teacher.train()`` directly), so its BatchNorm running
    statistics never change. Its outputs are computed under :func:`torch.no_grad`.

    Args:
        teacher: the teacher network (registered as a submodule, so ``.to(device)`` moves it).
        loss: a spec for :func:`build_loss` or a built loss module (default: ``"hinton"``
            with alpha 0.5, T 20).
        student: optional student network; if given, ``forward(x, targets)`` runs both nets and
            returns ``(loss, student_logits)``.
    """

    def __init__(self, teacher: nn.Module, loss: Any = "hinton", student: nn.Module | None = None) -> None:
        super().__init__()
        self.teacher = freeze_teacher(teacher)
        self.criterion = build_loss(loss)
        self.student = student

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def teacher_outputs(self, x: Any) -> Any:
        """Teacher forward in eval mode without autograd tracking."""
        if self.teacher.training:
            self.teacher.eval()
        return self.teacher(x)

    def loss(
        self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The distillation loss; the teacher logits are detached defensively."""
        return self.criterion(student_logits, teacher_logits.detach(), targets)

    def forward(self, x: Any, targets: torch.Tensor | None = None):
        if self.student is None:
            raise RuntimeError("Distiller.forward needs a student; use teacher_outputs() and loss() instead")
        teacher_logits = self.teacher_outputs(x)
        student_logits = self.student(x)
        return self.loss(student_logits, teacher_logits, targets), student_logits
