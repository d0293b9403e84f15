"""Calibration data for onnxruntime's static quantization, streamed a chunk at a time.

ORT's calibrators keep every intermediate tensor of every batch they are given until they reduce
them (min/max or histograms): 512 CIFAR images through ResNet-56 is ~3 GB. ``BatchReader`` is
sized and ranged (``__len__`` / ``set_range``), so ``quantize_static`` with ``CalibStridedMinMax``
(applies to every calibration method despite its name) collects and reduces ``chunk`` batches at a
time: memory is bounded by the chunk, not the calibration set.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from compress.data import ImageData

#: our name -> onnxruntime.quantization.CalibrationMethod member
METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "distribution": "Distribution"}


class _Ranged:
    """ORT's CalibrationDataReader protocol over numbered batches (``len`` and ``_batch(i)``), with the
    range that strided calibration sets."""

    input_name: str
    _pos: int
    _end: int

    def __len__(self) -> int:  # pragma: no cover - defined by each reader
        raise NotImplementedError

    def _batch(self, i: int) -> np.ndarray:  # pragma: no cover - defined by each reader
        raise NotImplementedError

    def set_range(self, start_index: int, end_index: int) -> None:
        """Serve batches [start_index, end_index) from the next get_next() on (ORT's strided calibration)."""
        self._pos, self._end = start_index, min(end_index, len(self))

    def rewind(self) -> None:
        self.set_range(0, len(self))

    def __iter__(self):
        while (batch := self.get_next()) is not None:
            yield batch

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._pos >= self._end:
            return None
        self._pos += 1
        return {self.input_name: self._batch(self._pos - 1)}


class BatchReader(_Ranged):
    """onnxruntime CalibrationDataReader over the training split, one batch in memory at a time."""

    def __init__(
        self,
        data: ImageData,
        input_name: str,
        batches: int,
        batch_size: int,
        feed: Callable[[torch.Tensor], np.ndarray] | None = None,
    ) -> None:
        self.data, self.input_name = data, input_name
        self.feed = feed or (lambda x: data.normalize(x.cpu()).numpy())
        n = data.train_size
        # Every batch the same size: ORT's histogram calibrators (entropy, percentile, distribution)
        # stack a chunk's batches into one array and fail on a short last batch. With fewer images
        # than batches * batch_size, the batches shrink instead (120 images, 4 x 32 -> 4 x 30).
        count = max(1, min(batches, -(-n // batch_size)))
        self.batch_size = max(1, min(batch_size, n // count))
        # A fixed, class-mixed subset: evenly spaced training images (no augmentation).
        self._index = np.linspace(0, n - 1, count * self.batch_size).astype(np.int64)
        self.set_range(0, len(self))

    def __len__(self) -> int:
        """Number of batches."""
        return len(self._index) // self.batch_size

    @property
    def images(self) -> int:
        return len(self._index)

    @property
    def indices(self) -> np.ndarray:
        """The training images calibrated on, by index, in the order they are served."""
        return self._index.copy()

    def _batch(self, i: int) -> np.ndarray:
        idx = self._index[i * self.batch_size : (i + 1) * self.batch_size]
        return self.feed(self.data.raw("train", idx))


class ArrayReader(_Ranged):
    """onnxruntime CalibrationDataReader over batches the caller already has (numpy arrays or
    tensors, already shaped and normalized as the model's input takes them).

    The batches are re-cut to one size (the first batch's, at most the images given): ORT's
    histogram calibrators stack a chunk's batches and fail on a short last one. Sized and ranged
    like :class:`BatchReader`, so strided calibration bounds memory the same way.
    """

    def __init__(self, batches: list[np.ndarray], input_name: str, batch_size: int | None = None) -> None:
        if not batches:
            raise ValueError("no calibration batches")
        images = np.concatenate(batches)
        size = max(1, min(batch_size or len(batches[0]), len(images)))
        self.input_name, self.batch_size = input_name, size
        self._images = images[: (len(images) // size) * size]
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return len(self._images) // self.batch_size

    @property
    def images(self) -> int:
        return len(self._images)

    def _batch(self, i: int) -> np.ndarray:
        return self._images[i * self.batch_size : (i + 1) * self.batch_size]
