"""Attention transfer, Zagoruyko & Komodakis, ICLR 2017 (arXiv:1612.03928).

A layer's spatial attention map is the channel mean of |A|^p, flattened and L2-normalized; the
loss is the mean squared difference of student and teacher maps, summed over layer pairs. The
paper's β/2 with β = 1000 is the default weight. Channel counts may differ; when spatial sizes
differ the student's map is resized to the teacher's (area pooling down, bilinear up).
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from compress.distill import LOSSES, LayerPair, LossTerm, Outputs, TermModule, resize_spatial


def attention_map(f: Tensor, p: float = 2.0, size: tuple[int, int] | None = None) -> Tensor:
    """(N, H·W) normalized map of mean_c |f|^p for a (N, C, H, W) feature map."""
    a = f.float().abs().pow(p).mean(1, keepdim=True)
    if size is not None:
        a = resize_spatial(a, size)
    return F.normalize(a.flatten(1), dim=1)


def at_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0) -> Tensor:
    """mean((Q_s − Q_t)²) for one layer pair, Q = attention_map."""
    q_t = attention_map(f_t, p)
    q_s = attention_map(f_s, p, size=tuple(f_t.shape[-2:]))
    return (q_s - q_t).pow(2).mean()


@LOSSES.register("attention")
class Attention(LossTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017) on named layer pairs."""

    name: Literal["attention"] = "attention"
    weight: float = Field(500.0, ge=0, le=1e6, description="β/2 of the paper (β = 1000)")
    pairs: list[LayerPair] = Field(min_length=1, description="student/teacher module paths")
    p: float = Field(2.0, gt=0, le=8, description="exponent of |A| in the attention map")

    logits_only: ClassVar[bool] = False

    def layer_pairs(self) -> list[LayerPair]:
        return self.pairs

    def build(self, feats_s: dict, feats_t: list) -> TermModule:
        return _Attention(self.pairs, self.p)


class _Attention(TermModule):
    def __init__(self, pairs: list[LayerPair], p: float) -> None:
        super().__init__()
        self.pairs, self.p = pairs, p

    def forward(self, out: Outputs) -> Tensor:
        total = torch.zeros((), device=out.z_s.device)
        for w, feats_t in zip(out.weights, out.feats_t, strict=True):
            for pair in self.pairs:
                total = total + w * at_loss(out.feats_s[pair.student], feats_t[pair.teacher], self.p)
        return total
