"""Knowledge distillation teacher -> student with a registered loss (default: Hinton KD)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import Tensor, nn

from compress.context import Context
from compress.distill import LOSSES
from compress.stages.base import STAGES, Stage
from compress.training import LossFn, OptimConfig, fit


class KDConfig(BaseModel):
    """Distillation settings; shared with prune's KD fine-tuning."""

    loss: str = Field("hinton", description="a registered distillation loss (compress list)")
    temperature: float = Field(4.0, gt=0, le=100)
    alpha: float = Field(0.9, ge=0, le=1, description="weight of the soft-target term")

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(LOSSES.unknown_message(v))
        return v


def kd_loss(teacher: nn.Module, cfg: KDConfig, label_smoothing: float) -> LossFn:
    """Student loss against a frozen teacher run in eval mode under inference_mode."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss = LOSSES.get(cfg.loss)

    def loss_fn(student: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            z_t = teacher(x)
        z_t = z_t.clone()  # leave inference mode: the loss saves it for backward
        z_s = student(x)
        return loss(z_s, z_t, y, temperature=cfg.temperature, alpha=cfg.alpha, label_smoothing=label_smoothing), z_s

    return loss_fn


@STAGES.register("distill")
class Distill(Stage, OptimConfig, KDConfig):
    """Knowledge distillation from the teacher into the student with a registered loss."""

    kind: Literal["distill"] = "distill"
    epochs: int = Field(ge=1, le=10_000)

    needs = frozenset({"teacher"})

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def apply(self, ctx: Context) -> dict[str, Any]:
        teacher = ctx.teacher
        assert teacher is not None  # guaranteed by the recipe's stage-order check
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        teacher.to(device=ctx.device, memory_format=fmt)
        try:
            metrics = fit(
                ctx,
                ctx.student,
                kd_loss(teacher, self, self.label_smoothing),
                self.epochs,
                self,
                f"distill ({self.loss}, T={self.temperature:g}, α={self.alpha:g})",
            )
        finally:
            teacher.to(memory_format=torch.contiguous_format)
            for p in teacher.parameters():
                p.requires_grad_(True)
        return metrics
