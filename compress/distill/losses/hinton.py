"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

loss = α · T² · KL(p_t ‖ p_s) + (1 − α) · CE(z_s, y), with p = softmax(z / T).

The KL runs from the teacher's soft targets to the student's (equivalently, cross-entropy with
soft targets up to a constant), as in the paper and in torchdistill; written ``KL(softmax(z_s/T) ‖
softmax(z_t/T))`` in the argument order of ``F.kl_div(student_log_probs, teacher_probs)``. The T²
factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compress.distill import LOSSES, LossTerm, Outputs, TermModule


def soft_kl(z_s: Tensor, log_p_t: Tensor, temperature: float) -> Tensor:
    """T² · KL(p_t ‖ softmax(z_s / T)), batch mean; ``log_p_t`` = teacher log-probabilities at T."""
    log_p_s = F.log_softmax(z_s.float() / temperature, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2


def hinton_loss(
    z_s: Tensor, z_t: Tensor, y: Tensor, *, temperature: float, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """Hinton KD on one teacher's logits: α·T²·KL(p_t ‖ p_s) + (1−α)·CE(z_s, y)."""
    return _mix(
        soft_kl(z_s, F.log_softmax(z_t.float() / temperature, dim=1), temperature), z_s, y, alpha, label_smoothing
    )


def _mix(kl: Tensor, z_s: Tensor, y: Tensor, alpha: float, label_smoothing: float) -> Tensor:
    if alpha >= 1.0:
        return kl
    ce = F.cross_entropy(z_s.float(), y, label_smoothing=label_smoothing)
    return alpha * kl + (1.0 - alpha) * ce


@LOSSES.register("hinton")
class Hinton(LossTerm):
    """Hinton KD: α·T²·KL(p_t ‖ p_s) + (1−α)·CE, softmax at temperature T."""

    name: Literal["hinton"] = "hinton"
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target term; 1 − alpha goes to CE")

    includes_ce: ClassVar[bool] = True

    def build(self, feats_s: dict, feats_t: list) -> TermModule:
        return _Hinton(self.temperature, self.alpha)


class _Hinton(TermModule):
    def __init__(self, temperature: float, alpha: float) -> None:
        super().__init__()
        self.temperature, self.alpha = temperature, alpha

    def forward(self, out: Outputs) -> Tensor:
        kl = sum(w * soft_kl(out.z_s, log_p_t, self.temperature) for w, log_p_t in out.soft_targets(self.temperature))
        return _mix(kl, out.z_s, out.y, self.alpha, out.label_smoothing)  # type: ignore[arg-type]
