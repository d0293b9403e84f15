"""Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

loss = α · T² · KL(p_t ‖ p_s) + (1 − α) · CE(z_s, y), with p = softmax(z / T).

The KL runs from the teacher's soft targets to the student's (equivalently, cross-entropy with
soft targets up to a constant), as in the paper and in torchdistill; written ``KL(softmax(z_s/T) ‖
softmax(z_t/T))`` in the argument order of ``F.kl_div(student_log_probs, teacher_probs)``. The T²
factor keeps the soft-target gradients on the same scale as the hard-label ones when T changes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from compress.distill import LOSSES


@LOSSES.register("hinton")
def hinton(
    z_s: Tensor, z_t: Tensor, y: Tensor, *, temperature: float, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """Hinton KD: α·T²·KL(p_t ‖ p_s) + (1−α)·CE(z_s, y), softmax at temperature T."""
    z_s, z_t = z_s.float(), z_t.float()  # softmax at T in full precision even under autocast
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    log_p_t = F.log_softmax(z_t / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * temperature**2
    if alpha >= 1.0:
        return kl
    ce = F.cross_entropy(z_s, y, label_smoothing=label_smoothing)
    return alpha * kl + (1.0 - alpha) * ce
