"""scikit-learn's 1,797 real 8x8 handwritten digits: embedded, offline, seconds to train on."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from compress.data import DATASETS
from compress.data.base import DataBundle, DatasetConfig, channel_stats


@DATASETS.register("digits")
class Digits(DatasetConfig):
    """sklearn load_digits, fixed stratified split (the split seed is part of the dataset, not the run)."""

    name: Literal["digits"] = "digits"
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0
    batch_size: int = Field(64, gt=0, le=65536)

    def load(self) -> DataBundle:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        ds = load_digits()
        # Pixel values are 0..16; scale to the full uint8 range like any image.
        images = np.clip(ds.images * 16.0, 0, 255).astype(np.uint8)[:, None]
        tr_x, te_x, tr_y, te_y = train_test_split(
            images, ds.target, test_size=self.test_fraction, stratify=ds.target, random_state=self.split_seed
        )
        train_x = torch.from_numpy(np.ascontiguousarray(tr_x))
        mean, std = channel_stats(train_x)
        return DataBundle(
            train_x=train_x,
            train_y=torch.from_numpy(tr_y).long(),
            test_x=torch.from_numpy(np.ascontiguousarray(te_x)),
            test_y=torch.from_numpy(te_y).long(),
            class_names=[str(i) for i in range(10)],
            mean=mean,
            std=std,
            augment=False,
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
        )
