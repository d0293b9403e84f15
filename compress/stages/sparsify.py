"""Unstructured magnitude pruning: zero the smallest weights, one-shot or gradually (AGP) while
fine-tuning (with KD when ``distill: true``); masks are enforced through training and made
permanent at the end. Tensors keep their shapes: dense runtimes are NOT faster, the compressed
file is smaller (the report's gzip column). For speed, use the structured ``prune`` stage.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from compress.context import Context
from compress.data import ImageData
from compress.distill.kd import FINETUNE_MOVES, FineTune
from compress.errors import CompressError
from compress.pruning import unstructured as U
from compress.stages.base import STAGES, Stage
from compress.training import evaluate


@STAGES.register("sparsify")
class Sparsify(Stage):
    """Unstructured magnitude pruning (torch.nn.utils.prune): global or per layer, one-shot or AGP."""

    kind: Literal["sparsify"] = "sparsify"
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of Conv/Linear weights set to zero")
    scope: Literal["global", "layer"] = Field("global", description="rank weights across layers, or in each")
    sparsity_schedule: Literal["oneshot", "agp"] = Field("oneshot", description="agp: cubic ramp during fine-tuning")
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="agp: sparsity at begin_epoch")
    begin_epoch: float = Field(0.0, ge=0, description="agp: fine-tuning epoch where the ramp starts")
    end_epoch: float | None = Field(None, gt=0, description="agp: where it ends (default: 3/4 of finetune.epochs)")
    update_every: float = Field(0.25, gt=0, le=100, description="agp: epochs between mask updates")
    ignore: list[str] = Field(default_factory=list, description="module-name patterns left dense (fnmatch)")
    finetune: FineTune | None = Field(None, description="fine-tune with the masks held (with kd: from the teacher)")

    renamed: ClassVar[dict[str, str]] = FINETUNE_MOVES
    example: ClassVar[dict[str, Any]] = {"kind": "sparsify", "sparsity": 0.5, "finetune": {"epochs": 1}}

    @model_validator(mode="after")
    def _schedule(self) -> Sparsify:
        agp_only = ("initial_sparsity", "begin_epoch", "end_epoch", "update_every")
        agp_fields = [k for k in agp_only if k in self.model_fields_set]
        if agp_fields and self.sparsity_schedule != "agp":
            raise ValueError(f"{'/'.join(agp_fields)} has no effect without sparsity_schedule: agp")
        if self.sparsity_schedule == "agp":
            if self.finetune is None:
                raise ValueError("sparsity_schedule 'agp' prunes during fine-tuning: add finetune: {epochs: N}")
            epochs = self.finetune.epochs
            end = self.end_epoch if self.end_epoch is not None else 0.75 * epochs
            if not self.begin_epoch < end <= epochs:
                raise ValueError(
                    f"agp needs begin_epoch < end_epoch <= finetune.epochs (got {self.begin_epoch}, {end}, {epochs})"
                )
            if self.finetune.optim.keep == "best":
                raise ValueError("keep: best could restore an epoch before the masks reached sparsity; use keep: last")
            if self.initial_sparsity >= self.sparsity:
                raise ValueError(f"initial_sparsity {self.initial_sparsity} must be below sparsity {self.sparsity}")
            self.end_epoch = end
        return self

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        super().preflight(models, data, field)  # the finetune: block
        if not U.prunable(models["student"], self.ignore):
            raise CompressError(f"{field}.ignore: no Conv/Linear layer of the student is left to sparsify")

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.student.to(ctx.device).eval()
        layers = U.prunable(model, self.ignore)
        raw0, gz0 = U.state_dict_bytes(model)
        agp = self.sparsity_schedule == "agp"
        U.sparsify_to(layers, self.initial_sparsity if agp else self.sparsity, self.scope)
        metrics: dict[str, Any] = {"test_acc_pruned": evaluate(model, ctx.data.eval_loader("test"), ctx.device)}
        if self.finetune is not None:
            grow = self._agp_callback(layers) if agp else None
            field = f"stages.{ctx.stage_index - 1}.finetune"
            metrics.update(self.finetune.run(ctx, model, "sparsify fine-tune", field, grow))
        U.finish(layers)
        raw1, gz1 = U.state_dict_bytes(model)
        per_layer = U.layer_sparsity(layers)
        overall = U.overall_sparsity(layers)
        ctx.log.info(
            "sparsify %s %s: %.1f%% of %d layers' weights are zero; gzip state dict %d -> %d bytes "
            "(dense runtimes are not faster)",
            self.scope, self.sparsity_schedule, 100 * overall, len(layers), gz0, gz1,
        )  # fmt: skip
        metrics.update(
            sparsity=overall,
            layer_sparsity=per_layer,
            state_dict_bytes={"before": raw0, "after": raw1},
            state_dict_gzip_bytes={"before": gz0, "after": gz1},
            note="zeros are stored densely: ONNX Runtime / PyTorch run no faster; only compressed size shrinks",
        )
        return metrics

    def _agp_callback(self, layers: list[tuple[str, nn.Module]]):
        """Grows the masks along the AGP curve every ``update_every`` epochs (and at the end)."""
        end = float(self.end_epoch or 0)
        due = [self.begin_epoch]  # the next update, in epochs; +inf once the final sparsity is set

        def grow(progress: float) -> None:
            if due[0] == float("inf") or (progress + 1e-9 < due[0] and progress < end):
                return
            target = U.agp(progress, self.sparsity, self.initial_sparsity, self.begin_epoch, end)
            U.sparsify_to(layers, target, self.scope)
            while due[0] <= progress + 1e-9:
                due[0] += self.update_every
            if target >= self.sparsity:
                due[0] = float("inf")

        return grow
