"""Structured channel pruning that really shrinks tensors, to a channel ratio or a MACs/params
budget, in one shot or in N steps of prune → fine-tune (with KD from the teacher when
``distill: true``). See compress/pruning/structured.py for how channels are chosen.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.context import Context
from compress.data import ImageData
from compress.distill.kd import FINETUNE_MOVES, FineTune
from compress.errors import StageFailed
from compress.importance import needs_gradients
from compress.pruning.structured import (
    StructuredOptions,
    accumulate_gradients,
    count,
    guarded,
    head_counts,
    prune_step,
    search_ratio,
)
from compress.stages.base import STAGES, Stage
from compress.training import evaluate

__all__ = ["Prune", "count"]


def step_share(total: float, step: int, steps: int) -> float:
    """The ratio step ``step`` of ``steps`` removes from what is left, so that after it
    ``total * step / steps`` of the original channels are gone (a linear schedule)."""
    before, after = total * (step - 1) / steps, total * step / steps
    return 1 - (1 - after) / (1 - before)


@STAGES.register("prune")
class Prune(Stage, StructuredOptions):
    """Structured channel pruning (torch-pruning DepGraph) to a ratio or MACs/params target,
    one-shot or iterative, with optional fine-tuning (``finetune:``, KD with ``finetune.kd``) after each step."""

    kind: Literal["prune"] = "prune"
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of channels removed (default 0.5)")
    target_macs: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the MACs, e.g. 0.5")
    target_params: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the parameters")
    steps: int = Field(1, ge=1, le=100, description="prune in this many steps, fine-tuning after each")
    finetune: FineTune | None = Field(None, description="fine-tune after each step (with kd: from the teacher)")

    renamed: ClassVar[dict[str, str]] = FINETUNE_MOVES
    example: ClassVar[dict[str, Any]] = {"kind": "prune", "ratio": 0.5, "finetune": {"epochs": 1, "kd": True}}

    @model_validator(mode="after")
    def _one_target(self) -> Prune:
        given = [k for k in ("ratio", "target_macs", "target_params") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of ratio, target_macs, target_params (got {', '.join(given)})")
        if not given:
            self.ratio = 0.5
        over = {k: v for k, v in {"ratio": self.ratio, **self.ratios}.items() if v is not None and v > self.max_ratio}
        if over:
            name, value = next(iter(over.items()))
            raise ValueError(f"ratio {value} ({name}) exceeds max_ratio {self.max_ratio}; raise max_ratio")
        return self

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        super().preflight(models, data, field)  # the finetune: block
        self.check_patterns(models["student"], field)
        student = models["student"].eval()
        example = data.example_input(2)
        with torch.no_grad():
            num_classes = student(example).shape[-1]
        self.check_overrides(student, example, num_classes, field)
        self.check_heads(student, field)

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.student.to(ctx.device).eval()
        example = ctx.example_input(2)
        with torch.no_grad():
            shape = model(example).shape
        num_classes = shape[-1]
        macs0, params0 = count(model, example)
        history: list[dict[str, Any]] = []
        fits: list[dict[str, Any]] = []
        pruner = None  # ratio mode: one torch-pruning pruner stepping through the linear schedule
        heads0 = head_counts(model)  # whole heads leave on the same linear schedule
        for step in range(1, self.steps + 1):
            if needs_gradients(self.method):
                loader = ctx.data.train_loader(seed=ctx.recipe.seed, augment=False)
                accumulate_gradients(model, loader, ctx.device, self.taylor_batches)
            if self.ratio is not None:
                ratio = self.ratio * step / self.steps  # of the original channels, removed so far
                if pruner is None:  # built once (traces the graph); step() follows the original widths
                    build = lambda: self.pruner(model, example, self.ratio, num_classes, steps=self.steps)  # noqa: E731
                    pruner = guarded(model, build)
                guarded(model, pruner.step, example)
            else:
                metric = "macs" if self.target_macs is not None else "params"
                keep = self.target_macs if self.target_macs is not None else self.target_params
                base = macs0 if metric == "macs" else params0
                budget = int(base * (1 - (1 - keep) * step / self.steps))
                scale = (lambda r, s=step: step_share(r, s, self.steps)) if self.steps > 1 else (lambda r: r)
                plan = (heads0, step, self.steps)
                ratio, _ = search_ratio(model, example, self, budget, metric, num_classes, scale, head_plan=plan)
                prune_step(model, example, self, ratio, num_classes, scale, plan)
            model.zero_grad(set_to_none=True)
            with torch.no_grad():
                now = model(example).shape
            if now != shape:
                raise StageFailed(f"prune: output shape changed {tuple(shape)} -> {tuple(now)}")
            macs, params = count(model, example)
            row: dict[str, Any] = {"step": step, "ratio": ratio, "macs": macs, "params": params}
            if self.head_ratio:
                row["heads"] = sum(head_counts(model).values())
            row["test_acc_pruned"] = evaluate(model, ctx.data.eval_loader("test"), ctx.device)
            ctx.log.info(
                "prune step %d/%d (%s, ratio %.3f): params %d -> %d, MACs %d -> %d, test_acc %.4f",
                step, self.steps, self.method, ratio, params0, params, macs0, macs, row["test_acc_pruned"],
            )  # fmt: skip
            if self.finetune is not None:
                label = f"prune fine-tune{f' {step}/{self.steps}' * (self.steps > 1)}"
                fits.append(self.finetune.run(ctx, model, label, f"stages.{ctx.stage_index - 1}.finetune"))
                row["test_acc_finetuned"] = fits[-1]["test_acc"]
            history.append(row)
        macs1, params1 = history[-1]["macs"], history[-1]["params"]
        metrics: dict[str, Any] = {
            "params_before": params0,
            "params_after": params1,
            "macs_before": macs0,
            "macs_after": macs1,
            "macs_kept": macs1 / macs0,
            "params_kept": params1 / params0,
            "steps": history,
        }
        if self.head_ratio:
            metrics["heads_before"], metrics["heads_after"] = sum(heads0.values()), history[-1]["heads"]
        if fits:  # the last fine-tune's metrics (test_acc, history, ...) describe the result
            metrics.update(fits[-1])
            metrics["seconds"] = sum(f["seconds"] for f in fits)  # fine-tuning time over all steps
        return metrics
