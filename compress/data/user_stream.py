"""Your own torch Datasets, streamed: samples read (and converted, resized) in DataLoader workers
as training goes, for data that does not fit in memory (see :mod:`compress.data.user`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from compress.data.base import chunked_stats
from compress.data.samples import read_sample
from compress.data.stream import STATS_IMAGES, Source, StreamBundle, default_workers
from compress.data.transforms import TrainView, mean_fill
from compress.errors import CompressError


@dataclasses.dataclass
class DatasetSource(Source):
    """A user's torch Dataset of (image, label), converted (and resized) per sample in the workers."""

    dataset: Any
    size: tuple[int, int] | None
    split: str
    classes: int
    field_name: str = "data"
    index: np.ndarray | None = None  # the dataset's samples this source reads (None: all)

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.dataset)

    def sample(self, i: int, view: TrainView | None, key: int | None) -> tuple[torch.Tensor, int]:
        j = int(self.index[i]) if self.index is not None else i
        img, label = read_sample(self.dataset, j, self.split, self.size, self.classes, self.field_name)
        return (img if view is None or key is None else view(img, key)), label

    def identity(self) -> bytes:
        name = f"{type(self.dataset).__module__}.{type(self.dataset).__qualname__}|{id(self.dataset)}".encode()
        return name if self.index is None else name + b"|" + self.index.astype(np.int64).tobytes()

    def take(self, idx: np.ndarray) -> DatasetSource:
        return dataclasses.replace(self, index=idx if self.index is None else self.index[idx])


def stream_datasets(
    train: Any, test: Any, class_names: Sequence[str], first: torch.Tensor, *, size: tuple[int, int] | None,
    mean: Sequence[float] | None, std: Sequence[float] | None, augment: bool, batch_size: int,
    eval_batch_size: int, field: str, workers: int | None,
) -> StreamBundle:  # fmt: skip
    """A StreamBundle over the user's Datasets; mean/std, when not given, from evenly spaced samples."""
    k = len(class_names)
    sources = {s: DatasetSource(ds, size, s, k, field) for s, ds in (("train", train), ("test", test))}
    if mean is None or std is None:
        idx = np.linspace(0, len(train) - 1, min(STATS_IMAGES, len(train))).astype(np.int64)
        mean, std = chunked_stats(torch.stack([sources["train"].eval_view(int(i)) for i in idx]))
    channels, height, width = first.shape
    if len(mean) != channels or len(std) != channels:
        raise CompressError(f"{field}.mean: {len(mean)} values for {channels}-channel images; give one per channel")
    pad = max(1, min(height, width) // 8)
    n_workers = default_workers() if workers is None else workers
    return StreamBundle(
        train=sources["train"],
        test=sources["test"],
        class_names=list(class_names),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        shape=(channels, height, width),
        train_view=TrainView("pad", min(height, width), pad, (1.0, 1.0), True, None, mean_fill(mean)),
        augment=augment,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        workers=n_workers,
        describe=f"streaming {len(train)} + {len(test)} samples of {type(train).__name__} with {n_workers} workers",
    )
