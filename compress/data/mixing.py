"""Mixup and CutMix on whole training batches, with soft targets, reproducible step by step.

Mixup (Zhang et al. 2018, arXiv:1710.09412) blends two images, ``λ·a + (1−λ)·b``; CutMix (Yun et al.
2019, arXiv:1905.04899) pastes a box of ``b`` into ``a``. Either way the target is the same blend of
the two one-hot labels, ``λ·onehot(a) + (1−λ)·onehot(b)``, with ``λ ~ Beta(α, α)``. As in timm's
``Mixup`` (mode ``batch``) and torchvision's ``v2.MixUp``/``v2.CutMix``, one λ is drawn per batch and
each image is paired with another of the same batch (here image i with image N−1−i: the batch
flipped), which costs one extra tensor and no second data stream. CutMix's box is clipped at the
image border, so its λ is recomputed from the area actually pasted (else the targets would lie).

torchvision's transforms draw from the global RNG; here every draw comes from a ``torch.Generator``
seeded by (seed, epoch, step) (:func:`mix_generator`), so a run mixes the same way every time and a
resumed run continues exactly as the uninterrupted one would. Both data forms (tensor-resident and
streaming) yield normalized float batches, so mixing happens in the training loop on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: the ImageData attributes that configure mixing (the recipe's data fields), with their "off" values
FIELDS = {"mixup": 0.0, "cutmix": 0.0, "mix_prob": 1.0, "mix_switch": 0.5}


def mix_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """The generator of one training step's mixing draws: a function of (seed, epoch, step) only.

    Salted so it never coincides with the loader's shuffling generator (seeded ``seed·100003 + epoch``).
    """
    key = ((int(seed) * 1_000_003 + int(epoch)) * 1_000_033 + int(step)) * 31 + 17
    return torch.Generator().manual_seed(key % (2**63 - 1))


def soft_targets(y: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot float targets (N, C), with label smoothing ``s`` folded in: ``(1−s)·onehot + s/C``."""
    off = smoothing / num_classes
    return F.one_hot(y, num_classes).float().mul_(1.0 - smoothing).add_(off)


def beta(alpha: float, gen: torch.Generator) -> float:
    """One draw of Beta(α, α) from ``gen``: the first coordinate of a Dirichlet(α, α) draw, the same
    sampler ``torch.distributions.Beta`` uses (which itself cannot take a generator)."""
    conc = torch.tensor([alpha, alpha], dtype=torch.float64)
    return float(torch._sample_dirichlet(conc, gen)[0])


def cutmix_box(height: int, width: int, lam: float, gen: torch.Generator) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a box covering ≈ (1−λ) of the image, centred uniformly at random
    and clipped at the border (so it can cover less: the caller recomputes λ from its area)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy = int(torch.randint(height, (), generator=gen))
    cx = int(torch.randint(width, (), generator=gen))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h - cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w - cut_w // 2, width)
    return top, bottom, left, right


def mix_batch(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    prob: float = 1.0,
    switch: float = 0.5,
    smoothing: float = 0.0,
    gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """(mixed images, soft targets (N, C) summing to 1) for one batch ``x`` (N, C, H, W), labels ``y``.

    ``mixup``/``cutmix`` are the Beta(α, α) parameters (0 = off); with probability ``prob`` the batch
    is mixed at all, and when both are on CutMix is chosen with probability ``switch``. A batch left
    unmixed comes back as it was, with one-hot targets. ``smoothing`` is label smoothing folded into
    the targets (leave it 0 when the loss applies its own, as ``F.cross_entropy(label_smoothing=)``
    does to probability targets too). The draws are made in a fixed order from ``gen``.
    """
    for name, value, upper in (("mixup", mixup, math.inf), ("cutmix", cutmix, math.inf), ("prob", prob, 1.0)):
        if not 0.0 <= value <= upper:
            raise ValueError(f"{name} must be in [0, {upper}], got {value}")
    if not 0.0 <= switch <= 1.0 or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"switch must be in [0, 1] and smoothing in [0, 1), got {switch}, {smoothing}")
    use_mixup, use_cutmix = mixup > 0, cutmix > 0
    if not (use_mixup or use_cutmix) or float(torch.rand((), generator=gen)) >= prob:
        return x, soft_targets(y, num_classes, smoothing)
    if use_mixup and use_cutmix:
        use_cutmix = float(torch.rand((), generator=gen)) < switch
    other = x.flip(0)
    if use_cutmix:
        lam = beta(cutmix, gen)
        top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam, gen)
        mixed = x.clone()
        mixed[..., top:bottom, left:right] = other[..., top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
    else:
        lam = beta(mixup, gen)
        mixed = torch.lerp(x, other, 1.0 - lam)  # lam·x + (1−lam)·other
    target = soft_targets(y, num_classes, smoothing)
    return mixed, torch.lerp(target.flip(0), target, lam)  # lam·onehot(y) + (1−lam)·onehot(paired y)


@dataclass(frozen=True)
class Mixing:
    """A data's mixing settings, bound to the run's seed and class count: what the training loop calls."""

    num_classes: int
    seed: int
    mixup: float = 0.0
    cutmix: float = 0.0
    prob: float = 1.0
    switch: float = 0.5

    @classmethod
    def of(cls, data: Any, seed: int) -> Mixing | None:
        """The mixing ``data`` asks for (its mixup/cutmix/mix_prob/mix_switch), None when it mixes nothing."""
        if not mixes(data):
            return None
        mixup, cutmix, prob, switch = (float(getattr(data, k, v)) for k, v in FIELDS.items())
        return cls(data.num_classes, seed, mixup, cutmix, prob, switch)

    def __call__(self, x: Tensor, y: Tensor, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """Mix training step ``step`` of ``epoch``: (images, soft targets), the same on every rerun."""
        return mix_batch(
            x,
            y,
            self.num_classes,
            mixup=self.mixup,
            cutmix=self.cutmix,
            prob=self.prob,
            switch=self.switch,
            gen=mix_generator(self.seed, epoch, step),
        )


def mixes(data: Any) -> bool:
    """Whether training on ``data`` mixes batches (either alpha > 0 and a non-zero probability)."""
    on = float(getattr(data, "mixup", 0.0)) > 0 or float(getattr(data, "cutmix", 0.0)) > 0
    return on and float(getattr(data, "mix_prob", 1.0)) > 0
