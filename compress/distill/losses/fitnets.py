"""FitNets hints, Romero et al., ICLR 2015 (arXiv:1412.6550).

The student's hint layer output, passed through a learned regressor, should match the teacher's
guided layer output (mean squared error). The regressor is a 1×1 convolution (a linear map for
(N, D) or (N, L, D) outputs) and exists only when channel counts differ; when spatial sizes differ
the student's output is resized to the teacher's. Regressors train with the student and are
dropped when the stage ends.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from compress.distill import LOSSES, LayerPair, LossTerm, Outputs, TermModule, resize_spatial


def fitnets_loss(f_s: Tensor, f_t: Tensor, regressor: nn.Module | None = None) -> Tensor:
    """MSE(regressor(f_s) resized to f_t's size, f_t)."""
    if regressor is not None:
        f_s = regressor(f_s.movedim(-1, 1) if f_s.ndim == 3 else f_s)
        f_s = f_s.movedim(1, -1) if f_t.ndim == 3 else f_s
    if f_s.ndim == 4:
        f_s = resize_spatial(f_s, tuple(f_t.shape[-2:]))
    return F.mse_loss(f_s.float(), f_t.float())


def _regressor(f_s: Tensor, f_t: Tensor) -> nn.Module | None:
    if f_s.ndim != f_t.ndim or (f_s.ndim == 3 and f_s.shape[1] != f_t.shape[1]):
        raise ValueError(
            f"student output {tuple(f_s.shape)} cannot be matched to teacher output {tuple(f_t.shape)} "
            "(same rank needed; (N, L, D) outputs need the same L)"
        )
    cs, ct = f_s.shape[1] if f_s.ndim == 4 else f_s.shape[-1], f_t.shape[1] if f_t.ndim == 4 else f_t.shape[-1]
    if cs == ct:
        return None
    if f_s.ndim == 4:
        return nn.Conv2d(cs, ct, kernel_size=1)
    return nn.Conv1d(cs, ct, kernel_size=1) if f_s.ndim == 3 else nn.Linear(cs, ct)


@LOSSES.register("fitnets")
class FitNets(LossTerm):
    """FitNets hints (Romero et al. 2015): MSE between regressed student and teacher layer outputs."""

    name: Literal["fitnets"] = "fitnets"
    pairs: list[LayerPair] = Field(min_length=1, description="student hint / teacher guided module paths")

    logits_only: ClassVar[bool] = False

    def layer_pairs(self) -> list[LayerPair]:
        return self.pairs

    def feature_ndims(self) -> tuple[int, ...]:
        return (2, 3, 4)

    def build(self, feats_s: dict, feats_t: list) -> TermModule:
        return _FitNets(self.pairs, feats_s, feats_t)


class _FitNets(TermModule):
    def __init__(self, pairs: list[LayerPair], feats_s: dict, feats_t: list) -> None:
        super().__init__()
        self.pairs = pairs
        self.regressors = nn.ModuleList()
        self.index: dict[tuple[int, int], int] = {}  # (teacher, pair) -> regressor slot
        for k, ft in enumerate(feats_t):
            for i, pair in enumerate(pairs):
                reg = _regressor(feats_s[pair.student], ft[pair.teacher])
                if reg is not None:
                    self.index[(k, i)] = len(self.regressors)
                    self.regressors.append(reg)

    def forward(self, out: Outputs) -> Tensor:
        total = torch.zeros((), device=out.z_s.device)
        for k, (w, feats_t) in enumerate(zip(out.weights, out.feats_t, strict=True)):
            for i, pair in enumerate(self.pairs):
                slot = self.index.get((k, i))
                reg = self.regressors[slot] if slot is not None else None
                total = total + w * fitnets_loss(out.feats_s[pair.student], feats_t[pair.teacher], reg)
        return total
