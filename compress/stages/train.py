"""Supervised training of the teacher or the student (cross-entropy, optional label smoothing)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.config import moved
from compress.context import Context
from compress.stages.base import STAGES, Stage
from compress.training import OptimConfig, cross_entropy, fit


@STAGES.register("train")
class Train(Stage):
    """Supervised training of the teacher or the student (SGD + nesterov, cosine/one-cycle, warm-up)."""

    kind: Literal["train"] = "train"
    target: Literal["teacher", "student"] = "student"
    epochs: int = Field(ge=1, le=10_000)
    optim: OptimConfig = Field(default_factory=OptimConfig)

    renamed: ClassVar[dict[str, str]] = moved("optim", OptimConfig)
    example: ClassVar[dict[str, Any]] = {"kind": "train", "target": "student", "epochs": 1}

    def requirements(self) -> frozenset[str]:
        return frozenset({"teacher"}) if self.target == "teacher" else frozenset()

    def changes(self) -> tuple[str, ...]:
        return (self.target,)

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.models[self.target]
        loss = cross_entropy(self.optim.label_smoothing)
        return fit(ctx, model, loss, self.epochs, self.optim, f"train {self.target}")
