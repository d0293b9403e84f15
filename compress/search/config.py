"""The recipe's ``target:`` (what the user wants: a measured latency, a size, MACs, an accuracy floor)
and ``search:`` (how ``compress search`` explores candidates to meet it) blocks.

A target is stated on the runtime that will serve the model: ``latency_ms`` at ``batch_size`` and
``threads`` on ``runtime``, measured, never predicted from MACs (MACs are a poor proxy for batch-1
CPU latency: benchmarks/results/prune_cifar.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress.distill.kd import FineTune
from compress.importance import IMPORTANCES, needs_gradients

Precision = Literal["int8", "fp32", "fp16"]
Runtime = Literal["onnxruntime", "openvino"]


class TargetConfig(BaseModel):
    """A budget for the deployable student: measured latency and/or file size and/or MACs, and an
    accuracy floor."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: float | None = Field(None, gt=0, le=1e6, description="p50 latency of one batch, measured (ms)")
    latency_of: Path | None = Field(
        None,
        description="an ONNX file: be as fast as it, each candidate timed back to back with it (steady where "
        "the machine's speed drifts; instead of latency_ms)",
    )
    batch_size: int = Field(1, ge=1, le=4096, description="the batch size latency_ms is stated at")
    threads: int = Field(1, ge=1, le=1024, description="CPU threads the runtime may use")
    runtime: Runtime = Field("onnxruntime", description="the runtime that serves it")
    device: Literal["cpu"] = Field("cpu", description="the device latency is measured on (CPU only so far)")
    size_bytes: int | None = Field(None, gt=0, description="largest ONNX file, in bytes")
    macs: int | None = Field(None, gt=0, description="most multiply-accumulates of one image's forward pass")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="most top-1 lost, in percentage points, against accuracy_from"
    )
    accuracy_from: Literal["student", "teacher"] = Field(
        "student", description="what max_accuracy_drop is measured against: the unpruned student or the teacher"
    )

    @model_validator(mode="after")
    def _something(self) -> TargetConfig:
        given = (self.latency_ms, self.latency_of, self.size_bytes, self.macs, self.max_accuracy_drop)
        if all(v is None for v in given):
            raise ValueError("give at least one of latency_ms, latency_of, size_bytes, macs, max_accuracy_drop")
        if self.latency_ms is not None and self.latency_of is not None:
            raise ValueError("give latency_ms or latency_of, not both")
        return self

    def budget(self) -> dict[str, float]:
        """The hard limits: {"latency_ms": ..., "size_bytes": ..., "macs": ...} for those given. With
        ``latency_of`` the latency limit is each row's own ``latency_ms_budget`` (the file's time measured
        alongside it), stood for here by infinity."""
        latency = math.inf if self.latency_of is not None else self.latency_ms
        given = {"latency_ms": latency, "size_bytes": self.size_bytes, "macs": self.macs}
        return {k: float(v) for k, v in given.items() if v is not None}

    def describe(self) -> str:
        parts = []
        if self.latency_of is not None:
            parts.append(
                f"as fast as {self.latency_of.name} at batch {self.batch_size}, {self.threads} thread"
                f"{'s' * (self.threads > 1)}, {self.runtime}"
            )
        if self.latency_ms is not None:
            parts.append(
                f"≤ {self.latency_ms:g} ms at batch {self.batch_size}, {self.threads} thread"
                f"{'s' * (self.threads > 1)}, {self.runtime}"
            )
        if self.size_bytes is not None:
            parts.append(f"≤ {self.size_bytes:,} bytes")
        if self.macs is not None:
            parts.append(f"≤ {self.macs:,} MACs")
        if self.max_accuracy_drop is not None:
            parts.append(f"top-1 drop ≤ {self.max_accuracy_drop:g} pt from the {self.accuracy_from}")
        return "; ".join(parts)


Ratio = Annotated[float, Field(ge=0, le=0.9)]  # the prune stage caps any ratio at max_ratio 0.9


class SearchConfig(BaseModel):
    """How ``compress search`` explores: candidate architectures are timed (cheap), the promising ones
    fine-tuned briefly with KD (costly), the best fine-tuned fully."""

    model_config = ConfigDict(extra="forbid")

    candidates: int = Field(100, ge=1, le=10_000, description="most candidate architectures to time")
    trials: int = Field(4, ge=1, le=1000, description="candidates on the frontier given a short KD fine-tune")
    ratios: list[Ratio] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75],
        min_length=1,
        description="channel ratios of the per-group sensitivity sweep",
    )
    holdout_images: int = Field(
        5000,
        ge=0,
        le=10_000_000,
        description="training images held out to choose on (at most a fifth of them): the proxy, the sensitivity "
        "sweep and the short fine-tunes are scored on these, never on the test split; 0 scores on the test split",
    )
    sensitivity_images: int = Field(1000, ge=10, le=1_000_000, description="held-out images per sensitivity point")
    depth: int | None = Field(
        None, ge=0, le=1000, description="most residual blocks removed (default: every removable one)"
    )
    depth_method: Literal["loss", "bn_scale", "output"] = Field("loss", description="block importance (prune_depth)")
    round_to: list[Annotated[int, Field(ge=1, le=1024)] | None] = Field(
        default_factory=lambda: [None, 8], min_length=1, description="channel-count roundings tried"
    )
    precisions: list[Precision] = Field(
        default_factory=lambda: ["int8", "fp32"],
        min_length=1,
        description="deployable precisions tried (fp16 pays only where the CPU computes in it)",
    )
    runtimes: list[Runtime] | None = Field(
        None, min_length=1, description="runtimes tried (default: target.runtime); the fastest that fits may win"
    )
    threads: list[Annotated[int, Field(ge=1, le=1024)]] | None = Field(
        None, min_length=1, description="thread counts tried (default: target.threads)"
    )
    method: str = Field("l1", description="channel importance criterion (compress list)")
    probe_images: int = Field(512, ge=16, le=100_000, description="training images for BN re-estimation and proxy")
    estimate: FineTune = Field(
        default_factory=lambda: FineTune(epochs=1, kd=True),
        description="the short fine-tune that estimates a frontier candidate's accuracy",
    )
    estimate_images: int | None = Field(
        None, ge=1, description="training images the short fine-tune sees per epoch (default: all)"
    )
    finetune: FineTune = Field(
        default_factory=lambda: FineTune(epochs=10, kd=True),
        description="the chosen model's full fine-tune, written into recipe.best.yaml",
    )
    iters: int = Field(200, ge=5, le=100_000, description="timed runs per latency measurement")
    warmup: int = Field(20, ge=1, le=10_000, description="untimed runs before them (each in a fresh session)")

    @field_validator("method")
    @classmethod
    def _known_method(cls, v: str) -> str:
        if v not in IMPORTANCES:
            raise ValueError(IMPORTANCES.unknown_message(v))
        if needs_gradients(v):
            raise ValueError(f"{v} ranks channels by gradients, which the search does not collect; use l1 or l2")
        return v

    def requirements(self) -> frozenset[str]:
        return self.estimate.requirements() | self.finetune.requirements()
