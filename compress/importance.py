"""Channel-importance criteria for structured pruning: thin subclasses of torch-pruning's.

Each entry is an ``Importance`` class built with no arguments. ``needs_gradients = True`` means
the prune stage first accumulates gradients of the training loss over a few batches (``.grad`` of
every parameter) — first-order Taylor uses |w · ∂L/∂w|.
"""

from __future__ import annotations

import torch_pruning as tp

from compress.registry import Registry

IMPORTANCES: Registry[type[tp.importance.Importance]] = Registry("importance criterion", group="compress.importances")


def needs_gradients(name: str) -> bool:
    return bool(getattr(IMPORTANCES.get(name), "needs_gradients", False))


@IMPORTANCES.register("l1")
class L1(tp.importance.GroupMagnitudeImportance):
    """Sum of |w| over every tensor slice the dependency group removes together."""

    def __init__(self) -> None:
        super().__init__(p=1)


@IMPORTANCES.register("l2")
class L2(tp.importance.GroupMagnitudeImportance):
    """Sum of w² over the dependency group."""

    def __init__(self) -> None:
        super().__init__(p=2)


@IMPORTANCES.register("bn_scale")
class BNScale(tp.importance.BNScaleImportance):
    """|γ| of the BatchNorm after each channel (network slimming, Liu et al. 2017). A group without
    BatchNorm (attention, LayerNorm models) gets no score and is left unpruned."""


@IMPORTANCES.register("taylor")
class Taylor(tp.importance.GroupTaylorImportance):
    """First-order Taylor, |w · ∂L/∂w| summed over the group (Molchanov et al. 2019): the loss change
    from removing a channel. Needs gradients: the stage accumulates ``taylor_batches`` batches."""

    needs_gradients = True


@IMPORTANCES.register("random")
class Random(tp.importance.RandomImportance):
    """A baseline: any criterion worth using must beat it after fine-tuning."""
