"""Random images with a learnable signal: one fixed template per class plus noise. For tests."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig


@DATASETS.register("synthetic")
class Synthetic(DatasetConfig):
    """Class templates plus noise: learnable random tensors, for tests."""

    name: Literal["synthetic"] = "synthetic"
    num_classes: int = Field(10, ge=2, le=1000)
    channels: int = Field(3, ge=1, le=16)
    image_size: int = Field(16, ge=4, le=512)
    train_size: int = Field(512, ge=1)
    test_size: int = Field(128, ge=1)
    noise: float = Field(40.0, ge=0, description="noise std in uint8 pixel units")
    seed: int = 0
    augment: bool = Field(False, description="random crop (pad 4) + horizontal flip while training")
    batch_size: int = Field(64, gt=0, le=65536)

    def load(self) -> DataBundle:
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.channels, self.image_size, self.image_size)
        templates = torch.rand((self.num_classes, *shape), generator=gen) * 255

        def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            y = torch.arange(n) % self.num_classes
            x = templates[y] + torch.randn((n, *shape), generator=gen) * self.noise
            return x.clamp(0, 255).to(torch.uint8), y

        train_x, train_y = split(self.train_size)
        test_x, test_y = split(self.test_size)
        return DataBundle(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            class_names=[f"class{i}" for i in range(self.num_classes)],
            mean=(0.5,) * self.channels,
            std=(0.3,) * self.channels,
            augment=self.augment,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
        )
