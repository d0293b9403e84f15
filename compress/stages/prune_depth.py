"""Depth pruning: remove whole residual blocks (identity shortcut) from the student, least important
first, then optionally fine-tune (with KD from the teacher when ``finetune.kd``).

Batch-1 CPU latency follows the number of layers more than their width, so this is the lever channel
pruning lacks. ``blocks: N`` ranks the removable blocks (compress/pruning/depth.py) by ``method``
and removes the N least important; ``remove: [names]`` removes exactly those (what ``compress search``
writes into recipe.best.yaml, so a run reproduces its architecture). The removed blocks become
``nn.Identity``; the checkpoint records the new module tree, so reloading, ``--resume`` and
``compress bench`` rebuild exactly this network.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from compress.context import Context
from compress.data import ImageData
from compress.distill.kd import FineTune
from compress.errors import CompressError, StageFailed
from compress.pruning.depth import block_importance, remove_blocks, residual_blocks
from compress.pruning.structured import count
from compress.stages.base import STAGES, Stage
from compress.training import evaluate


@STAGES.register("prune_depth")
class PruneDepth(Stage):
    """Remove whole residual blocks (identity shortcut) from the student: the N least important, or
    the named ones; optional fine-tuning after (``finetune:``, KD with ``finetune.kd``)."""

    kind: Literal["prune_depth"] = "prune_depth"
    blocks: int | None = Field(None, ge=1, le=10_000, description="remove this many blocks, least important first")
    remove: list[str] = Field(
        default_factory=list, description="remove exactly these blocks (module names, e.g. layer2.1); not with blocks"
    )
    method: Literal["loss", "bn_scale", "output"] = Field(
        "loss",
        description="importance: loss = CE increase when the block alone is removed (a probe on training batches), "
        "bn_scale = mean |gamma| of its last BatchNorm (no data), output = relative change of the logits",
    )
    probe_batches: int = Field(8, ge=1, le=100_000, description="un-augmented training batches the probe measures on")
    keep: list[str] = Field(default_factory=list, description="fnmatch patterns of blocks never removed")
    finetune: FineTune | None = Field(None, description="fine-tune after the removal (with kd: from the teacher)")

    example: ClassVar[dict[str, Any]] = {
        "kind": "prune_depth",
        "blocks": 2,
        "probe_batches": 2,
        "finetune": {"epochs": 1, "kd": True},
    }

    @model_validator(mode="after")
    def _one_choice(self) -> PruneDepth:
        if self.blocks is not None and self.remove:
            raise ValueError("give blocks (how many to remove) or remove (which ones), not both")
        if self.blocks is None and not self.remove:
            raise ValueError("give blocks (how many to remove, least important first) or remove (block names)")
        twice = sorted({n for n in self.remove if self.remove.count(n) > 1})
        if twice:
            raise ValueError(f"remove names {', '.join(twice)} more than once")
        return self

    def changes(self) -> tuple[str, ...]:
        return ("student",)

    # ------------------------------------------------------------------ checks
    def _kept(self, name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in self.keep)

    def check(self, model: nn.Module, example: torch.Tensor, field: str) -> list[str]:
        """The student's removable blocks; one-line errors naming the field for what cannot be done."""
        found = residual_blocks(model, example)
        if not found:
            raise CompressError(
                f"{field}: the student ({type(model).__name__}) has no removable residual block (a module whose "
                "output is its input plus a branch through an identity shortcut, with the input's shape)"
            )
        listing = ", ".join(found)
        for pattern in self.keep:
            if not any(fnmatch.fnmatch(n, pattern) for n in found):
                raise CompressError(f"{field}.keep: pattern {pattern!r} matches no removable block ({listing})")
        for name in self.remove:
            if name not in found:
                close = difflib.get_close_matches(name, found, n=3)
                hint = f"did you mean {', '.join(close)}?" if close else f"removable: {listing}"
                modules = dict(model.named_modules())
                what = (
                    f" (a {type(modules[name]).__name__} without an identity shortcut that keeps its input's shape)"
                    if name in modules
                    else ""
                )
                raise CompressError(f"{field}.remove: {name!r}{what} is not a removable block of the student; {hint}")
            if self._kept(name):
                raise CompressError(f"{field}.remove: {name!r} matches a keep pattern")
        free = [n for n in found if not self._kept(n)]
        if self.blocks is not None and self.blocks > len(free):
            kept = f" ({len(found) - len(free)} kept by keep)" if len(free) < len(found) else ""
            raise CompressError(
                f"{field}.blocks: {self.blocks} exceeds the {len(free)} removable blocks of the student{kept}: "
                + listing
            )
        if self.method == "bn_scale":
            for name in free:
                if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.get_submodule(name).modules()):
                    raise CompressError(f"{field}.method: bn_scale needs a BatchNorm in every block; {name!r} has none")
        return found

    def preflight(self, models: dict[str, nn.Module], data: ImageData, field: str) -> None:
        super().preflight(models, data, field)  # the finetune: block
        student = models["student"]
        was_training = student.training
        try:
            self.check(student, data.example_input(2), field)
        finally:
            student.train(was_training)

    # ------------------------------------------------------------------ run
    def apply(self, ctx: Context) -> dict[str, Any]:
        field = f"stages.{ctx.stage_index - 1}"
        model = ctx.student.to(ctx.device).eval()
        example = ctx.example_input(2)
        with torch.no_grad():
            shape = model(example).shape
        found = self.check(model, example, field)  # again: an earlier stage may have changed the student
        free = [n for n in found if not self._kept(n)]
        macs0, params0 = count(model, example)
        scores: dict[str, float] = {}
        if self.remove:  # named blocks: no ranking to do (a probe on every block would cost time for nothing)
            chosen = set(self.remove)
        else:
            loader = ctx.data.train_loader(seed=ctx.recipe.seed, augment=False) if self.method != "bn_scale" else None
            scores = block_importance(model, free, loader, ctx.device, self.method, self.probe_batches)
            ranked = sorted(free, key=lambda n: scores[n])  # stable: ties go in forward order
            chosen = set(ranked[: self.blocks])
        removed = [n for n in found if n in chosen]  # forward order
        remove_blocks(model, removed)
        with torch.no_grad():
            now = model(example).shape
        if now != shape:
            raise StageFailed(f"prune_depth: output shape changed {tuple(shape)} -> {tuple(now)}")
        macs, params = count(model, example)
        after = len(residual_blocks(model, example))
        acc = evaluate(model, ctx.data.eval_loader("test"), ctx.device)
        ctx.log.info(
            "prune_depth (%s): removed %d of %d blocks (%s): params %d -> %d, MACs %d -> %d, test_acc %.4f",
            self.method, len(removed), len(found), ", ".join(removed), params0, params, macs0, macs, acc,
        )  # fmt: skip
        metrics: dict[str, Any] = {
            "method": self.method,
            "removed": removed,
            "scores": scores,
            "blocks_before": len(found),
            "blocks_after": after,
            "params_before": params0,
            "params_after": params,
            "macs_before": macs0,
            "macs_after": macs,
            "macs_kept": macs / macs0,
            "params_kept": params / params0,
            "test_acc_pruned": acc,
        }
        if self.finetune is not None:
            metrics.update(self.finetune.run(ctx, model, "prune_depth fine-tune", f"{field}.finetune"))
        return metrics
