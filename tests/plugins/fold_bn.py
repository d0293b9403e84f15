"""A test-only stage that changes a model's module graph, not just its widths: every BatchNorm that
directly follows a conv (in its parent's registration order) is folded into that conv, which gains a
bias, and is replaced by ``nn.Identity``. The function is unchanged (up to float rounding).

Importing this module registers it (``@STAGES.register("fold_bn")``); a recipe then says
``{"kind": "fold_bn"}``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from compress.stages.base import STAGES, Stage

if TYPE_CHECKING:
    from compress.context import Context


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold each conv -> BatchNorm pair of ``model`` in place; return how many were folded."""
    folded = 0
    for parent in list(model.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats):
                continue
            scale = torch.rsqrt(bn.running_var + bn.eps)
            if bn.affine:
                scale = scale * bn.weight
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            shift = (bias - bn.running_mean) * scale + (bn.bias if bn.affine else 0)
            conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(shift)
            setattr(parent, second, nn.Identity())
            folded += 1
    return folded


@STAGES.register("fold_bn")
class FoldBN(Stage):
    """Fold BatchNorm into the preceding conv (BN becomes nn.Identity): a structural change."""

    kind: Literal["fold_bn"] = "fold_bn"
    target: Literal["teacher", "student"] = "student"

    example: ClassVar[dict[str, Any]] = {"kind": "fold_bn"}

    def changes(self) -> tuple[str, ...]:
        return (self.target,)

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.models[self.target].eval()
        return {"folded": fold_batchnorm(model)}
