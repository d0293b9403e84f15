"""Re-estimate the student's BatchNorm statistics on training images: no labels, no gradients.

After pruning (or sparsifying, or quantization-aware tweaks) the running mean and variance stored in
every BatchNorm describe the network as it was; a forward pass over some training batches in train
mode, with a cumulative average instead of the momentum update, re-measures them for the network as
it is (the "BN recalibration" of AdaBN / NetAdapt-style pruning pipelines). Cheap: a few batches.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field
from torch import nn

from compress.context import Context
from compress.data import ImageData
from compress.errors import CompressError
from compress.stages.base import STAGES, Stage
from compress.training import batch_norms, evaluate, reestimate_bn


@STAGES.register("recalibrate_bn")
class RecalibrateBN(Stage):
    """Re-measure every BatchNorm's running mean/variance on training batches (after pruning)."""

    kind: Literal["recalibrate_bn"] = "recalibrate_bn"
    batches: int = Field(20, ge=1, le=100_000, description="training batches (un-augmented) to average over")

    example: ClassVar[dict[str, Any]] = {"kind": "recalibrate_bn", "batches": 2}

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        if not batch_norms(models["student"]):
            raise CompressError(f"{field}: the student has no BatchNorm layer with running statistics to recalibrate")

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.student.to(ctx.device)
        before = evaluate(model, ctx.data.eval_loader("test"), ctx.device)
        layers = batch_norms(model)
        seen = reestimate_bn(
            model, ctx.data.train_loader(seed=ctx.recipe.seed, augment=False), ctx.device, self.batches
        )
        after = evaluate(model, ctx.data.eval_loader("test"), ctx.device)
        ctx.log.info("recalibrate_bn: %d layers, %d batches: test_acc %.4f -> %.4f", len(layers), seen, before, after)
        return {"layers": len(layers), "batches": seen, "test_acc_before": before, "test_acc": after}
