"""Distillation losses: a registry of loss *terms* that a recipe combines with weights.

A term is a pydantic class (its recipe entry, ``extra="forbid"``) registered under its ``name``.
At the start of a distill stage each term ``build``s a :class:`TermModule` (an ``nn.Module``, so
learnable parts such as FitNets regressors are optimized with the student and dropped after the
stage) that maps one step's :class:`Outputs` to a scalar. The stage's loss is
``sum(term.weight * module(outputs))``.

Every loss is also a plain function of tensors (``hinton_loss``, ``dkd_loss``, ``at_loss``,
``fitnets_loss``) so it can be checked against a hand computation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from compress.registry import Registry


@dataclass
class Outputs:
    """Everything one training step produced that a loss term may use."""

    z_s: Tensor  # student logits (N, classes)
    z_t: list[Tensor]  # one logits tensor per teacher
    weights: list[float]  # teacher weights, summing to 1
    combine: str  # "average": one soft target, the weighted mean of the teachers' | "per_teacher"
    y: Tensor
    epoch: float  # training progress in epochs (DKD's warm-up)
    label_smoothing: float = 0.0
    feats_s: dict[str, Tensor] = field(default_factory=dict)  # module path -> student output
    feats_t: list[dict[str, Tensor]] = field(default_factory=list)  # per teacher: module path -> output

    def soft_targets(self, temperature: float) -> list[tuple[float, Tensor]]:
        """(weight, teacher log-probabilities at ``temperature``) pairs the logit losses sum over.

        ``average``: a single pair, log of the weighted mean of the teachers' probabilities (one
        teacher: exactly its log_softmax). ``per_teacher``: one pair per teacher with its weight.
        """
        logps = [F.log_softmax(z.float() / temperature, dim=1) for z in self.z_t]
        if self.combine == "per_teacher" or len(logps) == 1:
            return list(zip(self.weights, logps, strict=True))
        log_w = torch.tensor(self.weights, device=logps[0].device).log().view(-1, 1, 1)
        return [(1.0, torch.logsumexp(torch.stack(logps) + log_w, dim=0))]


def resize_spatial(x: Tensor, size: tuple[int, ...]) -> Tensor:
    """(N, C, H, W) resized to ``size`` (H', W'): area pooling when shrinking, bilinear when growing."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if x.shape[-2] >= size[0] and x.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class TermModule(nn.Module):
    """A built loss term: ``forward(outputs) -> scalar`` (unweighted)."""

    def forward(self, out: Outputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class LayerPair(BaseModel):
    """A student module and the teacher module it learns from, by module path (``layer2.0.conv2``)."""

    model_config = ConfigDict(extra="forbid")

    student: str = Field(min_length=1)
    teacher: str = Field(min_length=1)


class LossTerm(BaseModel):
    """A recipe entry under ``losses:``; subclasses register with ``@LOSSES.register(name)``."""

    model_config = ConfigDict(extra="forbid")

    name: str
    weight: float = Field(1.0, ge=0, le=1e6, description="multiplies this term in the stage's loss")

    #: the term already contains the hard-label cross-entropy (so ``loss: <name>`` needs no ``ce``)
    includes_ce: ClassVar[bool] = False
    #: the term reads teacher logits only (so cached teacher logits can feed it)
    logits_only: ClassVar[bool] = True

    def layer_pairs(self) -> list[LayerPair]:
        """Module pairs whose outputs this term needs captured (feature losses)."""
        return []

    def feature_ndims(self) -> tuple[int, ...]:
        """The tensor ranks this term accepts for the captured outputs."""
        return (4,)

    def build(self, feats_s: dict[str, Tensor], feats_t: list[dict[str, Tensor]]) -> TermModule:
        """The module computing this term; ``feats_*`` are example outputs (shapes for regressors)."""
        raise NotImplementedError


#: discovered: every module of this package, plus installed plugins of the group ``compress.losses``
LOSSES: Registry[type[LossTerm]] = Registry("distillation loss", package=f"{__name__}.losses", group="compress.losses")
