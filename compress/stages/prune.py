"""Structured channel pruning that really shrinks tensors (torch-pruning's DependencyGraph).

Coupled layers (a residual add, a BN after a conv, the next conv's input) are found by tracing, so
removing a channel removes it everywhere it flows; parameter count, MACs and the saved file shrink,
the output shape does not. The classifier is never pruned. Optional fine-tuning, with KD from the
teacher when ``distill: true``.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Literal

import torch
import torch_pruning as tp
from pydantic import Field, field_validator
from torch import nn

from compress.context import Context
from compress.data import DataBundle
from compress.errors import CompressError, StageFailed
from compress.importance import IMPORTANCES
from compress.stages.base import STAGES, Stage
from compress.stages.distill import KDConfig
from compress.training import OptimConfig, cross_entropy, fit


def count(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) of one forward pass on ``example``, via torch-pruning's op counter."""
    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


@STAGES.register("prune")
class Prune(Stage, OptimConfig, KDConfig):
    """Structured channel pruning (torch-pruning DepGraph) + optional (KD) fine-tune."""

    kind: Literal["prune"] = "prune"
    method: str = Field("l1", description="importance criterion (compress list)")
    ratio: float = Field(0.5, gt=0, lt=1, description="fraction of channels removed per layer (uniform) or overall")
    global_pruning: bool = Field(False, description="rank channels across layers instead of per layer")
    round_to: int | None = Field(None, ge=1, le=1024, description="keep channel counts a multiple of this")
    ignore: list[str] = Field(default_factory=list, description="module-name patterns never pruned (fnmatch)")
    finetune_epochs: int = Field(0, ge=0, le=10_000)
    distill: bool = Field(False, description="fine-tune with KD from the teacher")
    lr: float = Field(0.01, gt=0, le=10)

    @field_validator("method")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in IMPORTANCES:
            raise ValueError(IMPORTANCES.unknown_message(v))
        return v

    def requirements(self) -> frozenset[str]:
        return self.kd_requirements() if self.distill else frozenset()

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    def apply(self, ctx: Context) -> dict[str, Any]:
        model = ctx.student.to(ctx.device).eval()
        example = ctx.example_input(2)
        with torch.no_grad():
            out_before = model(example)
        macs0, params0 = count(model, example)
        ignored = self._ignored_layers(model, out_before.shape[-1])
        try:
            pruner = tp.pruner.BasePruner(
                model,
                example,
                importance=IMPORTANCES.get(self.method)(),
                pruning_ratio=self.ratio,
                global_pruning=self.global_pruning,
                ignored_layers=ignored,
                round_to=self.round_to,
            )
            pruner.step()
        except Exception as exc:  # noqa: BLE001 - report which model/op torch-pruning could not handle
            raise StageFailed(
                f"prune: torch-pruning failed on {type(model).__name__}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"
            ) from exc
        with torch.no_grad():
            out_after = model(example)
        if out_after.shape != out_before.shape:
            raise StageFailed(f"prune: output shape changed {tuple(out_before.shape)} -> {tuple(out_after.shape)}")
        macs1, params1 = count(model, example)
        ctx.pruned["student"] = True
        ctx.log.info(
            "prune %s ratio %.2f: params %d -> %d, MACs %d -> %d",
            self.method,
            self.ratio,
            params0,
            params1,
            macs0,
            macs1,
        )
        metrics: dict[str, Any] = {
            "params_before": params0,
            "params_after": params1,
            "macs_before": macs0,
            "macs_after": macs1,
        }
        if self.finetune_epochs:
            if self.distill:
                field = f"stages.{ctx.stage_index - 1}"
                metrics.update(self.distill_fit(ctx, model, self.finetune_epochs, self, field, "prune fine-tune + KD"))
            else:
                loss_fn = cross_entropy(self.label_smoothing)
                metrics.update(fit(ctx, model, loss_fn, self.finetune_epochs, self, "prune fine-tune"))
        return metrics

    def preflight(self, models: dict[str, nn.Module], data: DataBundle, field: str) -> None:
        if self.distill:
            self.kd_preflight(models, data, field)
        names = [n for n, _ in models["student"].named_modules() if n]
        for pattern in self.ignore:
            if not any(fnmatch.fnmatch(n, pattern) for n in names):
                close = difflib.get_close_matches(pattern, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise CompressError(f"{field}.ignore: pattern {pattern!r} matches no module of the student{hint}")

    def _ignored_layers(self, model: nn.Module, num_classes: int) -> list[nn.Module]:
        """The classifier (any Linear producing num_classes outputs) plus the ``ignore`` patterns."""
        names = dict(model.named_modules())
        ignored = [m for m in names.values() if isinstance(m, nn.Linear) and m.out_features == num_classes]
        for pattern in self.ignore:
            ignored.extend(m for n, m in names.items() if n and fnmatch.fnmatch(n, pattern))
        return ignored
