"""Distillation losses against hand-computed values; gradients reach the student only."""

import math

import pytest
import torch
import torch.nn.functional as F

from compress.distill import LOSSES


def test_hinton_equals_the_formula_on_fixed_logits():
    z_s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    z_t = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 2.0]])
    y = torch.tensor([1, 2])
    T, alpha = 2.0, 0.7

    def softmax(row):
        e = [math.exp(v / T) for v in row]
        return [v / sum(e) for v in e]

    kl = 0.0
    for s, t in zip(z_s.tolist(), z_t.tolist(), strict=False):
        ps, pt = softmax(s), softmax(t)
        kl += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=False))  # KL(p_t || p_s)
    kl = kl / 2 * T * T
    ce = (
        sum(
            -math.log(math.exp(s[c]) / sum(math.exp(v) for v in s))
            for s, c in zip(z_s.tolist(), y.tolist(), strict=False)
        )
        / 2
    )
    expected = alpha * kl + (1 - alpha) * ce
    got = LOSSES.get("hinton")(z_s, z_t, y, temperature=T, alpha=alpha)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_hinton_limits():
    z_s, z_t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    hinton = LOSSES.get("hinton")
    assert hinton(z_s, z_t, y, temperature=3.0, alpha=0.0).item() == pytest.approx(F.cross_entropy(z_s, y).item())
    assert hinton(z_t, z_t, y, temperature=3.0, alpha=1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_gradients_flow_to_student_only():
    from compress.stages.distill import KDConfig, kd_loss

    teacher = torch.nn.Linear(6, 3)
    student = torch.nn.Linear(6, 3)
    loss, _ = kd_loss(teacher, KDConfig(), 0.0)(student, torch.randn(8, 6), torch.randint(0, 3, (8,)))
    loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert teacher.weight.grad is None and not teacher.training
