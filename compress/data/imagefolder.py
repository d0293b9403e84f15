"""A user's own ``train/`` + ``val/`` (or ``test/``) tree of class folders, decoded once and cached.

Everything is resized to ``image_size`` and held in memory as uint8: right for the small-image
datasets this toolkit trains on CPU, not for ImageNet-scale data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig, channel_stats
from compress.data.images import load_cached


@DATASETS.register("imagefolder")
class ImageFolder(DatasetConfig):
    """Your own train/ + val/ class folders, resized to image_size and decoded once."""

    name: Literal["imagefolder"] = "imagefolder"
    root: Path
    val_split: Literal["val", "test"] = "val"
    image_size: int = Field(32, ge=4, le=1024)
    mean: tuple[float, float, float] | None = Field(None, description="default: computed on train")
    std: tuple[float, float, float] | None = None
    augment: bool = True

    @model_validator(mode="after")
    def _check(self) -> ImageFolder:
        if not self.root.exists():
            raise ValueError(f"root {str(self.root)!r} does not exist")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        return self

    def load(self) -> DataBundle:
        data = load_cached(self.root, ("train", self.val_split), self.image_size, "data.root")
        train_x, train_y = data["train"]
        test_x, test_y = data[self.val_split]
        mean, std = (self.mean, self.std) if self.mean is not None else channel_stats(train_x)
        return DataBundle(
            train_x=train_x,
            train_y=train_y,
            test_x=test_x,
            test_y=test_y,
            class_names=data["classes"],
            mean=tuple(mean),
            std=tuple(std),
            augment=self.augment,
            pad=max(1, self.image_size // 8),
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
        )
