"""Channel-importance criteria for structured pruning: small factories over torch-pruning's."""

from __future__ import annotations

from collections.abc import Callable

import torch_pruning as tp

from compress.registry import Registry

IMPORTANCES: Registry[Callable[[], tp.importance.Importance]] = Registry("importance criterion")


@IMPORTANCES.register("l1")
def l1() -> tp.importance.Importance:
    """Sum of |w| over every tensor slice the dependency group removes together."""
    return tp.importance.GroupMagnitudeImportance(p=1)


@IMPORTANCES.register("l2")
def l2() -> tp.importance.Importance:
    """Sum of w² over the dependency group."""
    return tp.importance.GroupMagnitudeImportance(p=2)


@IMPORTANCES.register("random")
def random() -> tp.importance.Importance:
    """A baseline: any criterion worth using must beat it after fine-tuning."""
    return tp.importance.RandomImportance()
