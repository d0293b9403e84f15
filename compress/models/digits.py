"""A teacher/student CNN pair sized for 8x8 digits: the quickstart's models.

The teacher is ~16x the student's parameters so distillation has something to transfer and the
size/latency columns of the report show a real gap.
"""

from __future__ import annotations

from torch import nn

from compress.models import MODELS


def _cnn(widths: tuple[int, int, int], num_classes: int, in_channels: int) -> nn.Sequential:
    a, b, c = widths

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, a),
        *block(a, b),
        nn.MaxPool2d(2),
        *block(b, c),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c, num_classes),
    )


@MODELS.register("digits_teacher")
def digits_teacher(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """CNN 64-128-256 (~0.37 M params)."""
    return _cnn((64, 128, 256), num_classes, in_channels)


@MODELS.register("digits_student")
def digits_student(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """CNN 16-32-64 (~24 k params)."""
    return _cnn((16, 32, 64), num_classes, in_channels)
