"""Knowledge distillation from the teacher(s) into the student with registered loss terms.

``kd:`` holds the distillation settings (:class:`compress.distill.kd.KD`): ``loss: hinton`` (the
default) is Hinton KD, ``losses: [...]`` combines any registered terms (``compress list``), e.g.
``[{name: ce}, {name: dkd, beta: 8}]`` or CE + attention transfer on named layer pairs;
``teachers: [...]`` distils from several teachers with weights; ``cache_teacher`` computes each
teacher logit once. ``optim:`` holds the optimizer and schedule.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from compress.config import moved
from compress.context import Context
from compress.distill.kd import KD, SHORTHAND
from compress.stages.base import STAGES, Stage
from compress.training import OptimConfig


@STAGES.register("distill")
class Distill(Stage):
    """Knowledge distillation from the teacher(s) into the student with registered loss terms."""

    kind: Literal["distill"] = "distill"
    epochs: int = Field(ge=1, le=10_000)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    kd: KD = Field(default_factory=KD)

    renamed: ClassVar[dict[str, str]] = moved("optim", OptimConfig) | moved("kd", KD, extra=SHORTHAND)
    example: ClassVar[dict[str, Any]] = {"kind": "distill", "epochs": 1, "kd": {"loss": "hinton", "temperature": 4}}

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def apply(self, ctx: Context) -> dict[str, Any]:
        return self.kd.fit(ctx, ctx.student, self.epochs, self.optim, f"stages.{ctx.stage_index - 1}.kd")
