"""Decoupled Knowledge Distillation, Zhao et al., CVPR 2022 (arXiv:2203.08679).

Classical KD splits into a target-class part and a non-target part (the paper's Eq. 7):
``KL(p_t ‖ p_s) = TCKD + (1 − p_t[gt]) · NCKD`` where TCKD is the KL between the binary
(target, rest) distributions and NCKD the KL between the distributions over the non-target classes.
DKD drops the coupling factor and weights the parts freely: ``α · TCKD + β · NCKD`` (both × T²),
ramped in linearly over ``warmup_epochs``. Combine it with ``ce`` for the paper's total loss.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compress.distill import LOSSES, LossTerm, Outputs, TermModule

_MASK = 1000.0  # pushes the target class out of a softmax, as in the authors' code


def dkd_parts(z_s: Tensor, log_p_t: Tensor, y: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """(TCKD, NCKD) per sample, unscaled by T²; ``log_p_t`` = teacher log-probabilities at T."""
    log_p_s = F.log_softmax(z_s.float() / temperature, dim=1)
    gt = F.one_hot(y, log_p_s.shape[1]).bool()

    def binary(logp: Tensor) -> Tensor:  # log [p_gt, 1 - p_gt], computed in log space
        target = logp.gather(1, y[:, None])
        rest = torch.logsumexp(logp.masked_fill(gt, float("-inf")), dim=1, keepdim=True)
        return torch.cat([target, rest], dim=1)

    b_s, b_t = binary(log_p_s), binary(log_p_t)
    tckd = (b_t.exp() * (b_t - b_s)).sum(1)
    # Re-normalizing log-probabilities with the target masked out = softmax over the other classes.
    nt_s = F.log_softmax(log_p_s - _MASK * gt, dim=1)
    nt_t = F.log_softmax(log_p_t - _MASK * gt, dim=1)
    nckd = (nt_t.exp() * (nt_t - nt_s)).sum(1)
    return tckd, nckd


def dkd_loss(z_s: Tensor, z_t: Tensor, y: Tensor, *, temperature: float, alpha: float, beta: float) -> Tensor:
    """α·TCKD + β·NCKD, times T², batch mean, on one teacher's logits."""
    tckd, nckd = dkd_parts(z_s, F.log_softmax(z_t.float() / temperature, dim=1), y, temperature)
    return (alpha * tckd + beta * nckd).mean() * temperature**2


@LOSSES.register("dkd")
class DKD(LossTerm):
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD at temperature T, with linear warm-up."""

    name: Literal["dkd"] = "dkd"
    alpha: float = Field(1.0, ge=0, le=1000, description="weight of target-class KD (TCKD)")
    beta: float = Field(8.0, ge=0, le=1000, description="weight of non-target-class KD (NCKD); 8 on CIFAR")
    temperature: float = Field(4.0, gt=0, le=100)
    warmup_epochs: float = Field(20.0, ge=0, le=10_000, description="ramp the term from 0 to full over these")

    def build(self, feats_s: dict, feats_t: list) -> TermModule:
        return _DKD(self)


class _DKD(TermModule):
    def __init__(self, cfg: DKD) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, out: Outputs) -> Tensor:
        c = self.cfg
        ramp = min(out.epoch / c.warmup_epochs, 1.0) if c.warmup_epochs > 0 else 1.0
        total = out.z_s.new_zeros((), dtype=torch.float32)
        for w, log_p_t in out.soft_targets(c.temperature):
            tckd, nckd = dkd_parts(out.z_s, log_p_t, out.y, c.temperature)
            total = total + w * (c.alpha * tckd + c.beta * nckd).mean()
        return ramp * total * c.temperature**2
