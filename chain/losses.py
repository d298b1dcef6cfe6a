"""Distillation losses. Each returns its parts so every one can be logged and reported.

``loss = α·CE(y, s) + (1−α)·T²·KL(softmax(t/T) ‖ softmax(s/T))`` (Hinton et al.), or with
``distill='mse'`` the mean squared error between student and teacher logits in place of the KL term.
The teacher side is a tensor of logits: from a live teacher model or precomputed on a proxy set.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossParts(NamedTuple):
    """The total loss and its weighted-before parts (ce and kd are unweighted)."""

    total: torch.Tensor
    ce: torch.Tensor
    kd: torch.Tensor


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float, kind: str = "kl") -> torch.Tensor:
    """The distillation term alone, already scaled by T² for 'kl' so gradients keep their size."""
    if kind == "mse":
        return F.mse_loss(student, teacher)
    t = temperature
    log_p_student = F.log_softmax(student / t, dim=1)
    log_p_teacher = F.log_softmax(teacher / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def kd_loss(
    student: torch.Tensor,
    labels: torch.Tensor,
    teacher: torch.Tensor | None,
    alpha: float,
    temperature: float,
    kind: str = "kl",
) -> LossParts:
    """α·CE + (1−α)·KD; with no teacher the loss is plain cross-entropy."""
    ce = F.cross_entropy(student, labels)
    if teacher is None:
        return LossParts(ce, ce, torch.zeros((), device=student.device))
    kd = kd_term(student, teacher, temperature, kind)
    return LossParts(alpha * ce + (1.0 - alpha) * kd, ce, kd)
