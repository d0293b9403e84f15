"""Plain cross-entropy on the labels, to combine with losses that carry none (DKD, FitNets, AT)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch.nn.functional as F
from torch import Tensor

from compress.distill import LOSSES, LossTerm, Outputs, TermModule


@LOSSES.register("ce")
class CrossEntropy(LossTerm):
    """Cross-entropy with the hard labels (the stage's label_smoothing applies)."""

    name: Literal["ce"] = "ce"

    includes_ce: ClassVar[bool] = True

    def build(self, feats_s: dict, feats_t: list) -> TermModule:
        return _CE()


class _CE(TermModule):
    def forward(self, out: Outputs) -> Tensor:
        return F.cross_entropy(out.z_s.float(), out.y, label_smoothing=out.label_smoothing)
