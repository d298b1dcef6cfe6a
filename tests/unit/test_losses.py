"""KD loss maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from weckd.chain.losses import kd_loss, kd_term


def test_kl_term_matches_hand_computation() -> None:
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    temp = 2.0
    ps = [math.exp(0.5) / (math.exp(0.5) + 1), 1 / (math.exp(0.5) + 1)]
    pt = [ps[1], ps[0]]
    kl = sum(p * math.log(p / q) for p, q in zip(pt, ps))
    assert kd_term(s, t, temp).item() == pytest.approx(kl * temp * temp, rel=1e-6)


def test_total_is_alpha_weighted_sum_of_parts() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 3), torch.randn(8, 3)
    y = torch.randint(0, 3, (8,))
    parts = kd_loss(s, y, t, alpha=0.3, temperature=4.0)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert parts.ce.item() == pytest.approx(ce.item())
    assert parts.total.item() == pytest.approx(0.3 * ce.item() + 0.7 * parts.kd.item())


def test_identical_logits_have_zero_kd() -> None:
    s = torch.randn(4, 5)
    assert kd_term(s, s.clone(), 3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_no_teacher_is_plain_cross_entropy() -> None:
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    parts = kd_loss(s, y, None, alpha=0.5, temperature=4.0)
    assert parts.total.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item())
    assert parts.kd.item() == 0.0


def test_mse_variant_is_mean_squared_logit_difference() -> None:
    s = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.0, 0.0]])
    assert kd_term(s, t, 4.0, kind="mse").item() == pytest.approx((1 + 4) / 2)
