"""Distillation losses: registered callables ``(z_s, z_t, y, *, temperature, alpha) -> loss``."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from compress.registry import Registry


class DistillLoss(Protocol):
    def __call__(
        self, z_s: Tensor, z_t: Tensor, y: Tensor, *, temperature: float, alpha: float, label_smoothing: float = 0.0
    ) -> Tensor: ...


LOSSES: Registry[DistillLoss] = Registry("distillation loss")

from compress.distill import hinton  # noqa: E402,F401
